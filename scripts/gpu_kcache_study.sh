#!/usr/bin/env bash
# Quantisation-aware selectors for the FP4 K-caches, on a GPU host with spot_ops built, offline.
#
#   SPOT_MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=/tmp/kcache_study bash scripts/gpu_kcache_study.sh
#
# 1. For each FP4 format, distils a selector through that K-cache's round trip
#    (--kcache-format FMT --kcache-prefill: decode and prefill rows read the 4-bit keys, as the
#    benchmark scores them) with the shipped selector's training settings (docs/selector.md:
#    train-ctx 1024, 960 steps, 8 updates per window, replay 12, lr 3e-3, seed 0, forward KL), and
#    calibrates it like the shipped one (95% recall, 2K + 4K windows, local_blocks 2). The formats
#    train in parallel processes: a selector step is launch-bound (~19k small ops), so one
#    process leaves the GPU mostly idle.
# 2. bench/kcache_accuracy.py --calibrate at L=8192: the shipped selector at bf16 / mxfp4 / nvfp4
#    and each QAT selector at its own format, top_p calibrated per row, same documents.
# 3. Prints a table (last) and writes $OUT/kcache_qat.{json,md}, $OUT/study.json and the logs.
#
# Expected: ~5-6.5 min on one H200. Basis (CPU, 1 thread: 0.35 s per step, 6.4 s per 1K
# capture): a step is ~15.5k small aten ops forward + backward (plus AdamW, foreach on CUDA),
# launch-bound on a GPU at ~6-10 us per op, i.e. ~0.1-0.15 s, so 960 steps + 121 captures take
# ~2-3 min per selector, both formats in parallel ~2.5-4 min with model load and calibration;
# the benchmark ~1.5-2 min (5 rows x (per-row calibration ~10 s + 8 documents at 8K)).
# TRAIN_LIMIT (s) stops training early (checkpointed; steps_done is in the table) if steps run
# slower than that; rerunning resumes from the checkpoints in $OUT. Knobs: STEPS, TRAIN_CTX,
# TRAIN_LIMIT, DOCS, LENGTH, CALIB_CTX, FORMATS,
# BENCH_FORMATS, DEVICE, THREADS, CONTROL=1 (also trains a float-key selector with the same
# settings on this host, the like-for-like baseline; ~+1 min).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${SPOT_MODEL:?set SPOT_MODEL to the GGUF file of the default model}"
OUT=${OUT:-/tmp/spot_kcache_study}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-960}
TRAIN_CTX=${TRAIN_CTX:-1024}
TRAIN_LIMIT=${TRAIN_LIMIT:-240}
DOCS=${DOCS:-8}
LENGTH=${LENGTH:-8192}
CALIB_CTX=${CALIB_CTX:-2048 4096}
FORMATS=${FORMATS:-mxfp4 nvfp4}
BENCH_FORMATS=${BENCH_FORMATS-bf16 mxfp4 nvfp4}  # may be empty: QAT rows only
THREADS=${THREADS:-4}
CONTROL=${CONTROL:-0}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
study_start=$(date +%s)
# Children run in the background and are waited for, so that a TERM to this script (an outer
# timeout) reaches them instead of leaving them running.
children=()
trap 'kill "${children[@]}" 2>/dev/null; exit 143' TERM INT

