"""Runs the ingest benchmark; see scripts/bench-ingest.sh."""
import argparse, csv, glob, json, os, platform, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cache = os.environ["SEER_CACHE"]
ingest = os.path.join(root, "target/release/ingest")
floor = os.path.join(root, "target/release/examples/floor")
decoders = os.path.join(root, "target/release/examples/decoders")

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
args = parser.parse_args()

# The benchmark set: every JPEG photo of 0.5 to 2 MP in the fetched photo set.
bench = os.path.join(cache, "bench-0.5-2mp")
if not os.path.isdir(bench):
    os.makedirs(bench + ".tmp", exist_ok=True)
    with open(os.path.join(cache, "photos.tsv")) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            pixels = int(row["width"]) * int(row["height"])
            if row["format"] == "jpeg" and 500_000 <= pixels <= 2_000_000:
                target = os.path.join(bench + ".tmp", row["path"].replace("/", "__"))
                shutil.copyfile(os.path.join(cache, "photos", row["path"]), target)
    os.rename(bench + ".tmp", bench)
files = sorted(f for f in os.listdir(bench) if f.endswith(".jpg"))
n_images = len(files)
mp = 0.0
with open(os.path.join(cache, "photos.tsv")) as f:
    for row in csv.DictReader(f, delimiter="\t"):
        if row["path"].replace("/", "__") in set(files):
            mp += int(row["width"]) * int(row["height"]) / 1e6
bytes_in = sum(os.path.getsize(os.path.join(bench, f)) for f in files)
print(f"benchmark set: {n_images} JPEGs, {mp / n_images:.2f} MP mean, {bytes_in / 1e6:.1f} MB", flush=True)

def timed(cmd, env=None):
    """Runs cmd under GNU time; returns (wall seconds, peak RSS MiB, stdout)."""
    out = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M"] + cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    wall, rss = re.search(r"TIME ([\d.]+) (\d+)", out.stderr).groups()
    return float(wall), int(rss) / 1024, out.stdout

def stages(dataset):
    total = {}
    for path in glob.glob(os.path.join(dataset, "*_stats.json")):
        with open(path) as f:
            for k, v in json.load(f)["stage_seconds"].items():
                total[k] = total.get(k, 0) + v
    return total

def spread(values):
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

# The machine's speed drifts (shared virtual machines): every round runs each configuration
# once, back to back, and the ratios are taken within a round, then their median reported.
def floor_rate(threads=1):
    out = subprocess.run([floor, bench, "--passes", "1", "--threads", str(threads)], capture_output=True, text=True, check=True).stdout
    return float(re.search(r"([\d.]+) images/s", out).group(1))

