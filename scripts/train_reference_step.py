#!/usr/bin/env python3
"""The PyTorch side of the trainer benchmark (scripts/bench-train.sh): SwAV training steps of
torchvision's RegNetY with the same head, loss and optimizer as `train`, timed per step.

What one step does, as SwAV's `main_swav.py` (facebookresearch/swav @06b1b7c) and `train`
(trainer/src/train.rs) both do it, on the configuration `configs/swav-regnety-400mf.toml` uses:
- the batch arrives as uint8 NHWC crops (what the augmenter delivers); they are permuted to NCHW,
  scaled to [0, 1] and normalized with ImageNet's mean and std (torchvision's ToTensor +
  Normalize), one tensor per run of equal crop sizes;
- the trunk (torchvision `regnet_y_400mf`, `fc` removed) runs once per resolution group, the
  features are concatenated and go through VISSL's SwAV head (Linear 440-440, BatchNorm, ReLU,
  Linear 440-128, L2 normalization, 3,000 prototypes);
- the swapped-prediction loss with Sinkhorn-Knopp (epsilon 0.05, 3 iterations) on crops 0 and 1,
  temperature 0.1;
- backward, prototype gradients dropped while they are frozen, apex LARC over SGD (momentum 0.9,
  weight decay 1e-6, trust 0.001, no clipping), then the prototypes are L2-normalized.

The head, Sinkhorn and LARC are the transcriptions in tests/python/swav_reference.py, which the
trainer's reference tests check `train` against. Input pixels are random (timing only).

Prints one JSON object: {"step_s": [...], "threads": N, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "python"))
from swav_reference import LARC, SwAVPrototypesHead, distributed_sinkhorn  # noqa: E402

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crops", default="2x224,6x96", help="COUNTxSIZE,... in crop order")
    parser.add_argument("--steps", type=int, default=12, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="regnet_y_400mf", help="a torchvision regnet_y_* builder")
    parser.add_argument("--hidden", type=int, default=440, help="the head's hidden width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: CUDA autocast, as `train --set precision=bf16`")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = []
    for part in args.crops.split(","):
        count, size = part.split("x")
        sizes += [int(size)] * int(count)
    batch = args.batch

    device = torch.device(args.device)
    trunk = getattr(torchvision.models, args.model)()
    width = trunk.fc.in_features
    trunk.fc = torch.nn.Identity()
    head = SwAVPrototypesHead([width, args.hidden, 128], True, [args.prototypes], 1e-5, 0.1)
    trunk.to(device)
    head.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    trunk.to(memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trunk.train()
    head.train()
    parameters = list(trunk.parameters()) + list(head.parameters())
    optimizer = LARC(torch.optim.SGD(parameters, lr=0.0375, momentum=0.9, weight_decay=1e-6),
                     trust_coefficient=0.001, clip=False, eps=1e-8)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    # Runs of equal sizes: SwAV's unique_consecutive over the crop widths.
    groups = []
    start = 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] != sizes[start]:
            groups.append((sizes[start], i - start))
            start = i
    crops_for_assign = [0, 1]
    n_crops = len(sizes)

    def step(images):
        features = []
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            for (size, count), pixels in zip(groups, images):
                x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
                x = ((x - mean) / std).contiguous(memory_format=memory_format)
                features.append(trunk(x))
            embeddings, scores = head(torch.cat(features))
            scores = scores.float()
        loss = 0
        for crop in crops_for_assign:
            with torch.no_grad():
                q = distributed_sinkhorn(scores[batch * crop: batch * (crop + 1)].detach(), 0.05, 3)
            subloss = 0
            for v in [v for v in range(n_crops) if v != crop]:
                x = scores[batch * v: batch * (v + 1)] / 0.1
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss += subloss / (n_crops - 1)
        loss /= len(crops_for_assign)
        optimizer.optim.zero_grad()
        loss.backward()
        for p in head.prototypes0.parameters():  # frozen for the first iterations
            p.grad = None
        optimizer.step()
        with torch.no_grad():
            w = head.prototypes0.weight
            w.copy_(F.normalize(w, dim=1, p=2))
        return loss.item()

    times = []
    losses = []
    for i in range(args.warmup + args.steps):
        images = [torch.randint(0, 256, (count * batch, size, size, 3), dtype=torch.uint8)
                  for size, count in groups]
        if device.type == "cuda":
            images = [i.pin_memory() for i in images]
        t0 = time.perf_counter()
        losses.append(step(images))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    result = {"step_s": times, "losses": losses, "threads": args.threads, "batch": batch,
              "crops": args.crops, "model": args.model, "device": args.device,
              "precision": args.precision, "channels_last": args.channels_last,
              "torch": torch.__version__}
    if device.type == "cuda":
        result["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["imgs_per_s"] = batch / sorted(times)[len(times) // 2]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
