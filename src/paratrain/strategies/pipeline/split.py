"""Cutting a model into pipeline stages: which consecutive blocks each stage holds.

A model is a run of blocks: the GPT's `layers` (embeddings ride with the first stage, the
final norm and head with the last), or the children of an `nn.Sequential`. Stages are chosen
to minimise the most expensive stage (linear partition by dynamic programming), where a block
costs its parameter count or its measured forward + backward time; or the user names the cut
points. Each stage is a pruned copy of the model, so parameter names stay those of the whole
model and a checkpoint loads under any layout (the torchtitan convention).
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict

import torch
import torch.nn as nn

from paratrain.strategies.layout import blocks_of


def _numel(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())


def param_costs(model: nn.Module) -> list[float]:
    costs = [float(_numel(b)) for b in blocks_of(model)]
    if isinstance(model, nn.Sequential):
        return costs
    costs[0] += _numel(model.tok_emb) + _numel(model.pos_emb)
    costs[-1] += _numel(model.norm) + _numel(model.head)
    return costs


def time_costs(model: nn.Module, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Forward + backward seconds of each block on `sample` (the best of `repeats`)."""
    x = sample
    if not isinstance(model, nn.Sequential):
        x = model.tok_emb(sample) + model.pos_emb(torch.arange(sample.shape[1], device=sample.device))
    costs = []
    for block in blocks_of(model):
        inp = x.detach().requires_grad_(x.is_floating_point())
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = block(inp)
            out.float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        costs.append(best)
        x = out.detach()
    model.zero_grad(set_to_none=True)
    return costs


def balanced_split(costs: list[float], num_stages: int) -> list[int]:
    """First block index of each stage, minimising the largest stage cost."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest max-stage cost putting the first i blocks into s stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    starts, i = [], n
    for s in range(num_stages, 0, -1):
        i = cut[s][i]
        starts.append(i)
    return starts[::-1]


def whole_model(model: nn.Module) -> nn.Module:
    """The one stage of a one-stage pipeline (hybrid with pp = 1): a copy of the whole model, any
    model, with its output as a tensor (a transformers ModelOutput: its logits), since the pipeline
    runtime sends and checks tensors. Parameter names stay the model's."""
    part = copy.deepcopy(model)
    part.register_forward_hook(lambda module, args, out: out.logits if hasattr(out, "logits") else out)
    return part


def build_stage(model: nn.Module, starts: list[int], stage: int) -> nn.Module:
    """A copy of `model` holding only stage `stage`'s blocks (and the ends that go with it)."""
    num_blocks = len(blocks_of(model))
    lo, hi = starts[stage], starts[stage + 1] if stage + 1 < len(starts) else num_blocks
    if isinstance(model, nn.Sequential):  # keep the original indices as names
        return nn.Sequential(OrderedDict((str(i), copy.deepcopy(model[i])) for i in range(lo, hi)))
    part = copy.deepcopy(model)
    for i, name in enumerate(list(part.layers.keys())):
        if not lo <= i < hi:
            del part.layers[name]
    if stage > 0:
        part.tok_emb = part.pos_emb = None
    if stage < len(starts) - 1:
        part.norm = part.head = None
    return part

