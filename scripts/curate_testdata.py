#!/usr/bin/env python3
"""Builds the curated test-material folders from the unpacked packages in the cache.

Called by scripts/fetch-testdata.sh; uses only the standard library, so it runs before (or
without) the project's virtual environment. Files are hardlinked, not copied, so the curated
folders cost no disk space; where a hardlink is impossible (another file system) they are copied.

Writes, under the cache folder:
  photos/<source>/...        real photos (JPEG, PNG, WebP), exact duplicates removed
  photos.tsv                 one line per photo: path, format, width, height, mode, progressive, bytes
  photos-small/<source>/...  a deterministic subset of about 60 photos spanning formats and modes
  photos-small.tsv           the same columns for the subset
  hostile/<source>__<path>   edge-case and hostile inputs, flat; '/' in the original path becomes '__'
  hostile.tsv                name, bytes, origin (path inside the unpacked cache)
  fashion-mnist/             the four IDX files of Fashion-MNIST (gzip), as Debian ships them

Each folder is built beside its final place and renamed into it, so an interrupted run never
leaves a half-built folder that a later run would take as done.
"""

import argparse
import hashlib
import os
import shutil
import struct
import sys
from pathlib import Path

PHOTO_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}

# (name in photos/, package, folder inside the package, recursive, smallest side kept)
# Smaller images than the limit are icons, thumbnails or UI art, not photos.
PHOTO_SOURCES = [
    ("endless-sky", "endless-sky-data", "usr/share/games/endless-sky/images/land", False, 64),
    ("endless-sky-2x", "endless-sky-high-dpi",
     "usr/share/games/endless-sky/plugins/endless-sky-high-dpi/images/land", False, 64),
    ("labelme", "labelme-examples", "usr/share/doc/labelme-examples/examples", True, 64),
    ("kphotoalbum", "kphotoalbum", "usr/share/kphotoalbum/demo", True, 64),
    ("dlib", "libdlib19.1", "usr/share/doc/libdlib19.1/examples", True, 64),
    ("opencv", "opencv-doc", "usr/share/doc/opencv-doc/examples/data", False, 64),
    ("skimage", "python3-skimage", "usr/lib/python3/dist-packages/skimage/data", False, 64),
    ("gnome-faces", "gnome-control-center-data", "usr/share/pixmaps/faces", True, 64),
    ("plasma", "plasma-workspace-wallpapers", "usr/share/wallpapers", True, 64),
    ("mate", "mate-backgrounds", "usr/share/backgrounds/mate", True, 64),
    ("lomiri-16.04", "lomiri-wallpapers-16.04", "usr/share/backgrounds", True, 64),
    ("lomiri-20.04", "lomiri-wallpapers-20.04", "usr/share/backgrounds", True, 64),
    ("ukui", "ukui-wallpapers", "usr/share/backgrounds", True, 64),
    ("gnome-backgrounds", "gnome-backgrounds", "usr/share/backgrounds/gnome", True, 64),
    # Debian's own artwork: boot splashes and login backgrounds, not photos, but real large PNGs.
    ("desktop-base", "desktop-base", "usr/share/desktop-base", True, 640),
]


def photo_excluded(source, relative):
    """Files in the photo folders that are not photos, or are broken on purpose."""
    parts = relative.lower().split("/")
    name = parts[-1]
    if source == "labelme":
        # Only the scene photos: not the label masks, their visualizations or tool screenshots.
        return (name.endswith(".png") or "visualization" in relative.lower()
                or ".readme" in parts)
    if source == "skimage":
        return name == "truncated.jpg"  # truncated on purpose; it goes to hostile/
    return False


# (prefix in hostile/, package, folder inside the package, subfolders taken whole or None for
# every file under the folder)
HOSTILE_SOURCES = [
    ("pillow", None, "Tests/images", None),
    ("gdk-pixbuf", "gdk-pixbuf-tests", "usr/libexec/installed-tests/gdk-pixbuf",
     ["", "test-images/fail", "test-images/randomly-modified"]),
    ("go", "golang-1.19-src", "usr/share/go-1.19/src/image/testdata", None),
    ("go-png", "golang-1.19-src", "usr/share/go-1.19/src/image/png/testdata", None),
    ("libsixel", "libsixel-examples",
     "usr/share/doc/libsixel-examples/examples/images/pngsuite/corrupted", None),
    ("skimage", "python3-skimage", "usr/lib/python3/dist-packages/skimage/data", ["truncated.jpg"]),
]

