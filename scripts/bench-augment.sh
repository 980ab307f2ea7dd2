#!/usr/bin/env bash
# Augment benchmark: the Rust multi-crop pipeline (`augment bench`) against SwAV's PIL
# reference pipeline on the same stored images, side by side in each round. Writes its results
# into docs/benchmarks.md (between the "augment benchmark" markers) and prints them.
# Needs scripts/setup.sh and scripts/fetch-testdata.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release -p augment --bin augment -p ingest --bin ingest
exec .venv/bin/python scripts/bench_augment.py "$@"
