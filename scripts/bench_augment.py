"""Runs the augment benchmark; see scripts/bench-augment.sh."""
import argparse, json, os, platform, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import cpu_model, print_section, spread, write_section  # noqa: E402

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cache = os.environ["SEER_CACHE"]
augment = os.path.join(root, "target/release/augment")
ingest = os.path.join(root, "target/release/ingest")
python = os.path.join(root, ".venv/bin/python")
reference = os.path.join(root, "scripts/augment_reference_pipeline.py")

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--seconds", type=float, default=15.0)
parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
args = parser.parse_args()

# The benchmark set: the fetched real photos as `ingest` stores them by default (shorter side
# 512, JPEG), in shards of 100.
dataset = os.path.join(cache, "augment-bench-dataset")
if not os.path.exists(os.path.join(dataset, "manifest.json")):
    subprocess.run([ingest, "run", os.path.join(cache, "photos"), "-o", dataset, "--samples-per-shard", "100", "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
manifest = json.load(open(os.path.join(dataset, "manifest.json")))
n_images = sum(s["samples"] for s in manifest["shards"])
n_bytes = sum(s["bytes"] for s in manifest["shards"])
print(f"benchmark set: {n_images} stored images in {len(manifest['shards'])} shards, {n_bytes / 1e6:.1f} MB", flush=True)


def rust(preset, threads):
    out = subprocess.run([augment, "bench", "--data", dataset, "--preset", preset, "--threads", str(threads),
                          "--seconds", str(args.seconds), "--warmup", "3", "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"augment bench failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def pil(preset, processes):
    """PIL reference in `processes` processes side by side; the sum of their rates."""
    procs = [subprocess.Popen([python, reference, dataset, "--preset", preset, "--seconds", str(args.seconds)],
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    rates = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            sys.exit("reference pipeline failed")
        rates.append(json.loads(out)["images_per_s"])
    return sum(rates)


# The machine's speed drifts (shared virtual machines): every round runs each configuration
# once, back to back, and ratios are taken within a round.
runs = {k: [] for k in ["swav1", "swav2", "two1", "two2", "pil1", "pil2", "piltwo1"]}
reports = []
for r in range(args.repeats):
    swav1 = rust("swav", 1)
    reports.append(swav1)
    runs["swav1"].append(swav1["images_per_s"])
    runs["swav2"].append(rust("swav", 2)["images_per_s"])
    runs["two1"].append(rust("swav-2x224", 1)["images_per_s"])
    runs["two2"].append(rust("swav-2x224", 2)["images_per_s"])
    runs["pil1"].append(pil("swav", 1))
    runs["pil2"].append(pil("swav", 2))
    runs["piltwo1"].append(pil("swav-2x224", 1))
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)


def ratios(a, b):
    return [x / y for x, y in zip(runs[a], runs[b])]


cpu = cpu_model()
stage_names = ["decode", "crop_resize", "color", "blur", "pack"]
stage_ms = {s: statistics.median(r["stage_ms_per_image"][s] for r in reports) for s in stage_names}
stage_total = sum(stage_ms.values())
rss = [r["peak_rss_mib"] for r in reports]
lines = [
    "## Augment: SwAV multi-crop views from stored shards",
    "",
    f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}; `augment` kernels at "
    f"{', '.join(sorted({r['simd'] for r in reports}))} (the widest this CPU has unless `SEER_SIMD` caps it).",
    f"- Command: `scripts/bench-augment.sh --repeats {args.repeats} --seconds {args.seconds:g}` "
    f"(`augment bench --data DATASET --preset P --threads N --seconds {args.seconds:g} --warmup 3`, u8 NHWC output, batch 32, shuffle buffer 1000).",
    f"- Data: {n_images} real photos stored by `ingest` with its defaults (shorter side 512, JPEG), {len(manifest['shards'])} shards, {n_bytes / 1e6:.1f} MB, read from a local folder.",
    "- Reference: SwAV's own pipeline (`src/multicropdataset.py`: torchvision transforms on PIL images, PIL blur), "
    "torch 2.11.0 / torchvision 0.26.0 / Pillow 13.0.0, one process per core, decoding the same stored images from memory "
    "(`scripts/augment_reference_pipeline.py`).",
    f"- Every round runs all configurations back to back; figures are medians over {args.repeats} rounds with the range in brackets; ratios are taken within a round.",
    "",
    "| recipe | pipeline | 1 core: source images/s | 2 cores: source images/s | 2 cores / 1 core |",
    "|---|---|---|---|---|",
    f"| swav 2x224+6x96 | seer-rs `augment` | {spread(runs['swav1'])} | {spread(runs['swav2'])} | {spread(ratios('swav2', 'swav1'), 2)} |",
    f"| swav 2x224+6x96 | SwAV reference (PIL) | {spread(runs['pil1'])} | {spread(runs['pil2'])} | {spread(ratios('pil2', 'pil1'), 2)} |",
    f"| 2x224 | seer-rs `augment` | {spread(runs['two1'])} | {spread(runs['two2'])} | {spread(ratios('two2', 'two1'), 2)} |",
    f"| 2x224 | SwAV reference (PIL) | {spread(runs['piltwo1'])} | - | - |",
    "",
    f"- seer-rs / reference per core, swav recipe: **{spread(ratios('swav1', 'pil1'), 1)}x**; 2x224: {spread(ratios('two1', 'piltwo1'), 1)}x.",
    f"- The same with both cores busy (2 threads against 2 processes), swav recipe: {spread(ratios('swav2', 'pil2'), 1)}x.",
    f"- Peak RSS of `augment bench` (1 thread, swav): {spread(rss, 0)} MiB.",
    "- Time per source image by stage (1 thread, swav, median): "
    + ", ".join(f"{s.replace('_', ' ')} {stage_ms[s]:.2f} ms ({stage_ms[s] / stage_total * 100:.0f} %)" for s in stage_names)
    + "; reading runs on its own thread and overlaps.",
]
print_section("augment benchmark", lines)
if not args.no_write:
    write_section(root, "augment benchmark", lines)
