"""Sharded data parallelism: ZeRO stages 1-3 (Rajbhandari et al., "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", SC 2020), on torch's own implementations.

Data parallelism keeps N copies of everything; ZeRO partitions the model states over the N
data-parallel ranks instead. With fp32 Adam (4 bytes of parameters, 4 of gradients and 8 of
moments per parameter) a rank of P parameters holds, per the paper:

    ddp 16P    zero1 4P + 4P + 8P/N    zero2 4P + 12P/N    zero3 16P/N

- `zero1` partitions the optimizer state: DDP all-reduces full gradients, then
  `ZeroRedundancyOptimizer` steps only this rank's share of the parameters (whole tensors,
  assigned greedily by size) and broadcasts the updated share to the others. That is 1.5x the
  paper's stage-1 traffic (which reduce-scatters gradients instead of all-reducing them).
- `zero2` / `zero3` are FSDP2 (`fully_shard`, torch 2.4+): parameters, gradients and optimizer
  state are sharded on dim 0 across the dp mesh axis; each block's parameters are all-gathered
  just before its forward and gradients are reduce-scattered after its backward. zero3 frees the
  gathered parameters after forward and gathers them again for backward
  (reshard_after_forward=True); zero2 keeps them from forward to the end of backward. So at rest,
  between steps, FSDP2's zero2 holds sharded parameters too; it differs from zero3 in peak
  memory and in one all-gather less per step, not in what `state_bytes` sees. Its model states
  peak at the end of forward: the gathered 4P beside its own 4P/N shard and 8P/N of optimizer
  state, ZeRO-2's 4P + 12P/N in all (the parameter shard where ZeRO-2 has a gradient shard).

Bytes: FSDP2 all-gathers and reduce-scatters are counted at the call (custom comms that wrap
the default ones). ZeroRedundancyOptimizer's parameter broadcasts are private to it, so they are
charged once per step, computed: an all-gather of the parameters, (N-1)/N of their bytes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# The comm interfaces that FSDPModule.set_custom_all_gather / set_custom_reduce_scatter take;
# torch 2.13 documents them there but exports them only from this private module.
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from paratrain.comm import CommMeter, ring_allgather_bytes, ring_allreduce_bytes, ring_reduce_scatter_bytes, timed
from paratrain.data import Batch
from paratrain.optim import build_optimizer, optimizer_spec
from paratrain.strategies.base import StepStats, Strategy, local_step, to_cpu
from paratrain.strategies.data_parallel.ddp import DDP
from paratrain.strategies.data_parallel.sync_batchnorm import synced

_LOW_PRECISION = {"bf16": torch.bfloat16}


# ---------------------------------------------------------------------------- ZeRO-1


class Zero1(DDP):
    name = "zero1"

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)  # DDP, and a plain optimizer (holds no state yet)
        # Imported here: importing torch.distributed.optim scripts its functional optimizers, which
        # costs start-up time and (torch 2.13) a deprecation warning for each, in every process.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        cls, kwargs = optimizer_spec(cfg.optimizer)
        self.optimizer = ZeroRedundancyOptimizer(self.model.parameters(), optimizer_class=cls,
                                                 process_group=topo.group("dp"), **kwargs)

    def train_step(self, batch: Batch) -> StepStats:
        # The broadcast of updated shards happens inside ZeroRedundancyOptimizer.step, out of reach
        # of the meter: charge it here, as the all-gather of all parameters that it amounts to.
        param_bytes = sum(p.numel() * p.element_size() for p in self.module.parameters())
        self.meter.add(ring_allgather_bytes(param_bytes, self.topo.size("dp")), 0.0)
        return super().train_step(batch)

    # torch.distributed.checkpoint.state_dict does not know ZeroRedundancyOptimizer (its state is
    # split over ranks and keyed by index), so translate to the same name-keyed full format.
    def state_dict(self, group=None) -> dict:
        self.optimizer.consolidate_state_dict(to=0)  # a collective: every rank sends its share
        model = to_cpu(self.module.state_dict())
        if self.topo.axis_rank("dp") != 0:  # only rank 0 holds the consolidated state (and only it is gathered)
            return {"model": model, "optimizer": {"state": {}, "param_groups": []}}
        full, names = self.optimizer.state_dict(), self._param_names()
        groups = [{**local, "params": [names[i] for i in g["params"]]}
                  for g, local in zip(full["param_groups"], self.optimizer.optim.state_dict()["param_groups"])]
        return {"model": model, "optimizer": {"state": {names[i]: to_cpu(s) for i, s in full["state"].items()},
                                              "param_groups": groups}}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        index = {name: i for i, name in enumerate(self._param_names())}
        optim = state["optimizer"]
        self.optimizer.load_state_dict({
            "state": {index[k]: v for k, v in optim["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in optim["param_groups"]]})
        # Optimizer.load_state_dict also filled the wrapper's own `state` with a copy of what this
        # rank owns; only the local optimizer's copy is used, so drop the duplicate.
        self.optimizer.state.clear()

    def _param_names(self) -> list[str]:
        # ZeroRedundancyOptimizer indexes parameters in the order they were passed (one group).
        return [name for name, _ in self.module.named_parameters()]


# ---------------------------------------------------------------------------- ZeRO-2/3: FSDP2


class _CountedAllGather(AllGather):
    """FSDP2's default all-gather, charged to the meter: (N-1)/N of the gathered bytes per rank."""

    def __init__(self, meter: CommMeter):
        self.meter = meter

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        n = dist.get_world_size(group)
        nbytes = ring_allgather_bytes(output_tensor.numel() * output_tensor.element_size(), n)
        return timed(self.meter, nbytes, lambda: dist.all_gather_single(
            output_tensor, input_tensor, group=group, async_op=async_op))


