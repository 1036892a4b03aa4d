"""Synchronous data parallelism with torch DistributedDataParallel (Li et al., VLDB 2020).

Every rank holds the whole model and a slice of the global batch; gradients are averaged by
bucketed all-reduce overlapped with the backward pass. Gradient accumulation skips the
all-reduce on all but the last micro-batch (`no_sync`). A comm hook counts the bytes and
time of each bucket's all-reduce; with `strategy.compression.codec` set, the codec's hook
(paratrain.compression.adapters: its own codecs, or torch's PowerSGD) replaces it, counting too.
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.

import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from paratrain.comm import CommMeter, counted, ring_allreduce_bytes
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.strategies.base import StepStats, Strategy, local_step
from paratrain.strategies.data_parallel.sync_batchnorm import synced


class _HookState:
    def __init__(self, group, meter: CommMeter):
        self.group, self.meter = group, meter
        self.world = dist.get_world_size(group)


def timed_allreduce_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's default allreduce hook (average), plus bytes and launch-to-completion time."""
    t0 = time.perf_counter()
    buf = bucket.buffer().div_(state.world)
    fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()
    nbytes = ring_allreduce_bytes(buf.numel() * buf.element_size(), state.world)
    return counted(state.meter, nbytes, t0, fut, lambda f: f.value()[0])


class DDP(Strategy):
    name = "ddp"

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        opts, device, group = cfg.strategy.ddp, topo.device, topo.group("dp")
        self.model = DistributedDataParallel(
            synced(cfg, topo, self.model),
            device_ids=[device] if device.type == "cuda" else None,
            process_group=group,
            bucket_cap_mb=opts.bucket_mb,
            gradient_as_bucket_view=opts.gradient_as_bucket_view,
        )
        self.model.register_comm_hook(*self._comm_hook(group))
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())

    def _comm_hook(self, group) -> tuple:
        """(state, hook) for DDP: the timed plain all-reduce, or the configured codec's."""
        c = self.cfg.strategy.compression
        if c.codec == "none":
            return _HookState(group, self.meter), timed_allreduce_hook
        from paratrain.compression import adapters, make_codec

        if c.codec == "powersgd":
            return adapters.PowerSGDHookState(group, self.meter, c.rank, c.error_feedback), adapters.powersgd_hook
        codec = make_codec(c.codec, ratio=c.ratio, error_feedback=c.error_feedback)
        return adapters.CodecHookState(codec, group, self.meter), adapters.codec_hook

    def train_step(self, batch: Batch) -> StepStats:
        # Micro-batches but the last accumulate without the all-reduce.
        return local_step(self, batch, accumulate=self.model.no_sync)

    @property
    def module(self) -> nn.Module:
        return self.model.module