def floor_pair():
    """Two floor processes side by side: what the hardware gives two independent threads."""
    procs = [subprocess.Popen([floor, bench, "--passes", "1"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    return sum(float(re.search(r"([\d.]+) images/s", p.communicate()[0]).group(1)) for p in procs)

def decode_rates():
    """Images/s of JPEG decoding alone on one thread, per decoder path (the ceiling)."""
    out = subprocess.run([decoders, bench, "--rounds", "1"], capture_output=True, text=True, check=True).stdout
    line = re.search(r"round 0: images/s (.*)", out).group(1)
    return {name: float(rate) for name, rate in (part.rsplit(" ", 1) for part in line.split(", "))}

def cpu_times():
    """The machine's CPU time counters (user, nice, system, idle, ...) from /proc/stat."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]

def job(source, workers, env=None, output_base=None):
    out_dir = tempfile.mkdtemp(prefix="bench-ingest-")
    target = out_dir if output_base is None else f"{output_base}/{os.path.basename(out_dir)}"
    before = cpu_times()
    wall, peak, _ = timed([ingest, "run", source, "-o", target, "--workers", str(workers), "--samples-per-shard", "100", "--no-progress"], env=env)
    spent = [b - a for a, b in zip(before, cpu_times())]
    idle_share = 100 * spent[3] / max(1, sum(spent))
    stage_totals = stages(out_dir) if output_base is None else None
    shutil.rmtree(out_dir)
    return n_images / wall, peak, stage_totals, idle_share

# s3s-fs serves a folder whose subfolders are buckets: stage the set as bucket/raw/.
s3_data = tempfile.mkdtemp(prefix="bench-s3-")
shutil.copytree(bench, os.path.join(s3_data, "bench", "raw"))
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
server = subprocess.Popen([os.path.join(os.environ["SEER_TOOLS"], "bin/s3s-fs"), "--host", "127.0.0.1", "--port", str(port), "--access-key", "bench", "--secret-key", "benchsecret", s3_data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
s3_env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="benchsecret", AWS_ENDPOINT=f"http://127.0.0.1:{port}", AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1", AWS_VIRTUAL_HOSTED_STYLE_REQUEST="false")
labels = ["decode", "floor", "floor pair", "floor threads", "local, 1 worker", "local, 2 workers", "s3s-fs to s3s-fs, 2 workers"]
results = {label: {"rates": [], "rss": [], "stages": None, "idle": []} for label in labels}
try:
    time.sleep(0.5)
    for round_number in range(args.repeats):
        rates = decode_rates()
        results["decode"]["rates"].append(max(rates.values()))
        results["decode"].setdefault("paths", []).append(max(rates, key=rates.get))
        results["floor"]["rates"].append(floor_rate())
        results["floor pair"]["rates"].append(floor_pair())
        results["floor threads"]["rates"].append(floor_rate(threads=2))
        for label, source, workers, env, base in [
            ("local, 1 worker", bench, 1, None, None),
            ("local, 2 workers", bench, 2, None, None),
            ("s3s-fs to s3s-fs, 2 workers", "s3://bench/raw", 2, s3_env, "s3://bench/out"),
        ]:
            rate, peak, stage_totals, idle_share = job(source, workers, env, base)
            results[label]["rates"].append(rate)
            results[label]["idle"].append(idle_share)
            results[label]["rss"].append(peak)
            results[label]["stages"] = stage_totals or results[label]["stages"]
        print(f"round {round_number + 1}:", {k: round(v["rates"][-1], 1) for k, v in results.items()}, flush=True)
finally:
    server.send_signal(signal.SIGTERM); server.wait()
    shutil.rmtree(s3_data)
floor_rates = results["floor"]["rates"]

# libjpeg-turbo's own benchmark on the set's most common kind of photo: the decode ceiling.
tjbench = sorted(glob.glob(os.path.join(root, "target/release/build/turbojpeg-sys-*/out/bin/tjbench")))
tj_line = ""
sample = next((f for f in files if f.startswith("endless-sky-2x__")), files[0])
if tjbench:
    out = subprocess.run([tjbench[-1], os.path.join(bench, sample), "-benchtime", "2", "-warmup", "1", "-nowrite"], capture_output=True, text=True).stdout
    fps = re.search(r"Decompress.*?Frame rate:\s+([\d.]+)", out, re.S)
    kind = re.search(r"8-bit JPEG \(([^)]*)\)", out)
    if fps:
        tj_line = f"- Decode ceiling: libjpeg-turbo's tjbench decodes {sample} ({kind.group(1) if kind else ''}, {os.path.getsize(os.path.join(bench, sample)) // 1000} KB) at {float(fps.group(1)):.0f} images/s on one core here, before any resize, encode or hashing."

def ratio(a, b, scale=1.0):
    values = [x / y * scale for x, y in zip(results[a]["rates"], results[b]["rates"])]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

floor_median = statistics.median(floor_rates)
two = statistics.median(results["local, 2 workers"]["rates"])
st = results["local, 2 workers"]["stages"]
st_total = sum(st.values())
cpu = platform.processor() or platform.machine()
try:
    with open("/proc/cpuinfo") as f:
        cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
except (OSError, StopIteration):
    pass
lines = [
    "<!-- ingest benchmark: start -->",
    "## Ingest",
    "",
    f"Machine: {cpu}, {os.cpu_count()} cores. Command: `scripts/bench-ingest.sh` ({args.repeats} rounds; each round runs every row once, back to back; "
    "median (min-max) over rounds, and ratios taken within a round). "
    f"Input: the {n_images} JPEG photos of 0.5-2 MP in the fetched photo set ({mp / n_images:.2f} MP mean, {bytes_in / 1e6:.0f} MB), "
    "default settings (shorter side to 512, q90, originals kept when already small enough), 100 samples per shard. "
    "Job rates are whole-command wall time (start, planning, publishing included).",
    "",
    "| run | images/s | images/s per core | MB/s in | peak RSS MiB |",
    "|---|---|---|---|---|",
    f"| decode alone, 1 thread: the fastest of the `decoders` example's paths in each round ({', '.join(sorted(set(results['decode']['paths'])))}) | {spread(results['decode']['rates'])} | {statistics.median(results['decode']['rates']):.1f} | - | - |",
    f"| floor: `process_image` in a tight loop, 1 thread, images in memory | {spread(floor_rates)} | {floor_median:.1f} | {floor_median * bytes_in / n_images / 1e6:.1f} | - |",
    f"| two floor processes side by side (what the hardware gives 2 threads) | {spread(results['floor pair']['rates'])} | {statistics.median(results['floor pair']['rates']) / 2:.1f} | - | - |",
    f"| floor, 2 threads in one process (`floor --threads 2`) | {spread(results['floor threads']['rates'])} | {statistics.median(results['floor threads']['rates']) / 2:.1f} | - | - |",
]
for label, cores in [("local, 1 worker", 1), ("local, 2 workers", 2), ("s3s-fs to s3s-fs, 2 workers", 2)]:
    r = results[label]
    med = statistics.median(r["rates"])
    lines.append(f"| ingest, {label} | {spread(r['rates'])} | {med / cores:.1f} | {med * bytes_in / n_images / 1e6:.1f} | {statistics.median(r['rss']):.0f} |")
lines += [
    "",
    f"- Whole job per core / floor: {ratio('local, 1 worker', 'floor')} with 1 worker, {ratio('local, 2 workers', 'floor', 0.5)} with 2; target: at least 1/1.5 = 0.67.",
    f"- Scaling, 2 workers / 1 worker: {ratio('local, 2 workers', 'local, 1 worker')}; target 1.8. Two independent floor processes: {ratio('floor pair', 'floor')}; two floor threads in one process: {ratio('floor threads', 'floor')}.",
    f"- Target of 200 images/s per core: {'met' if two / 2 >= 200 else 'NOT met'} ({two / 2:.0f} per core with 2 workers; the floor itself is {floor_median:.0f}, and decoding alone, before any resize, encode or hashing, {statistics.median(results['decode']['rates']):.0f}: {ratio('decode', 'floor')} times the floor).",
    f"- Machine idle during the job (`/proc/stat`; 1 worker leaves one of {os.cpu_count()} cores to I/O): "
    + ", ".join(f"{label} {spread(results[label]['idle'])} %" for label in ["local, 1 worker", "local, 2 workers", "s3s-fs to s3s-fs, 2 workers"]) + ".",
    tj_line,
    "- Time split (2 workers, summed over samples, share of the total): "
    + ", ".join(f"{k} {v / st_total * 100:.0f} %" for k, v in st.items()) + ".",
    "<!-- ingest benchmark: end -->",
]
section = "\n".join(lines) + "\n"
print(section)
if not args.no_write:
    path = os.path.join(root, "docs/benchmarks.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nEvery figure here comes from a script in `scripts/`; rerun it to check.\n\n"
    text = re.sub(r"<!-- ingest benchmark: start -->.*?<!-- ingest benchmark: end -->\n", lambda _: section, text, flags=re.S) if "ingest benchmark: start" in text else text + section
    open(path, "w").write(text)
