"""Hybrid parallelism: any dp x pp x tp mesh (the 3-D parallelism of Megatron-LM, Narayanan et
al., SC 2021; composed here as torchtitan does).

The model is cut into pipeline stages over the pp axis (pipeline/); each stage is split
Megatron-style over the tp axis (tensor/parallelize.py); and each resulting stage is data
parallel over the dp axis through FSDP2, either replicated (`dp_mode = "replicate"`: hybrid
sharding with shard groups of one, i.e. gradients all-reduced, DDP's math) or sharded
(`dp_mode = "shard"`: ZeRO-3). FSDP2 rather than DDP on the dp axis because DDP does not take the
DTensor parameters that tensor parallelism makes. The order (pp, then tp, then dp) is
torchtitan's `parallelize`.

`FaultTolerantHybrid`: the dp axis as torchft replica groups (`fault_tolerance.replica_groups`,
replica_groups.py): each group one pp x tp mesh and its own torchrun job, so a lost process
restarts its group alone while the others train on. After the schedule's backward every process
averages its stages' gradients (this process's shards, under tp) with the process in the same
place of every other group over the step's quorum (a torchft Manager per process, as torchft
serves groups of several ranks), and the update is applied only if the quorum commits. A
restarted group's processes each load the same place's live state from a healthy group: local
shards and optimizer state by parameter order, no collective (torchft calls it from its quorum
thread).
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.distributed.tensor.parallel import loss_parallel

from paratrain.comm import CommMeter, flatten, ring_allreduce_bytes, unflatten
from paratrain.config import Config
from paratrain.data import Batch
from paratrain.metrics import StepStats
from paratrain.strategies.base import local_part
from paratrain.strategies.data_parallel.ft import QuorumStep, shut_down, torchft_manager, write_replica_record
from paratrain.strategies.data_parallel.sync_batchnorm import synced
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
        part = synced(cfg, topo, part)  # model.sync_batchnorm: statistics over the dp axis
        shard = cfg.strategy.dp_mode == "shard"
        mesh = topo.mesh["dp"] if shard else topo.mesh["dp", "dp_shard"]
        shard_blocks(part, mesh, reshard_after_forward=shard)
        count_fsdp_traffic(part, meter, replicas=1 if shard else topo.size("dp"))
    return part


class Hybrid(Pipeline):
    name = "hybrid"

    def __init__(self, cfg: Config, topo, model: nn.Module, loss_fn, example: torch.Tensor | None = None):
        tp = topo.size("tp") > 1
        # Called by Pipeline.__init__ on each stage, once the base class has made self.meter.
        super().__init__(cfg, topo, model, replicated_loss(loss_fn) if tp else loss_fn,
                         shard_stage=lambda part: shard_stage(part, cfg, topo, self.meter),
                         loss_context=loss_parallel if tp else nullcontext, example=example)
        self.dropout_rng = DropoutRng(cfg, topo)  # replicated activations under plain TP (parallelize.py)

    def train_step(self, batch: Batch) -> StepStats:
        self.dropout_rng.share_once()
        return super().train_step(batch)


class FaultTolerantHybrid(QuorumStep, Hybrid):
    def __init__(self, cfg: Config, topo, model: nn.Module, loss_fn, example: torch.Tensor | None = None):
        super().__init__(cfg, topo, model, loss_fn, example)
        self.manager = torchft_manager(cfg, topo, self._live_state, self._load_live)
        self.params = [p for part in self.parts for p in part.parameters()]

    def train_step(self, batch: Batch) -> StepStats:
        return self.voted(super().train_step(batch))

    def average_gradients(self) -> None:
        """Every stage's gradients, one flat vector, averaged over the quorum (a member lost
        mid-way: torchft makes it a no-op and the step is not committed)."""
        for p in self.params:
            if p.grad is None:  # unused this step here: zeros, so that every group sends the same layout
                p.grad = torch.zeros_like(p)
        grads = [local_part(p.grad) for p in self.params]
        flat, t0 = flatten(grads), time.perf_counter()
        self.manager.allreduce(flat).wait()
        nbytes = ring_allreduce_bytes(flat.numel() * flat.element_size(), max(1, self.manager.num_participants()))
        self.meter.add(nbytes, time.perf_counter() - t0)
        for g, avg in zip(grads, unflatten(flat, grads)):
            g.copy_(avg)

    def commit(self) -> bool:
        return self.manager.should_commit()

    def close(self, run_dir) -> object:
        super().close(run_dir)
        write_replica_record(run_dir, self.topo, self.model, self.manager.current_step())
        shut_down(self.manager)
        return None

    # What a recovering group's process loads from the same place in a healthy group.
    def _live_state(self) -> dict:
        def copied(tensors: dict) -> dict:
            return {k: local_part(v).detach().clone() for k, v in tensors.items()}

        optimizers = []
        for opt in self.optimizer.optimizers:
            params = [p for g in opt.param_groups for p in g["params"]]
            optimizers.append({
                "state": [copied(opt.state[p]) if p in opt.state else None for p in params],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]})
        return {"parts": [copied(part.state_dict()) for part in self.parts], "optimizers": optimizers}

    @torch.no_grad()
    def _load_live(self, state: dict) -> None:
        from torch.distributed.tensor import DTensor

        for part, values in zip(self.parts, state["parts"]):
            for k, v in part.state_dict().items():  # views of the parameters and buffers: copied in place
                local_part(v).copy_(values[k])
        for opt, saved in zip(self.optimizer.optimizers, state["optimizers"]):
            params = [p for g in opt.param_groups for p in g["params"]]
            for p, entry in zip(params, saved["state"]):
                opt.state.pop(p, None)
                if entry is not None:  # as the optimizer keeps it: shards of a DTensor parameter as DTensors
                    opt.state[p] = {k: DTensor.from_local(v.clone(), p.device_mesh, p.placements, run_check=False)
                                    if isinstance(p, DTensor) and v.dim() else v.clone() for k, v in entry.items()}
            for g, hyper in zip(opt.param_groups, saved["param_groups"]):
                g.update(hyper)
