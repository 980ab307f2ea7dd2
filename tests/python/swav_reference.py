#!/usr/bin/env python3
"""Reference outputs for trainer/src/swav.rs and trainer/src/optim.rs, computed in PyTorch.

Transcriptions, written out here so they run without the original repositories (see
shared/reference/seer.md §2-3 for the sources and commits):

- `distributed_sinkhorn` and the swapped-prediction loss with its queue: SwAV `main_swav.py`
  (facebookresearch/swav @06b1b7c), with `dist.all_reduce` the identity (one process). For
  `use_f64` the same algorithm runs on `scores.double()`, as VISSL's `use_double_precision` does.
- the head: VISSL `SwAVPrototypesHead` (`vissl/models/heads/swav_prototypes_head.py`).
- LARC: apex `apex/parallel/LARC.py` wrapped around `torch.optim.SGD`, as `main_swav.py` builds it.

Usage: swav_reference.py CASE_DIR...

Each CASE_DIR holds `case.json` and `inputs.safetensors` (written by
trainer/tests/swav_reference.rs); this script writes `outputs.safetensors` there. Tensors go
through `safetensors.numpy` (`safetensors.torch` needs the `packaging` module, which the venv
lacks). `case.json` has a "kind":

- "swav": {"n_crops", "crops_for_assign", "temperature", "epsilon", "sinkhorn_iterations",
  "use_f64", "queue_length" (0: none), "queue_start", "steps"}; inputs per step t:
  `step{t}.embeddings` [V*B, D], `step{t}.scores` [V*B, K], `step{t}.prototypes` [K, D].
  Outputs per step: `step{t}.loss`, `step{t}.grad` (d loss / d scores), `step{t}.q{i}` (codes of
  crops_for_assign[i]); at the end `queue` if there is one.
- "head": {"dims", "use_bn", "num_prototypes", "bn_eps", "bn_momentum"}; inputs: the head's
  state dict under its VISSL names plus `features`; outputs: `embeddings`, `scores`, and the BN
  running statistics after the forward in training mode.
- "larc": {"momentum", "weight_decay", "trust_coefficient", "eps", "clip", "lrs", "names"};
  inputs: `param.{name}` and, per step t, `grad{t}.{name}` (absent: grad None). Outputs:
  `step{t}.{name}` after each step and `momentum.{name}` at the end.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

EXPECTED_TORCH = "2.11.0"


# ---------------------------------------------------------------- SwAV main_swav.py (world 1)

def distributed_sinkhorn(out: torch.Tensor, epsilon: float, sinkhorn_iterations: int,
                         world_size: int = 1) -> torch.Tensor:
    with torch.no_grad():
        Q = torch.exp(out / epsilon).t()  # Q is K-by-B for consistency with notations from our paper
        B = Q.shape[1] * world_size  # number of samples to assign
        K = Q.shape[0]  # how many prototypes

        # make the matrix sums to 1
        sum_Q = torch.sum(Q)
        # dist.all_reduce(sum_Q): identity with one process
        Q /= sum_Q

        for it in range(sinkhorn_iterations):
            # normalize each row: total weight per prototype must be 1/K
            sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
            # dist.all_reduce(sum_of_rows)
            Q /= sum_of_rows
            Q /= K

            # normalize each column: total weight per sample must be 1/B
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B

        Q *= B  # the colomns must sum to 1 so that Q is an assignment
        return Q.t()


def swav_case(case: dict, inputs: dict) -> dict:
    n_crops = case["n_crops"]
    crops_for_assign = case["crops_for_assign"]
    temperature = case["temperature"]
    use_f64 = case["use_f64"]
    outputs = {}
    queue = None
    use_the_queue = False
    for step in range(case["steps"]):
        embedding = inputs[f"step{step}.embeddings"].detach()
        output = inputs[f"step{step}.scores"].clone().requires_grad_(True)
        prototypes = inputs[f"step{step}.prototypes"]  # model.module.prototypes.weight
        bs = embedding.shape[0] // n_crops

        # main_swav.py: the queue is created (zeros) when its start comes, its length rounded
        # down to a multiple of the global batch
        queue_length = case["queue_length"] - case["queue_length"] % bs
        if queue_length > 0 and step >= case["queue_start"] and queue is None:
            queue = torch.zeros(len(crops_for_assign), queue_length, embedding.shape[1])

        # ============ swav loss ... ============
        loss = 0
        for i, crop_id in enumerate(crops_for_assign):
            with torch.no_grad():
                out = output[bs * crop_id: bs * (crop_id + 1)].detach()

                # time to use the queue
                if queue is not None:
                    if use_the_queue or not torch.all(queue[i, -1, :] == 0):
                        use_the_queue = True
                        out = torch.cat((torch.mm(queue[i], prototypes.t()), out))
                    # fill the queue
                    queue[i, bs:] = queue[i, :-bs].clone()
                    queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]

                # get assignments
                if use_f64:
                    out = out.double()
                q = distributed_sinkhorn(out, case["epsilon"], case["sinkhorn_iterations"])[-bs:]
            outputs[f"step{step}.q{i}"] = q.clone()

            # cluster assignment prediction
            subloss = 0
            for v in np.delete(np.arange(n_crops), crop_id):
                x = output[bs * v: bs * (v + 1)]
                x = x.double() / np.float64(temperature) if use_f64 else x / temperature
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss += subloss / (n_crops - 1)
        loss /= len(crops_for_assign)

        loss.backward()
        outputs[f"step{step}.loss"] = loss.detach().clone()
        outputs[f"step{step}.grad"] = output.grad.clone()
    if queue is not None:
        outputs["queue"] = queue
    return outputs


# ---------------------------------------------------------------- VISSL SwAVPrototypesHead

class SwAVPrototypesHead(nn.Module):
    def __init__(self, dims, use_bn, num_clusters, bn_eps, bn_momentum,
                 use_bias=True, skip_last_bn=True, normalize_feats=True):
        super().__init__()
        self.normalize_feats = normalize_feats
        layers = []
        last_dim = dims[0]
        for i, dim in enumerate(dims[1:]):
            layers.append(nn.Linear(last_dim, dim, bias=use_bias))
            if (i == len(dims) - 2) and skip_last_bn:
                break
            if use_bn:
                layers.append(nn.BatchNorm1d(dim, eps=bn_eps, momentum=bn_momentum))
            layers.append(nn.ReLU(inplace=True))
            last_dim = dim
        self.projection_head = nn.Sequential(*layers)
        self.nmb_heads = len(num_clusters)
        for i, k in enumerate(num_clusters):
            self.add_module("prototypes" + str(i), nn.Linear(dims[-1], k, bias=False))

    def forward(self, batch):
        batch = self.projection_head(batch)
        if self.normalize_feats:
            batch = nn.functional.normalize(batch, dim=1, p=2)
        out = [batch]
        for i in range(self.nmb_heads):
            out.append(getattr(self, "prototypes" + str(i))(batch))
        return out


def head_case(case: dict, inputs: dict) -> dict:
    head = SwAVPrototypesHead(case["dims"], case["use_bn"], [case["num_prototypes"]],
                              case["bn_eps"], case["bn_momentum"])
    state = {k: v for k, v in inputs.items() if k != "features"}
    missing, unexpected = head.load_state_dict(state, strict=False)
    # tch keeps no `num_batches_tracked`; every other name must match VISSL's exactly.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"head state dict mismatch: missing {missing}, unexpected {unexpected}")
    head.train()
    with torch.no_grad():
        embeddings, scores = head(inputs["features"])
    outputs = {"embeddings": embeddings, "scores": scores}
    for name, buffer in head.named_buffers():
        if name.endswith("running_mean") or name.endswith("running_var"):
            outputs[name] = buffer.clone()
    return outputs


# ---------------------------------------------------------------- apex LARC around SGD

class LARC(object):
    """apex.parallel.LARC, as of the apex commit SwAV pins (the parts `step` uses)."""

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.clip = clip

    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    def step(self):
        with torch.no_grad():
            weight_decays = []
            for group in self.optim.param_groups:
                # absorb weight decay control from optimizer
                weight_decay = group['weight_decay'] if 'weight_decay' in group else 0
                weight_decays.append(weight_decay)
                group['weight_decay'] = 0
                for p in group['params']:
                    if p.grad is None:
                        continue
                    param_norm = torch.norm(p.data)
                    grad_norm = torch.norm(p.grad.data)

                    if param_norm != 0 and grad_norm != 0:
                        # calculate adaptive lr + weight decay
                        adaptive_lr = self.trust_coefficient * (param_norm) / (grad_norm + param_norm * weight_decay + self.eps)

                        # clip learning rate for LARC
                        if self.clip:
                            # calculation of adaptive_lr so that when multiplied by lr it equals `min(adaptive_lr, lr)`
                            adaptive_lr = min(adaptive_lr / group['lr'], 1)

                        p.grad.data += weight_decay * p.data
                        p.grad.data *= adaptive_lr

        self.optim.step()
        # return weight decay control to optimizer
        for i, group in enumerate(self.optim.param_groups):
            group['weight_decay'] = weight_decays[i]


def larc_case(case: dict, inputs: dict) -> dict:
    names = case["names"]
    params = {n: nn.Parameter(inputs[f"param.{n}"].clone()) for n in names}
    optimizer = torch.optim.SGD(list(params.values()), lr=case["lrs"][0],
                                momentum=case["momentum"], weight_decay=case["weight_decay"])
    optimizer = LARC(optimizer=optimizer, trust_coefficient=case["trust_coefficient"],
                     clip=case["clip"], eps=case["eps"])
    outputs = {}
    for step, lr in enumerate(case["lrs"]):
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for n, p in params.items():
            grad = inputs.get(f"grad{step}.{n}")
            p.grad = None if grad is None else grad.clone()
        optimizer.step()
        for n, p in params.items():
            outputs[f"step{step}.{n}"] = p.detach().clone()
    for n, p in params.items():
        state = optimizer.state.get(p, {})
        if state.get("momentum_buffer") is not None:
            outputs[f"momentum.{n}"] = state["momentum_buffer"].clone()
    return outputs


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if torch.__version__.split("+")[0] != EXPECTED_TORCH:
        raise SystemExit(f"torch {torch.__version__}, expected {EXPECTED_TORCH}")
    torch.use_deterministic_algorithms(True)
    kinds = {"swav": swav_case, "head": head_case, "larc": larc_case}
    for case_dir in map(Path, sys.argv[1:]):
        case = json.loads((case_dir / "case.json").read_text())
        inputs = {k: torch.from_numpy(v) for k, v in
                  load_file(str(case_dir / "inputs.safetensors")).items()}
        outputs = kinds[case["kind"]](case, inputs)
        save_file({k: v.detach().contiguous().numpy() for k, v in outputs.items()},
                  str(case_dir / "outputs.safetensors"))


if __name__ == "__main__":
    main()
