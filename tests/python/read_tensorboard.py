"""Reads a folder of TensorBoard event files with TensorBoard's own reader and prints its
scalars as JSON: {"<tag>": [[step, value], ...], ...}, each tag's points in the order
TensorBoard keeps them (after it drops the steps a resumed run logged again).

Used by trainer/tests/metrics_tensorboard.rs to check the trainer's hand-written event files.
Before reading, every record's framing is checked against TensorBoard's masked CRC32C and the
first record of each file must be the `brain.Event:2` file-version event, so a framing mistake
fails loudly instead of being read as a truncated file. JSON has no NaN or infinity: such values
are printed as the strings "NaN", "Infinity" and "-Infinity", as in the trainer's metrics.jsonl.

Usage: read_tensorboard.py DIR
"""

import json
import math
import os
import struct
import sys

try:
    from tensorboard.backend.event_processing import event_accumulator, event_file_loader
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
except ImportError as error:
    sys.exit(f"tensorboard is not installed ({error}): run scripts/setup.sh")


def check_framing(path):
    """Checks every record's length and data checksums; returns the number of records."""
    with open(path, "rb") as file:
        data = file.read()
    offset = 0
    records = 0
    while offset < len(data):
        if len(data) - offset < 12:
            raise ValueError(f"{path}: truncated record header at byte {offset}")
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if header_crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length checksum at byte {offset}")
        end = offset + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {offset}")
        (data_crc,) = struct.unpack("<I", data[end : end + 4])
        if data_crc != masked_crc32c(data[offset + 12 : end]):
            raise ValueError(f"{path}: bad data checksum at byte {offset}")
        offset = end + 4
        records += 1
    return records


def check_file_version(path):
    events = event_file_loader.LegacyEventFileLoader(path).Load()
    first = next(iter(events), None)
    if first is None or first.file_version != "brain.Event:2":
        raise ValueError(f"{path}: first event is not file_version brain.Event:2: {first}")


def json_value(value):
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = sys.argv[1]
    files = sorted(name for name in os.listdir(folder) if "tfevents" in name)
    if not files:
        sys.exit(f"{folder}: no event files")
    for name in files:
        path = os.path.join(folder, name)
        check_framing(path)
        check_file_version(path)

    # 0 keeps every scalar instead of a reservoir sample.
    accumulator = event_accumulator.EventAccumulator(
        folder, size_guidance={event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    scalars = {
        tag: [[event.step, json_value(event.value)] for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
    json.dump(scalars, sys.stdout, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
