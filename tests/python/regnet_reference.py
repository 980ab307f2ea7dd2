#!/usr/bin/env python3
"""torchvision's side of trainer/tests/regnet_torchvision.rs: the reference the Rust RegNetY is
checked against. Runs with the project's venv (.venv/bin/python: torch 2.11.0, torchvision 0.26.0,
safetensors 0.7.0).

    regnet_reference.py REQUEST.json RESPONSE.json

REQUEST.json holds any of:

    "designs": [{"name", "depth", "w0", "wa", "wm", "group_width", "se_ratio",
                 "bottleneck_ratio", "stem_width", "torchvision"?}]
        Answered with torchvision's stages (BlockParams.from_init_params: "widths", "depths",
        "group_widths") and trunk parameter count ("parameters": a RegNet built on the meta
        device, fc left out); a design naming a torchvision builder ("regnet_y_400mf") also gets
        that builder's count ("torchvision_parameters").
    "random": {"count", "seed", "counted"}
        "count" random designs, answered with their inputs and stages; the first "counted" also
        with the parameter count (building a model takes ~0.1 s even on the meta device).
    "forward": [{"arch", "weights", "input", "output"}]
        Builds torchvision.models.<arch>() with fc = Identity, loads the safetensors file
        "weights" with load_state_dict(strict=True), and writes the eval-mode features of the
        tensor "input" of the safetensors file "input" to "output" as "features".

Any failure (a key torchvision does not expect, a missing key, a shape) ends it with a traceback
and a non-zero status.
"""

import json
import random
import sys

import numpy as np
import torch
import torchvision
from safetensors import safe_open
from safetensors.numpy import save_file  # safetensors.torch needs `packaging`, absent from the venv
from torchvision.models.regnet import BlockParams, RegNet


def on_cpu(function):
    """Runs `function` with CPU tensors even inside a meta-device context."""

    def wrapper(*args, **kwargs):
        with torch.device("cpu"):
            return function(*args, **kwargs)

    return wrapper


# torchvision's builders compute their BlockParams with torch tensors, which cannot be read on the
# meta device; the models themselves are built there (no memory, so even 128GF counts at once).
BlockParams.from_init_params = classmethod(on_cpu(BlockParams.from_init_params.__func__))


def trunk_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("fc."))


def describe(design: dict, count: bool = True) -> dict:
    params = BlockParams.from_init_params(
        depth=design["depth"],
        w_0=design["w0"],
        w_a=design["wa"],
        w_m=design["wm"],
        group_width=design["group_width"],
        bottleneck_multiplier=design["bottleneck_ratio"],
        se_ratio=design["se_ratio"],
    )
    result = {
        **design,
        "widths": params.widths,
        "depths": params.depths,
        "group_widths": params.group_widths,
    }
    if count:
        with torch.device("meta"):
            model = RegNet(params, stem_width=design["stem_width"])
        result["parameters"] = trunk_parameters(model)
    if design.get("torchvision"):
        with torch.device("meta"):
            builder = getattr(torchvision.models, design["torchvision"])()
        result["torchvision_parameters"] = trunk_parameters(builder)
    return result


def random_designs(count: int, seed: int) -> list:
    rng = random.Random(seed)
    return [
        {
            "name": f"random-{i}",
            "depth": rng.randint(1, 30),
            "w0": 8 * rng.randint(1, 80),
            # Two decimals, as the published designs: ties in the roundings are likelier.
            "wa": round(rng.uniform(0.0, 250.0), 2) if rng.random() > 0.05 else 0.0,
            "wm": round(rng.uniform(1.5, 3.0), 2),
            "group_width": rng.choice([1, 4, 8, 16, 24, 48, 56, 64, 112, 232, 373, 1010]),
            "se_ratio": rng.choice([0.25, 0.25, 0.25, 0.5, 0.0]),
            "bottleneck_ratio": rng.choice([1.0, 1.0, 1.0, 0.5, 0.25]),
            "stem_width": rng.choice([32, 32, 16, 24]),
        }
        for i in range(count)
    ]


def forward(job: dict) -> dict:
    model = getattr(torchvision.models, job["arch"])()
    model.fc = torch.nn.Identity()
    with safe_open(job["weights"], framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(state, strict=True)
    model.eval()
    with safe_open(job["input"], framework="pt") as f:
        images = f.get_tensor("input")
    with torch.no_grad():
        features = model(images)
    save_file({"features": features.numpy().astype(np.float32)}, job["output"])
    return {"arch": job["arch"], "keys": len(state)}


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        request = json.load(f)
    torch.set_num_threads(2)
    rand = request.get("random", {"count": 0, "seed": 0, "counted": 0})
    response = {
        "designs": [describe(d) for d in request.get("designs", [])],
        "random": [
            describe(d, count=i < rand["counted"])
            for i, d in enumerate(random_designs(rand["count"], rand["seed"]))
        ],
        "forward": [forward(job) for job in request.get("forward", [])],
    }
    with open(sys.argv[2], "w") as f:
        json.dump(response, f)


if __name__ == "__main__":
    main()