# --- 1. distillation through each format (parallel), then calibration -------------------------
runs=()
for fmt in $FORMATS; do runs+=("qat-$fmt:$fmt"); done
[ "$CONTROL" = 1 ] && runs+=("control:none")
pids=()
for run in "${runs[@]}"; do
  name=${run%%:*}; fmt=${run#*:}
  timeout $((TRAIN_LIMIT + 150)) python3 -m spot_attention.distill --model "$SPOT_MODEL" --out "$OUT/$name" \
    --device "$DEVICE" --threads "$THREADS" --train-ctx "$TRAIN_CTX" --steps "$STEPS" --updates-per-window 8 \
    --replay 12 --lr 3e-3 --seed 0 --loss forward_kl --kcache-format "$fmt" --kcache-prefill \
    --time-limit "$TRAIN_LIMIT" \
    --calibrate --target-recall 0.95 --calib-ctx $CALIB_CTX --calib-windows 2 --local-blocks 2 \
    >"$OUT/distill-$name.log" 2>&1 &
  pids+=($!); children+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  echo "== distill ${runs[$i]%%:*}: exit $rc"
  [ $rc -ne 0 ] && { failed=1; tail -20 "$OUT/distill-${runs[$i]%%:*}.log"; }
done
train_s=$(( $(date +%s) - study_start ))
echo "== training + calibration: $train_s s"
[ $failed -ne 0 ] && { echo "distillation failed; see $OUT/distill-*.log" >&2; exit 1; }

# --- 2. accuracy at L=8192, top_p calibrated per row --------------------------------------------
extra=()
for fmt in $FORMATS; do extra+=(--selector-for "$fmt=$OUT/qat-$fmt"); done
if [ "$CONTROL" = 1 ]; then
  for fmt in $BENCH_FORMATS; do extra+=(--selector-for "$fmt=$OUT/control"); done
fi
bench_start=$(date +%s)
timeout 420 python3 bench/kcache_accuracy.py --model "$SPOT_MODEL" --device "$DEVICE" --calibrate \
  --docs "$DOCS" --length "$LENGTH" --no-progress --formats $BENCH_FORMATS "${extra[@]}" \
  --out "$OUT/kcache_qat.json" >"$OUT/bench.log" 2>&1 &
children+=($!)
wait $!
rc=$?
bench_s=$(( $(date +%s) - bench_start ))
echo "== bench/kcache_accuracy.py: exit $rc in $bench_s s"
[ $rc -ne 0 ] && { tail -30 "$OUT/bench.log"; exit 1; }

# --- 3. table ---------------------------------------------------------------------------------
python3 - "$OUT" "$train_s" "$bench_s" <<'EOF'
import json, os, sys

out, train_s, bench_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
result = json.load(open(os.path.join(out, "kcache_qat.json")))
rows = result["rows"]
base = next((row for row in rows if row["format"] == "bf16"), None)
trained = {}
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, "selector.json")
    if os.path.isfile(path):
        training = json.load(open(path)).get("training", {})
        trained[name] = {"steps_done": training.get("steps_done"), "wall_time_s": training.get("wall_time_s"),
                         "final_loss": training.get("final_loss"),
                         "settings": training.get("settings")}
study = {"L": result["L"], "documents": [doc["name"] for doc in result["documents"]], "device": result["device"],
         "commit": result["commit"], "train_and_calibrate_s": train_s, "bench_s": bench_s, "trained": trained,
         "rows": rows}
json.dump(study, open(os.path.join(out, "study.json"), "w"), indent=2)
print(f"\nK-cache QAT study, L={result['L']}, {len(result['documents'])} held-out documents, {result['device']}, "
      f"top_p calibrated per row (95% recall); train+calibrate {train_s} s, bench {bench_s} s")
print(f"{'row':<24} {'recall':>7} {'ppl %':>7} {'vs bf16':>8} {'read':>6} {'top1':>6} {'steps':>6}")
for row in rows:
    label = row["format"]
    versus = row["ppl_delta_pct"] - base["ppl_delta_pct"] if base else float("nan")
    steps = trained.get(label.partition("@")[2], {}).get("steps_done", "") if "@" in label else "shipped"
    print(f"{label:<24} {row['recall']:>7.4f} {row['ppl_delta_pct']:>+7.2f} {versus:>+8.2f} {row['frac_read']:>6.3f} "
          f"{row['top1_agree']:>6.3f} {steps!s:>6}")
print("(ppl %: perplexity change vs dense attention; vs bf16: points vs the shipped selector at bf16; target: "
      "QAT rows within +0.20)")
EOF