SMALL_SET_QUOTAS = [
    # (category, count); categories come from `category()` below.
    ("jpeg-baseline", 14),
    ("jpeg-progressive", 10),
    ("jpeg-gray", 8),
    ("png-rgb", 6),
    ("png-rgba", 6),
    ("png-palette", 5),
    ("png-gray", 5),
    ("webp", 4),
]
SMALL_SET_MAX_PIXELS = 4_000_000


def read_header(path):
    """Returns (format, width, height, mode, progressive) from the file's first bytes, or None."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", head[16:26])
            modes = {0: "gray", 2: "rgb", 3: "palette", 4: "gray-alpha", 6: "rgba"}
            return "png", width, height, f"{modes.get(color, '?')}{depth}", False
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            chunk = head[12:16]
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", head[26:30])
                return "webp", width & 0x3FFF, height & 0x3FFF, "lossy", False
            if chunk == b"VP8L":
                bits = struct.unpack("<I", head[21:25])[0]
                return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "lossless", False
            if chunk == b"VP8X":
                flags = head[20]
                width = int.from_bytes(head[24:27], "little") + 1
                height = int.from_bytes(head[27:30], "little") + 1
                return "webp", width, height, "alpha" if flags & 0x10 else "extended", False
            return None
        if head.startswith(b"\xff\xd8"):
            return read_jpeg_header(path)
    except (struct.error, IndexError):
        return None
    return None


def read_jpeg_header(path):
    with open(path, "rb") as f:
        data = f.read(4 * 1024 * 1024)  # EXIF thumbnails and ICC profiles can be large
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width, components = struct.unpack(">HHB", data[pos + 5:pos + 10])
            mode = {1: "gray", 3: "ycbcr", 4: "cmyk"}.get(components, "?")
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            return "jpeg", width, height, mode, progressive
        if marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
            return None
        pos += 2 + length
    return None


def category(info):
    fmt, _, _, mode, progressive = info
    if fmt == "jpeg":
        if mode == "gray":
            return "jpeg-gray"
        if mode == "ycbcr":
            return "jpeg-progressive" if progressive else "jpeg-baseline"
        return "jpeg-other"
    if fmt == "png":
        if mode.startswith("rgba"):
            return "png-rgba"
        if mode.startswith("rgb"):
            return "png-rgb"
        if mode.startswith("palette"):
            return "png-palette"
        return "png-gray"
    return fmt


def place(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fresh_folder(final):
    building = final.with_name(final.name + ".building")
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    return building


def commit_folder(building, final):
    if final.exists():
        shutil.rmtree(final)
    building.rename(final)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collect_photos(unpacked):
    """Returns [(relative path in photos/, source file, header info)], sorted, without duplicates."""
    found = []
    for name, package, folder, recursive, min_side in PHOTO_SOURCES:
        root = unpacked / package / folder
        if not root.is_dir():
            sys.exit(f"missing {root}: was {package} unpacked?")
        files = root.rglob("*") if recursive else root.iterdir()
        for path in sorted(files):
            relative = path.relative_to(root).as_posix()
            if (not path.is_file() or path.is_symlink()
                    or path.suffix.lower() not in PHOTO_EXTENSIONS
                    or photo_excluded(name, relative)):
                continue
            info = read_header(path)
            if info is None or min(info[1], info[2]) < min_side:
                continue
            found.append((f"{name}/{relative}", path, info))

    # Exact duplicates (labelme ships each photo in several example folders) would make
    # deduplication tests and counts misleading; keep the first by path.
    by_size = {}
    for entry in found:
        by_size.setdefault(entry[1].stat().st_size, []).append(entry)
    duplicates = set()
    for entries in by_size.values():
        if len(entries) > 1:
            seen = set()
            for entry in entries:
                digest = sha256(entry[1])
                if digest in seen:
                    duplicates.add(entry[0])
                seen.add(digest)
    return [entry for entry in found if entry[0] not in duplicates], len(duplicates)


def stable_key(text):
    return hashlib.sha1(text.encode()).hexdigest()


def choose_small_set(photos):
    """Picks SMALL_SET_QUOTAS photos per category, spread over sources, the same on every run."""
    by_category = {}
    for entry in photos:
        by_category.setdefault(category(entry[2]), []).append(entry)
    chosen = []
    shortfall = 0
    for cat, quota in SMALL_SET_QUOTAS:
        candidates = by_category.get(cat, [])
        small = [e for e in candidates if e[2][1] * e[2][2] <= SMALL_SET_MAX_PIXELS]
        # If a category has too few small images, the smallest large ones make up the count.
        if len(small) < quota:
            large = sorted((e for e in candidates if e not in small),
                           key=lambda e: (e[2][1] * e[2][2], e[0]))
            small += large[:quota - len(small)]
        picked = round_robin(small, quota)
        shortfall += quota - len(picked)
        chosen += picked
    if shortfall:
        rest = [e for e in photos if e not in chosen and category(e[2]) == "jpeg-baseline"
                and e[2][1] * e[2][2] <= SMALL_SET_MAX_PIXELS]
        chosen += round_robin(rest, shortfall)
    return sorted(chosen, key=lambda e: e[0])


def round_robin(entries, count):
    """Takes `count` entries, one source at a time, each source's in a fixed pseudo-random order."""
    by_source = {}
    for entry in sorted(entries, key=lambda e: stable_key(e[0])):
        by_source.setdefault(entry[0].split("/", 1)[0], []).append(entry)
    queues = [by_source[s] for s in sorted(by_source)]
    picked = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def write_photos(cache, entries, folder_name):
    final = cache / folder_name
    building = fresh_folder(final)
    lines = ["path\tformat\twidth\theight\tmode\tprogressive\tbytes"]
    for relative, source, (fmt, width, height, mode, progressive) in entries:
        place(source, building / relative)
        lines.append(f"{relative}\t{fmt}\t{width}\t{height}\t{mode}\t{int(progressive)}\t"
                     f"{source.stat().st_size}")
    commit_folder(building, final)
    (cache / f"{folder_name}.tsv").write_text("\n".join(lines) + "\n")


