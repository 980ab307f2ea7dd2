#!/usr/bin/env bash
# The quick start: on a fresh machine, install what the build needs, fetch real photos
# (Debian packages, into $SEER_CACHE), ingest them from a local folder into ./dataset
# (WebDataset shards with index, stats and manifest), inspect the result, then show and
# measure the SwAV multi-crop views the augmenter makes from it, and pretrain a small RegNetY
# with SwAV on it for 300 steps on CPU, then export the trunk for torchvision.
# Rerunning it resumes or skips what is done. Extra arguments go to `ingest run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
bash scripts/setup.sh
bash scripts/fetch-testdata.sh
cargo build --release -p ingest -p shards -p augment -p trainer
bin="$root/target/release"
output="${SEER_DATASET:-$root/dataset}"

echo "== ingest: $SEER_CACHE/photos -> $output"
"$bin/ingest" run "$SEER_CACHE/photos" -o "$output" --samples-per-shard 250 "$@"
echo "== shards ls"
"$bin/shards" ls "$output"
echo "== shards stat"
"$bin/shards" stat "$output"
echo "== shards verify"
"$bin/shards" verify "$output"
echo "== shards dupes"
"$bin/shards" dupes "$output" | tail -n 20
"$bin/shards" grid "$output" -o "$output/grid.png"
echo "contact sheet of 64 random samples: $output/grid.png"
echo "== augment views (SwAV's 2x224 + 6x96 views of one sample, beside the source)"
"$bin/augment" views --data "$output" -o "$output/views.png" --preset swav
echo "== augment bench (the multi-crop pipeline on this dataset, 10 s on every core)"
"$bin/augment" bench --data "$output" --preset swav --threads "$(nproc)" --seconds 10
run="$root/runs/quickstart"
echo "== train: SwAV on a small RegNetY, 300 steps on CPU (configs/cpu-small.toml) -> $run"
# --resume: a rerun continues the run (or reports it finished) instead of starting over.
"$bin/train" --config configs/cpu-small.toml --set data.url="$output" --run-dir "$run" --resume
"$bin/train" export --checkpoint "$run/checkpoints" --output "$run/trunk.safetensors"
echo "loss curve: $run/loss.png; metrics: $run/metrics.jsonl; trunk for torchvision: $run/trunk.safetensors"
