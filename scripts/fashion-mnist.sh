#!/usr/bin/env bash
# The proof on real labeled data: Fashion-MNIST through the whole product on a 2-core CPU.
#
#   1. fetch the IDX files (Debian's dataset-fashion-mnist, scripts/fetch-testdata.sh) and write
#      them as PNG folders with a shuffled url,label list per split;
#   2. ingest both splits with their labels into shards (28-px images: --min-side 28, no resize);
#   3. pretrain configs/fashion-mnist.toml with SwAV on the 60,000 training images (labels unused;
#      6,000 steps, see the configuration for the time);
#   4. kNN (k=200, T=0.1) and linear probes (BN + linear, 30 epochs) on train/test for the
#      pretrained trunk, the same trunk randomly initialized (same seed as the run's init),
#      and raw pixels; the trunks' features both globally pooled and 2x2 pooled; features are
#      cached, so each trunk is extracted once per pooling.
#
# Results go to $SEER_FASHION_MNIST (default runs/fashion-mnist): reports/*.json (+ confusion
# PNGs), run/loss.png, and a summary table on stdout. Rerunning resumes or skips what is done.
# SEER_PROFILE=debug uses the debug build (what docs/benchmarks.md measured; release is faster).
# Extra arguments go to the pretraining (`train`), e.g. --set schedule.steps=200 for a quick try.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
profile="${SEER_PROFILE:-release}"
out="${SEER_FASHION_MNIST:-$root/runs/fashion-mnist}"
mkdir -p "$out/reports"

bash scripts/fetch-testdata.sh
if [[ "$profile" == release ]]; then
  cargo build --release -p ingest -p trainer
else
  cargo build -p ingest -p trainer
fi
bin="$root/target/$profile"

echo "== Fashion-MNIST as PNG folders and url,label lists -> $out/png"
python3 scripts/fashion_mnist_folders.py "$SEER_CACHE/fashion-mnist" "$out/png"

for split in train test; do
  echo "== ingest $split (labels from the list's label column)"
  "$bin/ingest" run --list "$out/png/$split.csv" --label-column label -o "$out/data/$split" \
    --min-side 28 --quality 95 --samples-per-shard 5000 --no-progress
done

echo "== pretrain (SwAV, configs/fashion-mnist.toml) -> $out/run"
start=$(date +%s)
"$bin/train" --config configs/fashion-mnist.toml --set data.url="$out/data/train" \
  --run-dir "$out/run" --resume "$@"
echo "pretraining wall time: $(($(date +%s) - start)) s (a resumed or finished run counts only this call)"

# Every probe sees the 28-px images upsampled to the pretraining's 32-px global crops, center
# crop 32 (the whole image).
common=(--train "$out/data/train" --test "$out/data/test" --config configs/fashion-mnist.toml
  --resize 32 --crop 32 --cache-dir "$out/features" --threads 1)
# --threads 1: with two torch threads on a busy 2-core machine every small operation of the
# probe waits for the other thread to be scheduled (30 linear epochs on pixels took 40 min
# instead of 5).
for trunk in pretrained random pixels; do
  case $trunk in
    pretrained) checkpoint="$out/run/checkpoints" ;;
    *) checkpoint=$trunk ;;
  esac
  "$bin/train" eval knn --checkpoint "$checkpoint" "${common[@]}" \
    --output "$out/reports/knn-$trunk.json"
  "$bin/train" eval linear --checkpoint "$checkpoint" "${common[@]}" --batch-norm --epochs 30 \
    --output "$out/reports/linear-$trunk.json"
  # The trunks again with their last stage (2x2 at 32 px) kept as 2x2 (SwAV's
  # --global_pooling false): C x 4 features instead of the global average's C.
  if [[ $trunk != pixels ]]; then
    "$bin/train" eval knn --checkpoint "$checkpoint" "${common[@]}" --pool 2 \
      --output "$out/reports/knn-$trunk-pool2.json"
    "$bin/train" eval linear --checkpoint "$checkpoint" "${common[@]}" --pool 2 --batch-norm \
      --epochs 30 --output "$out/reports/linear-$trunk-pool2.json"
  fi
done

echo "== top-1 on the 10,000 test images (%)"
python3 - "$out/reports" <<'EOF'
import json, sys
from pathlib import Path
reports = Path(sys.argv[1])
def top1(name):
    path = reports / f"{name}.json"
    return f"{json.loads(path.read_text())['top1']:.2f}" if path.exists() else "-"
print(f"{'features':<24}{'kNN':>8}{'linear':>8}")
for trunk in ["pretrained", "random", "pixels"]:
    for pool, label in [("", "global pool"), ("-pool2", "2x2 pool")]:
        if trunk == "pixels":
            if pool:
                continue
            label = "3x32x32"
        name = f"{trunk} ({label})"
        print(f"{name:<24}{top1(f'knn-{trunk}{pool}'):>8}{top1(f'linear-{trunk}{pool}'):>8}")
EOF
echo "loss curve: $out/run/loss.png"
