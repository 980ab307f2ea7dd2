#!/usr/bin/env bash
# The GPU check: runs a release `train` binary built elsewhere on a CUDA machine that has torch
# 2.11.0 in its python3 but no Rust and no network, fed by the real augmenter from a small shard
# set carried along, and prints images/s, data-wait share and GPU memory.
#
# Prepare the kit on the build machine (writes ./gpu-kit: the stripped binary and ~20 MB of
# shards; ignored by git, so it travels to a device only when carried):
#
#   scripts/gpu-check.sh --prepare
#
# then, on the GPU machine, in the repository root with gpu-kit/ beside it:
#
#   scripts/gpu-check.sh [--out DIR] [--work DIR] [--steps N] [--batch B] [--model 8GF]
#
# Runs (the augmenter alone first, for scale: the images/s it delivers without a consumer), each with its run folder under the work folder (default: DIR), then copies to DIR
# (default $OUT, else runs/gpu-check) the few files worth keeping: logs.txt (every run's log),
# main-metrics.jsonl, main-loss.png and summary.json:
#   1. smoke:  RegNetY-400MF, fp16 with dynamic loss scaling, 30 steps with a checkpoint at
#              step 20 and a stop there, then --resume to step 30: CUDA, pinned staging,
#              cuDNN, checkpoint and resume on the device;
#   2. main:   RegNetY-8GF (--model) in bf16, SwAV's 2x224 + 6x96 crops, batch 64 (--batch),
#              N steps (--steps, default 300), the augmenter on all but one core;
#   3. dist:   scripts/gpu-check-dist.sh: NCCL training, one rank per GPU (one GPU: a process
#              group of one), stop and resume, fp32 and bf16; then Gloo on 2 CPU ranks
#              (dist-summary.txt, dist-logs.txt);
# and writes summary.json: images/s (median over logging windows after the first two, which
# hold cuDNN's algorithm search), data-wait share, step time, and the GPU memory nvidia-smi
# reports at its peak (what the process holds: PyTorch's caching allocator included).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
kit="$root/gpu-kit"

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  source scripts/env.sh
  # The `nccl` feature compiles ProcessGroupNCCL into the bridge (scripts/gpu-check-dist.sh);
  # its CUDA headers come from PyPI packages that SEER_NCCL=1 adds to the venv.
  SEER_NCCL=1 bash scripts/setup.sh
  cargo build --release -p trainer --features trainer/nccl -p ingest -p augment
  rm -rf "$kit"
  mkdir -p "$kit"
  strip -o "$kit/train" target/release/train
  strip -o "$kit/augment" target/release/augment
  # Every other photo of the quick start's set with the short side at most 320 px: ~560
  # photos, ~20 MB, so the kit travels within the device tool's 64 MiB.
  half="$(mktemp -d)"
  find "$SEER_CACHE/photos" -type f | sort | awk 'NR % 2 == 1' | while read -r f; do
    rel="${f#"$SEER_CACHE/photos/"}"
    ln -s "$f" "$half/${rel//\//_}"
  done
  target/release/ingest run "$half" -o "$kit/shards" --max-short-side 320 \
    --samples-per-shard 200 --no-progress
  rm -rf "$half"
  du -sh "$kit"
  exit 0
fi

out="${OUT:-$root/runs/gpu-check}"
work=""
steps=300
batch=64
model=8GF
device=cuda
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    # --device cpu: a dry run of this script's own logic (float32, no GPU figures).
    --device) device="$2"; shift 2 ;;
    *) echo "gpu-check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
work="${work:-$out}"
mkdir -p "$out" "$work"
train="$kit/train"
data="$kit/shards"
source scripts/env.sh
seer_use_gpu_kit "$kit" gpu-check.sh || exit $?
echo "== machine"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cores: $(nproc)"
echo "== libtorch_cuda.so NEEDED by train:"
readelf -d "$train" | grep -E 'NEEDED.*torch' || true
threads=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))

# Runs `train` with a memory sampler beside it; $1 is the run's name, the rest goes to train.
run_train() {
  local name=$1
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$work/$name.mem" &
  local sampler=$!
  local start
  start=$(date +%s.%N)
  "$train" "$@" > "$work/$name.json" 2> "$work/$name.log"
  local code=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  echo "$name: exit $code after $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s; $(cat "$work/$name.json")"
  if [[ $code -ne 0 ]]; then
    tail -n 20 "$work/$name.log"
  fi
  return $code
}

