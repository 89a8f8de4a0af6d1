#!/usr/bin/env bash
# On a GPU host, after scripts/gpu_check.sh has built spot_ops: the kernel benchmarks, each
# under its own time limit, results in bench/results/ named after the device.
#   bash scripts/gpu_bench.sh [decode] [prefill] [block_mass]     (default: all three)
# LIMIT (seconds per benchmark) and DECODE_ARGS / PREFILL_ARGS / MASS_ARGS (extra arguments) narrow a run;
# SPOT_COMMIT=<hash> records the commit where the tree has no .git (a copied tree on a GPU host).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spot_gpu_bench}
mkdir -p "$OUT" bench/results
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# h100, h200, ...: the results' file suffix
TAG=${TAG:-$(cd bench && python3 -c "import torch; from benchlib import device_tag; print(device_tag(torch.device('cuda'), torch.cuda.get_device_name()))")}
LIMIT=${LIMIT:-240}
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(decode prefill block_mass)
for bench in "${benches[@]}"; do
  start=$(date +%s)
  case "$bench" in
    decode) args=(bench/decode.py --tag "$TAG" --time-limit $((LIMIT * 3 / 4)) ${DECODE_ARGS:-}) ;;
    prefill) args=(bench/prefill.py --output "bench/results/prefill_$TAG.json" --time-limit $((LIMIT * 3 / 4))
                   ${PREFILL_ARGS:-}) ;;
    block_mass) args=(bench/block_mass.py --tag "$TAG" ${MASS_ARGS:-}) ;;
    *) echo "unknown benchmark $bench" >&2; exit 2 ;;
  esac
  timeout "$LIMIT" python3 "${args[@]}" >"$OUT/$bench.log" 2>&1
  echo "== $bench: exit $? in $(( $(date +%s) - start )) s"
  tail -25 "$OUT/$bench.log"
done
