#!/usr/bin/env bash
# GPU check of data-parallel training on NCCL, one rank per GPU (run on a GPU machine):
# builds the release trainer with the `nccl` feature (installing the CUDA headers it needs,
# SEER_NCCL=1 scripts/setup.sh), ingests the small photo set, then runs `train --nproc G
# --device cuda` for a few steps of configs/cpu-small.toml in fp32 and bf16 with
# SyncBatchNorm over all GPUs, resumes it, and prints each summary (seconds per step,
# communication share). Also checks that Gloo still runs on the same machine (CPU ranks).
# Usage: scripts/gpu-check-dist.sh [GPUS] (default: every GPU nvidia-smi lists; at least 1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
gpus=${1:-$(nvidia-smi -L | wc -l)}
SEER_NCCL=1 bash scripts/setup.sh
bash scripts/fetch-testdata.sh
cargo build --release -p trainer --features nccl --bin train -p ingest --bin ingest
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target/release/ingest run "$SEER_CACHE/photos-small" -o "$work/data" --samples-per-shard 4 \
  --no-progress 2>/dev/null
common=(--config configs/cpu-small.toml --set "data.url=\"$work/data\"" --set data.batch_size=8
        --set schedule.steps=20 --set checkpoint.every_steps=10 --set logging.every_steps=5
        --set distributed.sync_bn_group_size="$gpus")
for precision in fp32 bf16; do
  echo "== NCCL, $gpus GPU(s), $precision"
  target/release/train "${common[@]}" --device cuda --nproc "$gpus" --set precision=$precision \
    --run-dir "$work/nccl-$precision" --stop-after 10
  target/release/train "${common[@]}" --device cuda --nproc "$gpus" --set precision=$precision \
    --run-dir "$work/nccl-$precision" --resume
done
echo "== Gloo, 2 CPU ranks"
target/release/train "${common[@]}" --set distributed.sync_bn_group_size=2 --nproc 2 \
  --run-dir "$work/gloo" --set schedule.steps=6
