#!/usr/bin/env bash
# On a GPU host: build spot_ops with all cores, run the GPU-marked tests, print a short summary.
#   bash scripts/gpu_check.sh [extra pytest args]
# Wheels for packages the host lacks (nvidia-cutlass, gguf) may be placed in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spot_gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
start=$(date +%s)
if ! MAX_JOBS=$(nproc) SPOT_PTXAS_VERBOSE=1 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  echo "BUILD FAILED after $(( $(date +%s) - start )) s (log: $OUT/build.log)"
  exit 1
fi
build_s=$(( $(date +%s) - start ))
# ptxas resource report: any kernel with a stack frame or spills is worth a look.
grep -E "bytes stack frame" "$OUT/build.log" | grep -v " 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" \
  | sort | uniq | head -20 > "$OUT/spills.txt"
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import spot_attention as s; print('spot_ops CUDA kernels:', s.cuda_available())"
python3 -m pytest -q -m gpu tests -ra -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
status=${PIPESTATUS[0]}
echo "== summary =="
echo "build: ${build_s} s; kernels with stack/spills: $(wc -l < "$OUT/spills.txt")"
tail -1 "$OUT/gpu_tests.log"
exit "$status"
