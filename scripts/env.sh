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
