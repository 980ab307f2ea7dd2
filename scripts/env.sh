# Shared environment for the project's scripts; source it, do not run it.
#
# SEER_CACHE holds everything fetched or built outside the repository: test
# photos, hostile inputs and the test servers. It defaults to
# ~/.cache/seer-rs so that every clone on a machine shares one copy.
export SEER_CACHE="${SEER_CACHE:-$HOME/.cache/seer-rs}"
export SEER_TOOLS="$SEER_CACHE/tools"

# The test harness (seer-tests) finds s3s-fs and azurite-blob here first, then on PATH.
case ":$PATH:" in
  *":$SEER_TOOLS/bin:"*) ;;
  *) export PATH="$SEER_TOOLS/bin:$SEER_TOOLS/azurite/node_modules/.bin:$PATH" ;;
esac

# Prints "name: 12.3 s" for a step that started at $1 (seconds since the epoch, with fraction).
seer_elapsed() {
  local start=$1 name=$2
  awk -v s="$start" -v e="$(date +%s.%N)" -v n="$name" 'BEGIN { printf "%s: %.1f s\n", n, e - s }'
}

# Fails with a clear message when the file system holding $1 has less than $2 GiB free;
# $3 says what the space is for. Better than a build or pip install dying half way with
# "No space left on device".
seer_require_disk() {
  local dir=$1 need_gib=$2 what=$3 avail_kib
  mkdir -p "$dir"
  avail_kib=$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')
  if ((avail_kib < need_gib * 1024 * 1024)); then
    echo "error: $what needs about $need_gib GiB free on the file system of $dir;" \
      "it has $((avail_kib / 1024 / 1024)) GiB. Free some space (old target/ folders," \
      "stale clones in /tmp) and run again." >&2
    return 1
  fi
}

# For the GPU checks on a machine without Rust: fails unless the kit $1 (gpu-kit/, made by
# `scripts/gpu-check.sh --prepare`) has its train binary and shards, then puts torch's lib
# folder (found through python3) on LD_LIBRARY_PATH; $2 names the calling script.
seer_use_gpu_kit() {
  local kit=$1 caller=$2 torch_lib
  if [[ ! -x "$kit/train" || ! -d "$kit/shards" ]]; then
    echo "$caller: $kit/train or $kit/shards missing: run scripts/gpu-check.sh --prepare" \
      "on the build machine and carry gpu-kit" >&2
    return 2
  fi
  torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" || return 1
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
