"""Hybrid parallelism: any dp x pp x tp mesh (the 3-D parallelism of Megatron-LM, Narayanan et
al., SC 2021; composed here as torchtitan does).

The model is cut into pipeline stages over the pp axis (pipeline/); each stage is split
Megatron-style over the tp axis (tensor/parallelize.py); and each resulting stage is data
parallel over the dp axis through FSDP2, either replicated (`dp_mode = "replicate"`: hybrid
sharding with shard groups of one, i.e. gradients all-reduced, DDP's math) or sharded
(`dp_mode = "shard"`: ZeRO-3). FSDP2 rather than DDP on the dp axis because DDP does not take the
DTensor parameters that tensor parallelism makes. The order (pp, then tp, then dp) is
torchtitan's `parallelize`.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch.nn as nn
from torch.distributed.tensor.parallel import loss_parallel

from paratrain.comm import CommMeter
from paratrain.config import Config
from paratrain.data import Batch
from paratrain.metrics import StepStats
from paratrain.strategies.data_parallel.zero import count_fsdp_traffic, shard_blocks
from paratrain.strategies.pipeline.pipeline import Pipeline
from paratrain.strategies.tensor.parallelize import DropoutRng, parallelize_gpt, replicated_loss
from paratrain.topology import Topology

# Gathering a (dp-replicated, tp-sharded) parameter for a checkpoint takes two all-gathers, and
# torch warns about it on every rank at every save; a checkpoint is not the hot path.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def shard_stage(part: nn.Module, cfg: Config, topo: Topology, meter: CommMeter) -> nn.Module:
    """One pipeline stage split over tp, then data parallel over dp (replicated or sharded)."""
    if topo.size("tp") > 1:
        part = parallelize_gpt(part, topo.mesh["tp"], cfg.strategy.tensor.sequence_parallel)
    if topo.size("dp") > 1:
        shard = cfg.strategy.dp_mode == "shard"
        mesh = topo.mesh["dp"] if shard else topo.mesh["dp", "dp_shard"]
        shard_blocks(part, mesh, reshard_after_forward=shard)
        count_fsdp_traffic(part, meter, replicas=1 if shard else topo.size("dp"))
    return part


class Hybrid(Pipeline):
    name = "hybrid"

    def __init__(self, cfg: Config, topo, model: nn.Module, loss_fn):
        tp = topo.size("tp") > 1
        # Called by Pipeline.__init__ on each stage, once the base class has made self.meter.
        super().__init__(cfg, topo, model, replicated_loss(loss_fn) if tp else loss_fn,
                         shard_stage=lambda part: shard_stage(part, cfg, topo, self.meter),
                         loss_context=loss_parallel if tp else nullcontext)
        self.dropout_rng = DropoutRng(cfg, topo)  # replicated activations under plain TP (parallelize.py)

    def train_step(self, batch: Batch) -> StepStats:
        self.dropout_rng.share_once()
        return super().train_step(batch)
