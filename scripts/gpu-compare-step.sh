#!/usr/bin/env bash
# `train`'s SwAV step against the same step in PyTorch, side by side on one GPU: RegNetY-8GF,
# bf16, channels-last, batch 64, SwAV's 2x224 + 6x96 crops. Runs on the GPU machine with the
# kit of `scripts/gpu-check.sh --prepare` beside the repository:
#
#   scripts/gpu-compare-step.sh [--out DIR] [--steps N] [--rounds R] [--device cpu]
#
# Each round runs PyTorch's step (scripts/train_reference_step.py: torchvision's RegNetY-8GF,
# the same head, Sinkhorn loss and LARC, random uint8 crops copied from pinned memory) and then
# `train` (the real augmenter feeding it) for N steps; R rounds (default 2) alternate the two so
# that a drift of the machine shows in both. Writes to DIR (default $OUT, else
# runs/gpu-compare-step) compare-summary.txt (each run's median seconds per step over its
# steady part, and the ratio within each round) and compare-logs.txt. It also counts the
# "deprecated" warnings libtorch printed in `train`'s logs (there should be none).
# --device cpu is a dry run of the script's own logic (RegNetY-400MF, fp32, batch 2).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
kit="$root/gpu-kit"
out="${OUT:-$root/runs/gpu-compare-step}"
steps=100
rounds=2
device=cuda
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    *) echo "gpu-compare-step.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
source scripts/env.sh
seer_use_gpu_kit "$kit" gpu-compare-step.sh || exit $?
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
threads=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))
status=0
ref=(--device cuda --model regnet_y_8gf --precision bf16 --channels-last --batch 64 --steps 40
  --warmup 25)
model=(--set model=8GF --set precision=bf16 --set data.batch_size=64 --set logging.every_steps=10)
if [[ "$device" == cpu ]]; then
  ref=(--batch 2 --steps 3 --warmup 1 --threads "$(nproc)")
  model=(--set precision=fp32 --set data.batch_size=2 --set logging.every_steps=1)
fi

for round in $(seq 1 "$rounds"); do
  echo "== round $round: PyTorch"
  python3 scripts/train_reference_step.py "${ref[@]}" > "$work/ref-$round.json" 2> "$work/ref-$round.log" \
    || { status=1; tail -n 20 "$work/ref-$round.log"; }
  echo "== round $round: train, $steps steps, $threads augmenter threads"
  "$kit/train" --config configs/swav-regnety-400mf.toml --device "$device" --run-dir "$work/train-$round" \
    --set "data.url=$kit/shards" --set "data.threads=$threads" "${model[@]}" \
    --set "schedule.steps=$steps" --set "optim.warmup_steps=$(( steps / 8 ))" \
    --set checkpoint.every_steps=1000000 \
    > "$work/train-$round.json" 2> "$work/train-$round.log" \
    || { status=1; tail -n 20 "$work/train-$round.log"; }
done

python3 - "$work" "$rounds" <<'EOF' | tee "$out/compare-summary.txt"
import json, os, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
for r in range(1, rounds + 1):
    ref_path = os.path.join(work, f"ref-{r}.json")
    met_path = os.path.join(work, f"train-{r}", "metrics.jsonl")
    ref = json.load(open(ref_path))["step_s"] if os.path.getsize(ref_path) else []
    rows = [json.loads(l) for l in open(met_path)] if os.path.exists(met_path) else []
    # Logging windows after the first two, which hold cuDNN's algorithm search.
    steps = [x["train/step_time"] for x in rows if "train/step_time" in x][2:]
    wait = [x["train/data_wait"] for x in rows if "train/data_wait" in x][2:]
    if not ref or not steps:
        print(f"round {r}: missing results (ref {len(ref)} steps, train {len(steps)} windows)")
        continue
    a, b = statistics.median(ref), statistics.median(steps)
    print(f"round {r}: PyTorch {a:.4f} s/step ({min(ref):.4f}-{max(ref):.4f}, {len(ref)} steps); "
          f"train {b:.4f} s/step ({min(steps):.4f}-{max(steps):.4f}, {len(steps)} logging windows); "
          f"train / PyTorch {b / a:.3f}; train's data wait {statistics.median(wait):.4f} of step time")
EOF
warnings=$(cat "$work"/train-*.log | grep -ci deprecat)
echo "deprecation warnings in train's logs: $warnings" | tee -a "$out/compare-summary.txt"
for f in "$work"/*.log "$work"/*.json; do echo "==== $f"; cat "$f"; done > "$out/compare-logs.txt"
exit $status
