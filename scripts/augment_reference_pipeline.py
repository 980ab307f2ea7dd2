"""The SwAV reference augmentation, as facebookresearch/swav src/multicropdataset.py builds it
(PIL images; RandomResizedCrop, flip, color distortion, PIL Gaussian blur, ToTensor + Normalize
per crop), run in one process on the images of a seer-rs dataset for a fixed time. Prints one
JSON line: source images per second. Used by scripts/bench-augment.sh for the ratio against the
Rust pipeline on the same images, in the same run.

Usage: augment_reference_pipeline.py DATASET_DIR --preset swav|swav-2x224 --seconds S
"""
import argparse, io, json, os, random, tarfile, time

import numpy as np
import torch
from PIL import Image, ImageFilter
import torchvision.transforms as T

PRESETS = {
    "swav": [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))],
    "swav-2x224": [(2, 224, (0.08, 1.0))],
}


class PILRandomGaussianBlur:
    """SwAV's blur: with probability p, PIL GaussianBlur with a radius uniform in [0.1, 2]."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if np.random.rand() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def color_distortion(s=1.0):
    jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    return T.Compose([T.RandomApply([jitter], p=0.8), T.RandomGrayscale(p=0.2)])


def transforms(preset):
    out = []
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for count, size, scale in PRESETS[preset]:
        t = T.Compose([
            T.RandomResizedCrop(size, scale=scale),
            T.RandomHorizontalFlip(p=0.5),
            color_distortion(),
            PILRandomGaussianBlur(),
            T.ToTensor(),
            T.Normalize(mean=mean, std=std),
        ])
        out.extend([t] * count)
    return out


def images(dataset):
    manifest = json.load(open(os.path.join(dataset, "manifest.json")))
    blobs = []
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(dataset, shard["name"])) as tar:
            for member in tar:
                if member.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp"):
                    blobs.append(tar.extractfile(member).read())
    return blobs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--preset", default="swav", choices=sorted(PRESETS))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    blobs = images(args.dataset)
    crops = transforms(args.preset)
    done, i = 0, 0
    start = time.perf_counter()
    measuring_from = None
    while True:
        now = time.perf_counter()
        if measuring_from is None and now - start >= args.warmup:
            measuring_from, done = now, 0
        if measuring_from is not None and now - measuring_from >= args.seconds:
            break
        # As the SwAV dataset does: open and convert to RGB, then every crop from the image.
        image = Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB")
        views = [t(image) for t in crops]
        assert len(views) == len(crops)
        done, i = done + 1, i + 1
    elapsed = time.perf_counter() - measuring_from
    print(json.dumps({"preset": args.preset, "images": done, "seconds": elapsed, "images_per_s": done / elapsed}))


if __name__ == "__main__":
    main()
