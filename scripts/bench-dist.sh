#!/usr/bin/env bash
# Data-parallel benchmark on CPU (docs/benchmarks.md, "Data parallel"):
#   1. gradient averaging of RegNetY-400MF + SwAV head over 2 Gloo processes, by bucket size
#      (trainer/examples/bench_allreduce.rs);
#   2. SwAV steps of RegNetY-400MF (fp32, one torch thread per process) with 1 process and with
#      2 processes (`train --nproc 2`) at the same per-process batch: seconds per step, images/s,
#      and the share of time in collectives (`communication_share` of the summary);
#   3. the same 2 processes at the default thread counts (each rank's share of the cores) and
#      with every core each for libtorch and the augmenter (what the default was before).
# Needs scripts/setup.sh and a shard dataset: DATA (default: the augment benchmark's, made by
# scripts/bench-augment.sh). Usage: scripts/bench-dist.sh [STEPS] [BATCH]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
steps=${1:-6}
batch=${2:-4}
data=${DATA:-$SEER_CACHE/augment-bench-dataset}
[[ -f "$data/manifest.json" ]] || { echo "$data: no shard dataset (run scripts/bench-augment.sh or set DATA)" >&2; exit 1; }
# The dev profile: dependencies (libtorch bindings) are optimized there, and the hot loops are
# libtorch's own.
cargo build -p trainer --bin train --example bench_allreduce
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== gradient averaging, 2 processes, by bucket size"
target/debug/examples/bench_allreduce 2 20

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() { # NAME NPROC [THREAD SETTINGS...] (default: one torch and one augmenter thread)
  local name=$1 nproc=$2
  shift 2
  local threads=("$@")
  ((${#threads[@]})) || threads=(--set threads=1 --set data.threads=1)
  target/debug/train --config configs/swav-regnety-400mf.toml --run-dir "$work/$name" \
    --nproc "$nproc" "${threads[@]}" \
    --set precision=fp32 --set data.shuffle_buffer=64 \
    --set "data.url=\"$data\"" --set "data.batch_size=$batch" --set "schedule.steps=$steps" \
    --set checkpoint.every_steps=100000 --set logging.every_steps=1 --set optim.warmup_steps=0 --set head.freeze_prototypes_iters=0 2>"$work/$name.log"
}
echo "== RegNetY-400MF SwAV steps (2x224+6x96, batch $batch per process, $steps steps, fp32)"
for round in 1 2 3; do
  echo "round $round, 1 process:  $(run one-$round 1)"
  echo "round $round, 2 processes: $(run two-$round 2)"
done
echo "== 2 processes: each rank's share of the $(nproc) cores (the default) against every core each"
cores=$(nproc)
for round in 1 2 3; do
  echo "round $round, share:      $(run share-$round 2 --set threads=0)"
  echo "round $round, every core: $(run every-$round 2 --set "threads=$cores" --set "data.threads=$cores")"
done
