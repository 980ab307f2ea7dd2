#!/usr/bin/env bash
# Ingest benchmark: the whole job (local folder and s3s-fs) against the single-thread floor of
# the same per-image work, on real photos of 0.5 to 2 megapixels. Writes its results into
# docs/benchmarks.md (between the "ingest benchmark" markers) and prints them.
# Needs scripts/setup.sh, scripts/fetch-testdata.sh and scripts/install-test-servers.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release -p ingest --bin ingest --example floor --example decoders
exec .venv/bin/python scripts/bench_ingest.py "$@"
