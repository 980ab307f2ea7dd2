#!/usr/bin/env bash
# Trainer benchmark on CPU: seconds per SwAV step of RegNetY-400MF at batch 32 with
# 2x224 + 6x96 crops in `train` and in the same step written in PyTorch
# (scripts/train_reference_step.py), side by side in each round, and the data-wait share with
# the augmenter on the spare core. Writes its results into docs/benchmarks.md (between the
# "train benchmark" markers) and prints them. Needs scripts/setup.sh and
# scripts/fetch-testdata.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release -p trainer --bin train -p ingest --bin ingest
exec .venv/bin/python scripts/bench_train.py "$@"
