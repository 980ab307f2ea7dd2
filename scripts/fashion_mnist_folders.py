#!/usr/bin/env python3
"""Write Fashion-MNIST's IDX files as an ImageFolder tree of PNGs, for `ingest --labels-from-folders`.

    python3 scripts/fashion_mnist_folders.py IDX_DIR OUT [--per-class N]

IDX_DIR holds {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (scripts/fetch-testdata.sh puts them
in $SEER_CACHE/fashion-mnist). OUT gets train/CLASS/NNNNN.png and test/CLASS/NNNNN.png, where CLASS
is the label's digit and name (0-t-shirt-top ... 9-ankle-boot: sorted names keep the label order)
and NNNNN the image's index in its IDX file. --per-class N keeps the first N images of each class
of each split (a stratified subset, for quick runs).

Beside each split's folder it writes SPLIT.csv (url,label: absolute paths and folder names) in a
seeded random order. Ingesting the folder itself lists it class by class, so each shard would hold
one or two classes and even a large shuffle buffer would give batches of few classes, which SwAV's
equipartition fights; `ingest run --list SPLIT.csv --label-column label` writes mixed shards.

Standard library only: IDX is a tiny header and raw bytes, and an 8-bit grayscale PNG is a
signature, an IHDR, one zlib-compressed IDAT and an IEND. Rewrites nothing that is complete: a
finished split carries a .done file.
"""

import argparse
import random
import gzip
import struct
import sys
import zlib
from pathlib import Path

CLASSES = [
    "t-shirt-top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]
SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path, magic, dims):
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * dims
    if len(data) < header:
        sys.exit(f"{path}: {len(data)} bytes, shorter than an IDX header")
    found, *shape = struct.unpack(f">{1 + dims}I", data[:header])
    if found != magic:
        sys.exit(f"{path}: magic number {found:#x}, expected {magic:#x}")
    count = 1
    for d in shape:
        count *= d
    if len(data) != header + count:
        sys.exit(f"{path}: {len(data) - header} data bytes, the header says {count}")
    return shape, data[header:]


def png_gray8(width, height, pixels):
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def write_split(idx_dir, out, split, per_class):
    prefix = SPLITS[split]
    (count, height, width), images = read_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", 0x803, 3)
    (label_count,), labels = read_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", 0x801, 1)
    if label_count != count:
        sys.exit(f"{idx_dir}: {count} {split} images but {label_count} labels")
    folder = out / split
    done = folder / ".done"
    stamp = f"per-class {per_class}\n"
    if done.exists() and done.read_text() == stamp:
        return
    taken = [0] * len(CLASSES)
    rows = []
    written = 0
    size = width * height
    for index in range(count):
        label = labels[index]
        if label >= len(CLASSES):
            sys.exit(f"{split} label {index}: {label}, expected 0 to {len(CLASSES) - 1}")
        if per_class is not None and taken[label] >= per_class:
            continue
        taken[label] += 1
        target = folder / f"{label}-{CLASSES[label]}" / f"{index:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png_gray8(width, height, images[index * size:(index + 1) * size]))
        rows.append(f"{target.resolve()},{target.parent.name}")
        written += 1
    random.Random(f"fashion-mnist {split}").shuffle(rows)
    (out / f"{split}.csv").write_text("url,label\n" + "\n".join(rows) + "\n")
    done.write_text(stamp)
    print(f"{split}: {written} images of {width}x{height} in {folder}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("idx_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=None)
    args = parser.parse_args()
    for split in SPLITS:
        write_split(args.idx_dir, args.out, split, args.per_class)


if __name__ == "__main__":
    main()