common=(--config configs/swav-regnety-400mf.toml --device "$device"
  --set "data.url=$data" --set "data.threads=$threads")
half=fp16
main_precision=bf16
smoke=(--set data.batch_size=32 --set schedule.steps=30 --set optim.warmup_steps=10
  --set checkpoint.every_steps=20)
smoke_stop=20
log_every=10
main_log_every=20
if [[ "$device" == cpu ]]; then
  half=fp32
  main_precision=fp32
  smoke=(--set data.batch_size=2 --set schedule.steps=3 --set optim.warmup_steps=1
    --set checkpoint.every_steps=2)
  smoke_stop=2
  log_every=1
  main_log_every=1
fi
common+=(--set "logging.every_steps=$log_every")

echo "== 1. smoke: RegNetY-400MF $half, batch 32, stop at step 20 with a checkpoint, resume to 30"
rm -rf "$work/smoke"
run_train smoke-a "${common[@]}" --run-dir "$work/smoke" --set "precision=$half" "${smoke[@]}" \
  --stop-after "$smoke_stop"
run_train smoke-b "${common[@]}" --run-dir "$work/smoke" --set "precision=$half" "${smoke[@]}" \
  --resume

echo "== augmenter alone: the images/s it can feed with $threads threads (swav, 10 s)"
if [[ -x "$kit/augment" ]]; then
  "$kit/augment" bench --data "$data" --preset swav --threads "$threads" --seconds 10 --warmup 3 \
    --batch-size "$batch" --json > "$work/augment-bench.json" 2> "$work/augment-bench.log" \
    && cat "$work/augment-bench.json"
fi

echo "== 2. main: RegNetY-$model $main_precision, batch $batch, 2x224 + 6x96, $steps steps, $threads augmenter threads"
rm -rf "$work/main"
run_train main "${common[@]}" --run-dir "$work/main" --set "model=$model" --set "precision=$main_precision" \
  --set "data.batch_size=$batch" --set "schedule.steps=$steps" --set "optim.warmup_steps=$(( steps / 6 ))" \
  --set "checkpoint.every_steps=$steps" --set "logging.every_steps=$main_log_every"

python3 - "$work" "$model" "$batch" "$threads" "$main_precision" <<'EOF'
import json, os, statistics, sys
out, model, batch, threads, precision = sys.argv[1:4] + [int(sys.argv[4]), sys.argv[5]]
batch = int(batch)
summary = {}
for name in ["smoke", "main"]:
    path = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(path):
        continue
    rows = [json.loads(l) for l in open(path) if '"train/imgs_per_s"' in l]
    if not rows:
        continue
    steady = rows[2:] or rows
    mem = []
    for f in [name + ".mem", name + "-a.mem", name + "-b.mem"]:
        p = os.path.join(out, f)
        if os.path.exists(p):
            mem += [int(x) for x in open(p).read().split() if x.strip().isdigit()]
    ips = [r["train/imgs_per_s"] for r in steady]
    wait = [r["train/data_wait"] for r in steady]
    summary[name] = {
        "windows": len(steady),
        "imgs_per_s_median": statistics.median(ips),
        "imgs_per_s_min": min(ips), "imgs_per_s_max": max(ips),
        "data_wait_share_median": statistics.median(wait),
        "step_time_median_s": statistics.median(r["train/step_time"] for r in steady),
        "first_loss": rows[0]["train/loss"], "last_loss": rows[-1]["train/loss"],
        "last_step": rows[-1]["step"],
        "gpu_memory_peak_mib": max(mem) if mem else None,
    }
bench = os.path.join(out, "augment-bench.json")
if os.path.exists(bench):
    summary["augmenter_alone_imgs_per_s"] = json.load(open(bench)).get("images_per_s")
summary["main_config"] = {"model": model, "batch": batch, "precision": precision,
                          "crops": "2x224+6x96", "augment_threads": threads}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
if [[ "$work" != "$out" ]]; then
  cp "$work/summary.json" "$out/" 2>/dev/null
  cp "$work/main/metrics.jsonl" "$out/main-metrics.jsonl" 2>/dev/null
  cp "$work/main/loss.png" "$out/main-loss.png" 2>/dev/null
  for f in "$work"/*.log; do echo "==== $f"; cat "$f"; done > "$out/logs.txt"
fi

echo "== 3. dist: NCCL (scripts/gpu-check-dist.sh)"
bash scripts/gpu-check-dist.sh --out "$out" --device "$device"
