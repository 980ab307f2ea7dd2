#!/usr/bin/env python3
"""Reference outputs for the pixel operations of augment/src/ops, computed by the real thing.

SwAV and VISSL run every augmentation on PIL images through torchvision's functional API, so
the reference is torchvision 0.26 `transforms.functional` on PIL 13 images (which dispatches to
`transforms._functional_pil`), plus `ImageFilter.GaussianBlur` for SwAV's `PILRandomGaussianBlur`.

Usage: augment_reference.py CASES_JSON

CASES_JSON (written by augment/tests/reference.rs):

    {"inputs": [{"path": "in/0.rgb", "width": 683, "height": 512}, ...],
     "cases":  [{"op": "hue", "input": 0, "output": "out/17.raw", "hue": -0.2}, ...]}

Paths are relative to the folder of CASES_JSON. Inputs are raw interleaved RGB8. Each output is
raw interleaved RGB8, except `to_tensor_normalize`, which writes float32 CHW, little-endian.

Factors arrive as the exact float32 values the Rust side uses (torchvision's ColorJitter samples
them as float32 and hands them on as Python floats, which is what we do here too).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

EXPECTED = {"torchvision": "0.26.0", "PIL": "13.0.0", "torch": "2.11.0"}


def f32(value: float) -> float:
    """The float32 value nearest to `value`, as a Python float (how ColorJitter passes factors)."""
    return float(np.float32(value))


def apply(op: str, img: Image.Image, case: dict) -> bytes:
    if op == "resized_crop":
        out = F.resized_crop(
            img,
            case["top"],
            case["left"],
            case["crop_height"],
            case["crop_width"],
            [case["out_height"], case["out_width"]],
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        )
    elif op == "flip":
        out = F.hflip(img)
    elif op == "brightness":
        out = F.adjust_brightness(img, f32(case["factor"]))
    elif op == "contrast":
        out = F.adjust_contrast(img, f32(case["factor"]))
    elif op == "saturation":
        out = F.adjust_saturation(img, f32(case["factor"]))
    elif op == "hue":
        out = F.adjust_hue(img, f32(case["factor"]))
    elif op == "grayscale":
        out = F.rgb_to_grayscale(img, num_output_channels=3)
    elif op == "blur":
        # SwAV's PILRandomGaussianBlur: img.filter(ImageFilter.GaussianBlur(radius=...)).
        out = img.filter(ImageFilter.GaussianBlur(radius=f32(case["factor"])))
    elif op == "to_tensor_normalize":
        mean = [f32(m) for m in case["mean"]]
        std = [f32(s) for s in case["std"]]
        tensor = F.normalize(F.to_tensor(img), mean, std)
        assert tensor.dtype == torch.float32 and tensor.shape == (3, img.height, img.width)
        return tensor.contiguous().numpy().astype("<f4", copy=False).tobytes()
    else:
        raise ValueError(f"unknown op {op!r}")
    assert out.mode == "RGB", f"{op} returned mode {out.mode}"
    return out.tobytes()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    versions = {
        "torchvision": torchvision.__version__.split("+")[0],
        "PIL": Image.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    if versions != EXPECTED:
        print(f"reference versions {versions}, expected {EXPECTED}", file=sys.stderr)
        return 3
    cases_path = Path(sys.argv[1])
    root = cases_path.parent
    spec = json.loads(cases_path.read_text())
    images = []
    for entry in spec["inputs"]:
        data = (root / entry["path"]).read_bytes()
        size = (entry["width"], entry["height"])
        images.append(Image.frombytes("RGB", size, data))
    for case in spec["cases"]:
        result = apply(case["op"], images[case["input"]], case)
        (root / case["output"]).write_bytes(result)
    print(f"reference: {len(spec['cases'])} cases on {len(images)} inputs, {versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
