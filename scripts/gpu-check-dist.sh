#!/usr/bin/env bash
# The data-parallel GPU check: NCCL training with the kit's release `train` (built with the
# `nccl` feature by `scripts/gpu-check.sh --prepare` on the build machine) on a CUDA machine
# that has torch 2.11.0 in its python3 but no Rust and no network. `scripts/gpu-check.sh` runs
# it as its last step; it also runs alone:
#
#   scripts/gpu-check-dist.sh [--out DIR] [--gpus G] [--device cuda|cpu] [--timing-steps N]
#
# With G >= 2 GPUs (default: every GPU nvidia-smi lists): `train --nproc G --device cuda`, one
# rank per GPU, SyncBatchNorm over all of them. With one GPU: one rank under torchrun's
# variables (RANK=0, WORLD_SIZE=1) with `distributed.process_group_for_one_rank`, so the
# store, ProcessGroupNCCL, the bucketed gradient all-reduce and the distributed Sinkhorn all
# run on the GPU. Each in fp32 and bf16: stop at step 10 with a checkpoint, resume to 20.
# Then 2 CPU ranks on Gloo. Logs and summaries go to DIR (default $OUT, else
# runs/gpu-check-dist): dist-logs.txt and one line per run in dist-summary.txt.
# --device cpu is a dry run of the script's own logic (Gloo instead of NCCL).
# --timing-steps N (one GPU): then RegNetY-8GF bf16 at batch 64 for N steps through the process
# group, without it, and through it again (t-group, t-plain, t-group2 in dist-summary.txt): the
# cost of NCCL's bucketed all-reduce and the communication share on one GPU.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
kit="$root/gpu-kit"
out="${OUT:-$root/runs/gpu-check-dist}"
gpus=""
device=cuda
timing_steps=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --timing-steps) timing_steps="$2"; shift 2 ;;
    *) echo "gpu-check-dist.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
train="$kit/train"
data="$kit/shards"
source scripts/env.sh
seer_use_gpu_kit "$kit" gpu-check-dist.sh || exit $?
if [[ -z "$gpus" ]]; then
  if [[ "$device" == cuda ]]; then gpus=$(nvidia-smi -L | wc -l); else gpus=1; fi
fi
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
summary="$out/dist-summary.txt"
: > "$summary"
backend=nccl
[[ "$device" == cuda ]] || backend=gloo

common=(--config configs/swav-regnety-400mf.toml --set "data.url=$data"
  --set data.threads=2 --set data.batch_size=16 --set schedule.steps=20 --set optim.warmup_steps=4
  --set checkpoint.every_steps=10 --set logging.every_steps=5
  --set "distributed.backend=\"$backend\"" --set distributed.timeout_s=300)
if [[ "$device" == cpu ]]; then
  common+=(--set data.batch_size=2 --set schedule.steps=4 --set optim.warmup_steps=1
    --set checkpoint.every_steps=2 --set logging.every_steps=1)
fi
stop=10
[[ "$device" == cpu ]] && stop=2

# Runs `train` with $launch (an array of VAR=VALUE set for it); $1 names the run.
status=0
run() {
  local name=$1
  shift
  local start code
  start=$(date +%s.%N)
  env "${launch[@]}" "$train" "$@" > "$work/$name.json" 2> "$work/$name.log"
  code=$?
  local line
  line="$name: exit $code after $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s; $(tail -n 1 "$work/$name.json")"
  echo "$line" | tee -a "$summary"
  if [[ $code -ne 0 ]]; then
    tail -n 20 "$work/$name.log"
    status=1
  fi
}

# torchrun's variables for rank 0 of a world of one, the store on a free loopback port.
one_rank_launch() {
  launch=(RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1
    "MASTER_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')")
}

for precision in fp32 bf16; do
  [[ "$device" == cpu && "$precision" == bf16 ]] && continue
  if ((gpus >= 2)); then
    echo "== $backend, $gpus GPUs (one rank each, --nproc), $precision, SyncBatchNorm over all"
    launch=()
    ranks=(--nproc "$gpus" --set "distributed.sync_bn_group_size=$gpus")
  else
    echo "== $backend, one rank through a process group of one (RANK=0 WORLD_SIZE=1), $precision"
    one_rank_launch
    ranks=(--set distributed.process_group_for_one_rank=true)
  fi
  run "$backend-$precision-a" "${common[@]}" --device "$device" "${ranks[@]}" \
    --set "precision=$precision" --run-dir "$work/$backend-$precision" --stop-after "$stop"
  run "$backend-$precision-b" "${common[@]}" --device "$device" "${ranks[@]}" \
    --set "precision=$precision" --run-dir "$work/$backend-$precision" --resume
done

if ((gpus < 2)); then
  # One rank through the process group against the same 20 steps without one: the group's
  # all-reduces (gradients, Sinkhorn's sums, the batch size) must leave the training as it was.
  # cuDNN picks its algorithms per run, so on CUDA the losses agree closely, not bit for bit.
  echo "== the same $backend fp32 run without a process group, for comparison"
  launch=()
  run "plain-fp32" "${common[@]}" --device "$device" --set precision=fp32 \
    --run-dir "$work/plain-fp32"
  python3 - "$work/$backend-fp32/metrics.jsonl" "$work/plain-fp32/metrics.jsonl" <<'EOF_PY' | tee -a "$summary"
import json, sys
def losses(path):
    return {r["step"]: r["train/loss"] for r in map(json.loads, open(path)) if "train/loss" in r}
group, plain = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(group) & set(plain))
worst = max(abs(group[s] - plain[s]) / abs(plain[s]) for s in steps)
print("loss through the process group against without, steps", steps, ":",
      ", ".join(f"{group[s]:.5f}/{plain[s]:.5f}" for s in steps),
      f"; largest relative difference {worst:.2e}")
EOF_PY
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi

if ((timing_steps > 0 && gpus < 2)); then
  echo "== RegNetY-8GF bf16, batch 64, $timing_steps steps: through a process group of one, without, through again"
  timing=(--config configs/swav-regnety-400mf.toml --device "$device" --set "data.url=$data"
    --set "data.threads=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --set model=8GF
    --set data.batch_size=64 --set "schedule.steps=$timing_steps" --set "optim.warmup_steps=$(( timing_steps / 8 ))"
    --set checkpoint.every_steps=1000000 --set logging.every_steps=10)
  if [[ "$device" == cuda ]]; then timing+=(--set precision=bf16); else timing+=(--set precision=fp32); fi
  for name in t-group t-plain t-group2; do
    if [[ $name == t-plain ]]; then
      launch=()
      run "$name" "${timing[@]}" --run-dir "$work/$name"
    else
      one_rank_launch
      run "$name" "${timing[@]}" --set "distributed.backend=\"$backend\"" \
        --set distributed.process_group_for_one_rank=true --run-dir "$work/$name"
    fi
    cp "$work/$name/metrics.jsonl" "$out/$name-metrics.jsonl" 2>/dev/null
  done
fi

echo "== gloo, 2 CPU ranks (--nproc 2), fp32"
launch=()
run gloo-cpu "${common[@]}" --device cpu --set 'distributed.backend="gloo"' --set precision=fp32 \
  --set data.batch_size=2 --set schedule.steps=4 --set optim.warmup_steps=1 --set checkpoint.every_steps=4 \
  --nproc 2 --run-dir "$work/gloo-cpu"

for f in "$work"/*.log; do echo "==== $f"; cat "$f"; done > "$out/dist-logs.txt"
exit $status
