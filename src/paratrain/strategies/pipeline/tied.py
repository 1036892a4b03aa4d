"""A parameter that a pipeline's stages hold in several copies: tied input and output embeddings.

A model that ties a parameter under two names (a transformers GPT-2's `lm_head.weight` is its
`transformer.wte.weight`) and is traced into stages (split.py) has a copy of it on every stage that
uses it: the embedding on the first, the output head on the last. In a single process that one
parameter's gradient is the sum of both uses'; so here every copy gets the sum of the copies'
gradients, over the pipeline ranks, before the update (Megatron-LM's embedding all-reduce between
its first and last stages, Shoeybi et al. 2019). The copies start equal and take the same update,
so they stay equal. The clipping norm counts the parameter once, and a checkpoint holds its
optimizer state once, under the name the plain model's optimizer knows it by (its first), as every
other layout writes it. Written here: torch.distributed.pipelining copies a tied parameter into its
traced stages and leaves keeping the copies equal to the user.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from paratrain import messages
from paratrain.comm import CommMeter
from paratrain.strategies.base import local_part
from paratrain.topology import Topology


class TiedCopies:
    def __init__(self, groups: list[list[str]], model: nn.Module, parts: list[nn.Module], topo: Topology):
        """`groups`: each tied parameter's names (layout.tied_parameters); `parts`: this rank's stages.
        Collective over the pp group (which ranks hold a copy of each)."""
        self.groups, self.topo = groups, topo
        self.copies = [list({id(p): p for part in parts for n, p in part.named_parameters(remove_duplicate=False)
                             if n in names}.values()) for names in groups]
        held = [[bool(c) for c in self.copies]]
        if groups and topo.size("pp") > 1:
            held = messages.all_gather(held[0], group=topo.group("pp"))
        self.ranks = [[r for r, h in enumerate(held) if h[i]] for i in range(len(groups))]  # pp ranks with a copy
        params = dict(model.named_parameters(remove_duplicate=False))
        self.originals = [params[names[0]] for names in groups]  # shape and dtype, for a rank with no copy

    def sum_gradients(self, meter: CommMeter) -> None:
        """Every copy gets the sum of the copies' gradients (under hybrid's FSDP every copy is
        sharded alike over dp: the local shards are summed)."""
        for copies, ranks, original in zip(self.copies, self.ranks, self.originals):
            if len(ranks) <= 1 and len(copies) <= 1:  # one copy in all
                continue
            total = torch.zeros_like(local_part(copies[0].detach()) if copies else original, device=self.topo.device)
            for p in copies:
                if p.grad is not None:
                    total += local_part(p.grad)
            if len(ranks) > 1:
                meter.all_reduce(total, self.topo.group("pp"))
            for p in copies:
                if p.grad is not None:
                    local_part(p.grad).copy_(total)
                elif hasattr(p, "to_local"):  # a copy this stage did not use, FSDP-sharded
                    from torch.distributed.tensor import DTensor

                    p.grad = DTensor.from_local(total.clone(), p.device_mesh, p.placements, shape=p.shape,
                                                stride=p.stride())
                else:
                    p.grad = total.clone()

    def counted_once(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """`params` (this rank's) with each tied parameter's copies left out but one, on the first pp
        rank holding one: the norm over the ranks is then the single model's."""
        me, others = self.topo.axis_rank("pp"), set()
        for copies, ranks in zip(self.copies, self.ranks):
            others |= {id(p) for p in (copies[1:] if ranks and ranks[0] == me else copies)}
        return [p for p in params if id(p) not in others]

    def to_checkpoint(self, state: dict) -> dict:
        """A merged state (checkpoint.merge_states) with each tied parameter's optimizer state under
        its first name only (its copies' are the same)."""
        optim, aliases = state["optimizer"], {n for names in self.groups for n in names[1:]}
        optim["state"] = {k: v for k, v in optim["state"].items() if k not in aliases}
        for g in optim["param_groups"]:
            g["params"] = [n for n in g["params"] if n not in aliases]
        return state

    def from_checkpoint(self, state: dict) -> dict:
        """A checkpoint's state with the first name's optimizer state given to every copy's name."""
        optim = {"state": dict(state["optimizer"]["state"]),
                 "param_groups": [dict(g) for g in state["optimizer"]["param_groups"]]}
        for first, *others in self.groups:
            for n in others:
                if first in optim["state"]:
                    optim["state"][n] = copy.deepcopy(optim["state"][first])  # torch's loader moves what it loads
                for g in optim["param_groups"]:
                    g["params"] = g["params"] + [n] if first in g["params"] else g["params"]
        return {**state, "optimizer": optim}
