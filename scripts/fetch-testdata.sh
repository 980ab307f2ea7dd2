#!/usr/bin/env bash
# Fetches the real test material into $SEER_CACHE (default ~/.cache/seer-rs), outside the
# repository: its licenses are mixed and it is about 2 GB, so none of it is committed.
# See the "Cache layout" section of scripts/README.md for what ends up where.
#
# Sources, all through the ordinary package clients:
#   real photos     Debian packages (wallpapers, game art, example data of several libraries)
#   hostile inputs  Pillow 13.0.0's source distribution (Tests/images), gdk-pixbuf-tests,
#                   golang-1.19-src (image testdata), libsixel-examples (corrupted PngSuite)
#   labeled set     dataset-fashion-mnist (for kNN and linear-probe evaluation)
#
# Idempotent: each package is downloaded and unpacked once (a .done file per package), and the
# curated folders carry a stamp; a second run only checks the stamp. A fresh run takes about
# a minute and a half on a 2-core machine (measured numbers are in scripts/README.md).
# Set SEER_FETCH_FORCE=1 to rebuild the curated folders from what is already unpacked.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"

# Bump when the list of sources or the curation changes, so old caches are rebuilt.
RECIPE=2
PHOTO_PACKAGES=(
  endless-sky-data endless-sky-high-dpi labelme-examples kphotoalbum libdlib19.1 opencv-doc
  python3-skimage gnome-control-center-data plasma-workspace-wallpapers mate-backgrounds
  lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 ukui-wallpapers gnome-backgrounds desktop-base
)
HOSTILE_PACKAGES=(gdk-pixbuf-tests golang-1.19-src libsixel-examples)
DATASET_PACKAGES=(dataset-fashion-mnist)
PILLOW_VERSION=13.0.0

stamp="$SEER_CACHE/.testdata.stamp"
echo "test data cache: $SEER_CACHE"
if [[ -z "${SEER_FETCH_FORCE:-}" && -f "$stamp" && "$(cat "$stamp")" == "recipe $RECIPE" ]]; then
  echo "test data already fetched (remove $stamp or set SEER_FETCH_FORCE=1 to redo)"
  exit 0
fi

start=$(date +%s.%N)
debs="$SEER_CACHE/downloads/debs"
unpacked="$SEER_CACHE/unpacked"
mkdir -p "$debs" "$unpacked"

# --- Debian packages -------------------------------------------------------------------
packages=("${PHOTO_PACKAGES[@]}" "${HOSTILE_PACKAGES[@]}" "${DATASET_PACKAGES[@]}")
missing=()
for p in "${packages[@]}"; do
  [[ -f "$unpacked/$p/.done" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  # apt-get download needs the package lists; a fresh machine may have none, or old ones
  # that point at files the archive no longer holds. Update only when a name is unknown.
  if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
    echo "updating the package lists"
    apt-get update -qq
  fi
  echo "downloading ${#missing[@]} Debian packages into $debs"
  # apt-get download as root warns that it cannot drop privileges; that is harmless here.
  (cd "$debs" && rm -f ./*.deb.partial && apt-get download -qq "${missing[@]}" 2>&1 |
    { grep -v 'unsandboxed as root' || true; })
  for p in "${missing[@]}"; do
    deb=$(ls -t "$debs/${p}_"*.deb | head -n1)
    rm -rf "${unpacked:?}/$p"
    mkdir -p "$unpacked/$p"
    dpkg-deb -x "$deb" "$unpacked/$p"
    touch "$unpacked/$p/.done"
    # The unpacked tree is what the tests use; the .deb is not needed again.
    rm -f "$deb"
  done
fi
seer_elapsed "$start" "Debian packages"

# --- Pillow's test images ----------------------------------------------------------------
pillow="$unpacked/pillow-$PILLOW_VERSION"
if [[ ! -f "$pillow/.done" ]]; then
  sdists="$SEER_CACHE/downloads/pypi"
  mkdir -p "$sdists"
  python3 -m pip download --quiet --no-deps --no-binary pillow -d "$sdists" "pillow==$PILLOW_VERSION"
  rm -rf "$pillow"
  mkdir -p "$pillow"
  # Only the test images: the rest of the source tree is of no use here.
  tar -xzf "$sdists/pillow-$PILLOW_VERSION.tar.gz" -C "$pillow" --strip-components=1 \
    "pillow-$PILLOW_VERSION/Tests/images"
  touch "$pillow/.done"
  rm -f "$sdists/pillow-$PILLOW_VERSION.tar.gz"
fi
seer_elapsed "$start" "Pillow test images"

# --- Curated folders ---------------------------------------------------------------------
python3 "$here/curate_testdata.py" --cache "$SEER_CACHE" --pillow "$pillow"

echo "recipe $RECIPE" > "$stamp"
seer_elapsed "$start" "fetch-testdata (total)"
