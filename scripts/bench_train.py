"""Runs the trainer benchmark; see scripts/bench-train.sh."""
import argparse, json, os, platform, shutil, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import cpu_model, print_section, spread, write_section  # noqa: E402

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cache = os.environ["SEER_CACHE"]
train = os.path.join(root, "target/release/train")
ingest = os.path.join(root, "target/release/ingest")
python = os.path.join(root, ".venv/bin/python")
reference = os.path.join(root, "scripts/train_reference_step.py")

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps first in each run")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
args = parser.parse_args()

# The data: the fetched real photos as `ingest` stores them by default (shorter side 512, JPEG);
# the augment benchmark's set.
dataset = os.path.join(cache, "augment-bench-dataset")
if not os.path.exists(os.path.join(dataset, "manifest.json")):
    subprocess.run([ingest, "run", os.path.join(cache, "photos"), "-o", dataset, "--samples-per-shard", "100", "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)

config = os.path.join(root, "configs/swav-regnety-400mf.toml")
total = args.warmup + args.steps
# configs/swav-regnety-400mf.toml on CPU: float32, one torch thread (the other core runs the
# augmenter), batch 32; every step logged; no checkpoint within the run.
overrides = ["precision=fp32", "threads=1", "data.threads=1", f"data.batch_size={args.batch}",
             f"data.url={dataset}", f"schedule.steps={total}", "logging.every_steps=1",
             f"checkpoint.every_steps={total}", "optim.warmup_steps=1"]


def ours():
    run_dir = tempfile.mkdtemp(prefix="bench-train-")
    try:
        command = [train, "--config", config, "--run-dir", run_dir]
        for o in overrides:
            command += ["--set", o]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"train failed:\n{out.stderr[-3000:]}")
        rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"train/step_time"' in l]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rows = [r for r in rows if r["step"] > args.warmup]
    step = [r["train/step_time"] for r in rows]
    wait = [r["train/step_time"] * r["train/data_wait"] for r in rows]
    return {"step": statistics.median(step), "compute": statistics.median(s - w for s, w in zip(step, wait)),
            "wait_share": sum(wait) / sum(step)}


def pytorch():
    out = subprocess.run([python, reference, "--batch", str(args.batch), "--steps", str(args.steps),
                          "--warmup", str(args.warmup), "--threads", "1"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"reference failed:\n{out.stderr[-3000:]}")
    return statistics.median(json.loads(out.stdout)["step_s"])


# The machine's speed drifts (shared virtual machines): each round runs both, back to back, in
# alternating order, and the ratio is taken within a round.
runs = {"ours_step": [], "ours_compute": [], "ours_wait": [], "torch": []}
loads = [os.getloadavg()[0]]
for r in range(args.repeats):
    if r % 2 == 0:
        a = ours()
        t = pytorch()
    else:
        t = pytorch()
        a = ours()
    runs["ours_step"].append(a["step"])
    runs["ours_compute"].append(a["compute"])
    runs["ours_wait"].append(a["wait_share"])
    runs["torch"].append(t)
    loads.append(os.getloadavg()[0])
    print(f"round {r + 1}: train step {a['step']:.2f} s (compute {a['compute']:.2f} s, data wait {a['wait_share'] * 100:.1f} %), "
          f"PyTorch step {t:.2f} s", flush=True)


ratio = [a / t for a, t in zip(runs["ours_compute"], runs["torch"])]
ratio_total = [a / t for a, t in zip(runs["ours_step"], runs["torch"])]
cpu = cpu_model()
lines = [
    "## Train: SwAV steps on CPU against the same step in PyTorch",
    "",
    f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}, torch 2.11.0 (the venv's, which `train` links).",
    f"- Command: `scripts/bench-train.sh --repeats {args.repeats} --steps {args.steps} --warmup {args.warmup}`.",
    f"- `train`: `configs/swav-regnety-400mf.toml` (RegNetY-400MF, VISSL head 440-440-128 with BN, 3,000 prototypes, "
    f"Sinkhorn 3 iterations, LARC) at batch {args.batch} with 2x224 + 6x96 crops, float32, one torch thread, the augmenter "
    "on one thread (the spare core) reading the real photos of the augment benchmark from a local folder.",
    "- PyTorch: `scripts/train_reference_step.py`: torchvision's `regnet_y_400mf` with the same head, loss and "
    "optimizer (the transcriptions of SwAV, VISSL and apex that the trainer's reference tests use), one thread, "
    "random uint8 crops of the same shapes normalized in the step, as `train` does.",
    f"- {args.warmup} untimed steps, then the median of {args.steps} steps per run; {args.repeats} rounds, both "
    "back to back in alternating order; medians over rounds with the range in brackets; ratios within a round.",
    f"- Load average (1 min) at the start and after each round: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores "
    "(above 2, other work shared the machine and slowed both sides).",
    "",
    "| | seconds per step |",
    "|---|---|",
    f"| `train`, whole step (data wait included) | {spread(runs['ours_step'], 2)} |",
    f"| `train`, step without the data wait | {spread(runs['ours_compute'], 2)} |",
    f"| PyTorch | {spread(runs['torch'], 2)} |",
    "",
    f"- `train` / PyTorch, without the data wait: **{spread(ratio, 3)}**; whole step: {spread(ratio_total, 3)}.",
    f"- Data-wait share of `train`'s step time, the augmenter on the spare core: {spread(runs['ours_wait'], 2, 100)} %.",
]
print_section("train benchmark", lines)
if not args.no_write:
    write_section(root, "train benchmark", lines)