class _CountedReduceScatter(ReduceScatter):
    """FSDP2's default reduce-scatter, charged to the meter: (N-1)/N of the gradient bytes per rank."""

    def __init__(self, meter: CommMeter):
        self.meter = meter

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        n = dist.get_world_size(group)
        nbytes = ring_reduce_scatter_bytes(input_tensor.numel() * input_tensor.element_size(), n)
        return timed(self.meter, nbytes, lambda: dist.reduce_scatter_single(
            output_tensor, input_tensor, op=op, group=group, async_op=async_op))


def shard_blocks(model: nn.Module, mesh, reshard_after_forward: bool, policy=MixedPrecisionPolicy(),
                 root_policy=None) -> nn.Module:
    """FSDP2 units: one per transformer block (the torchtitan convention: blocks in `model.layers`),
    so only one block's parameters are unsharded at a time; the root unit takes the rest."""
    blocks = model.layers.values() if isinstance(getattr(model, "layers", None), nn.ModuleDict) else ()
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward,
                       mp_policy=root_policy or policy)


def count_fsdp_traffic(model: nn.Module, meter: CommMeter, replicas: int = 1) -> None:
    """Charge every FSDP2 unit's all-gathers and reduce-scatters to `meter`, and with hybrid
    sharding over `replicas` > 1 groups also the gradient all-reduce across them (counted in
    FSDP2's post-all-reduce hook: bytes only, its time is inside backward)."""
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_custom_all_gather(_CountedAllGather(meter))
            unit.set_custom_reduce_scatter(_CountedReduceScatter(meter))
            if replicas > 1:
                unit.set_all_reduce_hook(lambda out: meter.add(
                    ring_allreduce_bytes(out.numel() * out.element_size(), replicas), 0.0))


class _FullyShard(Strategy):
    reshard_after_forward: ClassVar[bool]

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        mp = cfg.strategy.zero.mixed_precision
        # Low-precision parameters for compute and communication; gradients reduced in fp32 so
        # that the sum over ranks does not lose what bf16 would round away.
        policy = root_policy = MixedPrecisionPolicy()
        if mp != "off":
            policy = MixedPrecisionPolicy(param_dtype=_LOW_PRECISION[mp], reduce_dtype=torch.float32)
            # The model's output in fp32: the loss's log-softmax over the vocabulary is where
            # bf16 loses most precision. Blocks pass activations on in low precision.
            root_policy = MixedPrecisionPolicy(param_dtype=_LOW_PRECISION[mp], reduce_dtype=torch.float32,
                                               output_dtype=torch.float32)
        self.model = synced(cfg, topo, self.model)
        shard_blocks(self.model, topo.mesh["dp"], self.reshard_after_forward, policy, root_policy)
        count_fsdp_traffic(self.model, self.meter)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())  # over the shards (DTensors)

    def train_step(self, batch: Batch) -> StepStats:
        return local_step(self, batch, accumulate=self._no_sync)

    @contextmanager
    def _no_sync(self):
        # FSDP2's no_sync: accumulate unsharded gradients locally, reduce-scatter on the last micro-batch.
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def evaluate(self, batches: list[Batch]) -> list[float]:
        loss = super().evaluate(batches)
        # zero2 does not reshard after forward, and no backward follows here: free the gathered
        # parameters now rather than keep them unsharded until the next step's backward.
        for unit in self.model.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()
        return loss


class Zero2(_FullyShard):
    name = "zero2"
    reshard_after_forward = False


class Zero3(_FullyShard):
    name = "zero3"
    reshard_after_forward = True
