#!/usr/bin/env bash
# Installs the object storage servers that the integration tests start on loopback:
#   s3s-fs 0.14.1  S3 with SigV4 over a local folder  -> $SEER_CACHE/tools/bin/s3s-fs
#   Azurite 3      Azure Blob emulator                 -> $SEER_CACHE/tools/azurite/node_modules/.bin/azurite-blob
# Idempotent: a server whose binary is already there is not reinstalled.
# s3s-fs is pinned to 0.14.1 because later releases need a newer rustc than the
# project's 1.95. A fresh install takes about 2 minutes (mostly compiling s3s-fs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"

S3S_FS_VERSION=0.14.1
AZURITE_VERSION=3

mkdir -p "$SEER_TOOLS"
start=$(date +%s.%N)

s3s_fs="$SEER_TOOLS/bin/s3s-fs"
if [[ -x "$s3s_fs" ]]; then
  echo "s3s-fs: already installed at $s3s_fs"
else
  echo "s3s-fs: installing $S3S_FS_VERSION into $SEER_TOOLS (about 2 minutes)"
  # A separate target folder keeps this build out of the workspace's target/.
  CARGO_TARGET_DIR="$SEER_CACHE/build/s3s-fs" \
    cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --root "$SEER_TOOLS"
  rm -rf "$SEER_CACHE/build/s3s-fs"
fi

azurite="$SEER_TOOLS/azurite/node_modules/.bin/azurite-blob"
if [[ -x "$azurite" ]]; then
  echo "azurite: already installed at $azurite"
else
  command -v npm >/dev/null || { echo "npm is required to install Azurite (apt-get install npm)" >&2; exit 1; }
  echo "azurite: installing azurite@$AZURITE_VERSION into $SEER_TOOLS/azurite"
  mkdir -p "$SEER_TOOLS/azurite"
  # A package.json of our own makes npm install here, not in some parent folder.
  [[ -f "$SEER_TOOLS/azurite/package.json" ]] ||
    echo '{ "name": "seer-test-servers", "private": true }' > "$SEER_TOOLS/azurite/package.json"
  (cd "$SEER_TOOLS/azurite" && npm install --no-fund --no-audit --loglevel=error "azurite@$AZURITE_VERSION")
fi

"$s3s_fs" --help >/dev/null
"$azurite" --help >/dev/null
seer_elapsed "$start" "install-test-servers"
