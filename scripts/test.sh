#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace, then the Python checks in tests/python/.
# First runs scripts/setup.sh, scripts/fetch-testdata.sh and scripts/install-test-servers.sh
# (idempotent); tests that miss their material fail with the command to run, they never skip.
# Extra arguments go to `cargo test` (a test name filter, `-- --nocapture`, ...).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
# Everything the tests need, installed idempotently (seconds when already there).
bash scripts/setup.sh
bash scripts/fetch-testdata.sh
bash scripts/install-test-servers.sh
echo "test data cache: $SEER_CACHE"

# Why the default (dev) profile and not --release: the workspace's dev profile already builds
# every dependency at opt-level 3 (image decoding, resizing, hashing, object_store, libtorch
# bindings: where test time goes), so --release would mostly buy opt-level 3 for our own crates
# at the price of compiling them slower, and of a second full set of artifacts beside the dev
# ones that `cargo build` and editors already keep up to date. On 2 cores a clean build
# dominates a CI run, so the profile that compiles less is the faster one end to end. If a hot
# loop in our own code makes tests slow, raise that crate's opt-level in [profile.dev.package]
# rather than switching the whole run to release.
# A clean debug build of the workspace with its test binaries takes about 3.5 GB under target/
# (measured: 3.2 GB), and the linker needs room beside it.
if [[ ! -d "$root/target/debug/deps" ]]; then
  seer_require_disk "$root" 6 "a clean test build of the workspace (target/)"
fi
start=$(date +%s.%N)
cargo test --workspace "$@"
seer_elapsed "$start" "cargo test"

python_tests=(tests/python/test_*.py)
if [[ -e "${python_tests[0]}" ]]; then
  [[ -x .venv/bin/python ]] || { echo ".venv is missing: run scripts/setup.sh" >&2; exit 1; }
  start=$(date +%s.%N)
  .venv/bin/python -m unittest discover --start-directory tests/python --pattern 'test_*.py' -v
  seer_elapsed "$start" "python checks"
fi
