#!/usr/bin/env bash
# Installs what building and testing the project needs beyond the Rust toolchain:
#   system packages  cmake, nasm (turbojpeg builds libjpeg-turbo from source), pkg-config,
#                    libgloo-dev (Gloo's headers: the trainer's c10d bridge, trainer/build.rs)
#   .venv            project-local Python with webdataset, pillow, numpy (reference checks in
#                    tests/python/ and the interoperability tests of the shard format), and
#                    torch + torchvision (libtorch for the trainer; augmentation and model references);
#                    with SEER_NCCL=1 also nvidia-cuda-crt and nvidia-cuda-cccl (headers for the
#                    trainer's `nccl` feature)
# Idempotent: apt runs only when a package is missing, pip only when the pinned requirements
# changed since the last successful install (a stamp inside .venv records them).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
start=$(date +%s.%N)
source "$root/scripts/env.sh"

# --- System packages ---------------------------------------------------------------------
system_packages=(cmake nasm pkg-config libgloo-dev)
missing=()
for p in "${system_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "installing system packages: ${missing[*]}"
  # A fresh machine has no package lists; an old one may have stale ones. Update only here,
  # where something is actually missing.
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "system packages: already installed (${system_packages[*]})"
fi

# --- Python virtual environment ------------------------------------------------------------
# Pinned to versions with wheels for CPython 3.11 (the machine's Python).
requirements=(
  webdataset==1.0.2
  pillow==13.0.0
  numpy==2.4.6
  # torch provides libtorch for the trainer (tch 0.24 binds libtorch 2.11.0, built with
  # LIBTORCH_USE_PYTORCH=1) and the PyTorch references the trainer is tested against;
  # torchvision 0.26.0 is the release built against torch 2.11.0 (augmentation and RegNetY
  # references). The wheel is a CUDA build: about 5 GB with its CUDA libraries.
  torch==2.11.0
  torchvision==0.26.0
  safetensors==0.7.0
  # TensorBoard's own event reader checks the trainer's hand-written event files
  # (trainer/tests/metrics_tensorboard.rs via tests/python/read_tensorboard.py).
  tensorboard==2.20.0
)
venv="$root/.venv"
stamp="$venv/.seer-requirements"
wanted=$(printf '%s\n' "${requirements[@]}" | grep -v '^ *#' | sort)
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
  echo "python venv: up to date at $venv"
else
  # torch with its CUDA libraries is about 5 GB installed, and pip holds the downloaded
  # wheels (about 4 GB) in a temporary folder while it installs them.
  seer_require_disk "$root" 12 "installing the Python venv (torch with its CUDA libraries)"
  seer_require_disk "${TMPDIR:-/tmp}" 5 "pip's temporary copies of the downloaded wheels"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  echo "python venv: installing into $venv"
  # --no-cache-dir: a cached copy of the wheels would take another 4 GB of disk for a venv
  # that is installed once per clone.
  # shellcheck disable=SC2086 # one requirement per word on purpose
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir $wanted
  "$venv/bin/python" -c 'import webdataset, PIL, numpy, torch, torchvision, safetensors, tensorboard'
  echo "$wanted" > "$stamp"
fi
# SEER_NCCL=1: the CUDA headers that ProcessGroupNCCL's header needs besides the wheel's
# (`cargo build --features nccl`): CUDA's crt/ and CCCL, at the CUDA runtime's version.
if [[ "${SEER_NCCL:-0}" == 1 ]]; then
  cuda=$("$venv/bin/python" -c 'import importlib.metadata as m; print(".".join(m.version("nvidia-cuda-runtime").split(".")[:2]))')
  if "$venv/bin/python" -c 'import importlib.metadata as m; m.version("nvidia-cuda-crt"); m.version("nvidia-cuda-cccl")' 2>/dev/null; then
    echo "nccl headers: already installed"
  else
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
      "nvidia-cuda-crt==$cuda.*" "nvidia-cuda-cccl==$cuda.*"
  fi
fi
# tch finds libtorch here (.cargo/config.toml): the torch package folder, with include/ and lib/.
torch_dir=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" "$venv/libtorch"

seer_elapsed "$start" "setup"
