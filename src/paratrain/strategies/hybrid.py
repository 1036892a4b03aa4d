"""Hybrid parallelism: any dp x pp x tp mesh (the 3-D parallelism of Megatron-LM, Narayanan et
al., SC 2021; composed here as torchtitan does).

The model is cut into pipeline stages over the pp axis (pipeline.py); each stage is split
Megatron-style over the tp axis (tensor.py); and each resulting stage is data parallel over the
dp axis through FSDP2, either replicated (`dp_mode = "replicate"`: hybrid sharding with shard
groups of one, i.e. gradients all-reduced, DDP's math) or sharded (`dp_mode = "shard"`: ZeRO-3).
FSDP2 rather than DDP on the dp axis because DDP does not take the DTensor parameters that
tensor parallelism makes. The order (pp, then tp, then dp) is torchtitan's `parallelize`.
"""
from __future__ import annotations

import logging

import torch.nn as nn

from paratrain.config import Config, ConfigError
from paratrain.data import Batch
from paratrain.strategies.base import StepStats
from paratrain.strategies.pipeline import Pipeline, check_pipeline
from paratrain.strategies.zero import count_fsdp_traffic, shard_blocks
from paratrain.strategies.tensor import (check_tensor_parallel, loss_parallel, parallelize_gpt, replicated_loss,
                                         share_rng_state)
from paratrain.topology import ParallelDims


# Gathering a (dp-replicated, tp-sharded) parameter for a checkpoint takes two all-gathers, and
# torch warns about it on every rank at every save; a checkpoint is not the hot path.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


class Hybrid(Pipeline):
    name = "hybrid"

    @classmethod
    def parallel_dims(cls, cfg: Config, world_size: int) -> ParallelDims:
        s = cfg.strategy
        if world_size % (s.pp * s.tp):
            raise ConfigError(f"strategy.pp x strategy.tp = {s.pp} x {s.tp}: must divide the number of processes, "
                              f"{world_size}")
        dims = ParallelDims(dp=s.dp or world_size // (s.pp * s.tp), pp=s.pp, tp=s.tp)
        dims.check(world_size)
        if dims.tp > 1:
            check_tensor_parallel(cfg, dims.tp)
            if dims.pp > 1 and s.tensor.sequence_parallel:
                raise ConfigError("strategy.tensor.sequence_parallel = true: not with strategy.pp > 1 "
                                  "(stages exchange whole-sequence activations)")
        check_pipeline(cfg, pp=dims.pp, dp=dims.dp)
        return dims

    def __init__(self, cfg: Config, topo, model: nn.Module, loss_fn):
        tp = topo.size("tp") > 1
        if tp:  # the loss on vocabulary shards, as a plain tensor (tensor.py)
            loss_fn = replicated_loss(loss_fn)
        # Replicated activations under plain TP need the same dropout masks on every tp rank (tensor.py).
        self._share_rng = tp and cfg.model.dropout > 0 and not cfg.strategy.tensor.sequence_parallel
        super().__init__(cfg, topo, model, loss_fn)

    def train_step(self, batch: Batch) -> StepStats:
        if self._share_rng:
            self._share_rng = False
            share_rng_state(self.topo.group("tp"), self.topo.device)
        return super().train_step(batch)

    def parallelize_stage(self, part: nn.Module) -> nn.Module:
        if self.topo.size("tp") > 1:
            part = parallelize_gpt(part, self.topo.mesh["tp"], self.cfg.strategy.tensor.sequence_parallel)
        if self.topo.size("dp") > 1:
            shard = self.cfg.strategy.dp_mode == "shard"
            mesh = self.topo.mesh["dp"] if shard else self.topo.mesh["dp", "dp_shard"]
            shard_blocks(part, mesh, reshard_after_forward=shard)
            count_fsdp_traffic(part, self.meter, replicas=1 if shard else self.topo.size("dp"))
        return part

    def loss_context(self):
        return loss_parallel() if self.topo.size("tp") > 1 else super().loss_context()