def is_program(path):
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"\x7fELF" or head.startswith(b"#!")


def build_hostile(cache, unpacked, pillow):
    final = cache / "hostile"
    building = fresh_folder(final)
    lines = ["name\tbytes\torigin"]
    for prefix, package, folder, parts in HOSTILE_SOURCES:
        base = pillow if package is None else unpacked / package
        root = base / folder
        if not root.is_dir():
            sys.exit(f"missing {root}")
        files = []
        for part in parts if parts is not None else [""]:
            target = root / part
            if target.is_file():
                files.append(target)
            elif part == "" and parts is not None:
                files += [p for p in target.iterdir() if p.is_file()]  # top level only
            else:
                files += [p for p in target.rglob("*") if p.is_file()]
        for path in sorted(files):
            # The gdk-pixbuf folder also holds its test programs (and some of Pillow's images
            # carry an executable bit, so the bit alone tells nothing).
            if path.is_symlink() or is_program(path):
                continue
            relative = path.relative_to(root).as_posix()
            name = f"{prefix}__{relative.replace('/', '__')}"
            place(path, building / name)
            lines.append(f"{name}\t{path.stat().st_size}\t{path.relative_to(cache).as_posix()}")
    commit_folder(building, final)
    (cache / "hostile.tsv").write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def build_fashion_mnist(cache, unpacked):
    root = unpacked / "dataset-fashion-mnist/usr/share/datasets/fashion-mnist"
    final = cache / "fashion-mnist"
    building = fresh_folder(final)
    files = sorted(root.glob("*-ubyte.gz"))
    if len(files) != 4:
        sys.exit(f"expected 4 IDX files in {root}, found {len(files)}")
    for path in files:
        place(path, building / path.name)
    commit_folder(building, final)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--pillow", type=Path, required=True,
                        help="the unpacked Pillow source distribution")
    args = parser.parse_args()
    unpacked = args.cache / "unpacked"

    photos, duplicates = collect_photos(unpacked)
    write_photos(args.cache, photos, "photos")
    small = choose_small_set(photos)
    write_photos(args.cache, small, "photos-small")
    hostile = build_hostile(args.cache, unpacked, args.pillow)
    build_fashion_mnist(args.cache, unpacked)

    counts = {}
    for entry in small:
        counts[category(entry[2])] = counts.get(category(entry[2]), 0) + 1
    print(f"photos: {len(photos)} files ({duplicates} exact duplicates left out) in {args.cache / 'photos'}")
    print(f"photos-small: {len(small)} files in {args.cache / 'photos-small'}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"hostile: {hostile} files in {args.cache / 'hostile'}")
    print(f"fashion-mnist: {args.cache / 'fashion-mnist'}")


if __name__ == "__main__":
    main()
