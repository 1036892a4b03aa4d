"""The strategy interface: how a parallel technique plugs into the trainer.

A strategy owns what one rank holds of the model, its optimizer and the communication of a
training step. The trainer gives it this rank's share of a global batch and gets `StepStats`
back; it never knows which strategy runs. This base class is the plain local step (forward,
backward over micro-batches, optimizer step); data-parallel strategies override `wrap` and
`no_sync`, while strategies that own their schedule (pipelines, parameter servers) override
`train_step` itself.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor

from paratrain.comm import CommMeter
from paratrain.config import Config
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.topology import ParallelDims, Topology


@dataclass
class StepStats:
    loss: float  # mean over the global batch where the step communicates; else this rank's own (extra["loss_ranks"])
    samples: int  # processed by this rank
    tokens: int
    compute_s: float = 0.0  # forward + backward (with whatever communication it could not hide)
    comm_s: float = 0.0  # time inside collectives; for DDP it overlaps compute
    optim_s: float = 0.0
    wait_s: float = 0.0  # waiting for other ranks (asynchronous strategies)
    bytes_sent: int = 0  # payload this rank put on the wire
    extra: dict = field(default_factory=dict)  # strategy-specific numbers, merged into the step record
    skipped: bool = False  # a straggler dropped this step's computation to keep pace (nothing computed)


class Strategy:
    name: ClassVar[str]

    @classmethod
    def parallel_dims(cls, cfg: Config, world_size: int) -> ParallelDims:
        """Degrees this strategy uses on `world_size` processes; raise ConfigError if it cannot."""
        return ParallelDims(dp=world_size)

    def __init__(self, cfg: Config, topo: Topology, model: nn.Module, loss_fn: Callable):
        self.cfg, self.topo, self.loss_fn = cfg, topo, loss_fn
        self.meter = CommMeter()
        self.model = self.wrap(model.to(topo.device))
        self.optimizer = self.make_optimizer(self.model.parameters())

    # -- hooks for data-parallel variants
    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return build_optimizer(self.cfg.optimizer, params)

    def loss_context(self):
        """Context around forward, loss and backward (tensor parallel: vocabulary-parallel loss)."""
        return nullcontext()

    def no_sync(self):
        """Context for micro-batches whose gradients are accumulated without communicating."""
        return nullcontext()

    @property
    def module(self) -> nn.Module:
        """The plain model (what a checkpoint stores)."""
        return self.model

    # -- data placement
    @property
    def dp_rank(self) -> int:
        return self.topo.axis_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.topo.size("dp")

    @property
    def holds_unique_state(self) -> bool:
        """One rank per pipeline stage contributes to a checkpoint (dp and tp copies are equal once full)."""
        return self.topo.axis_rank("dp") == 0 and self.topo.axis_rank("tp") == 0

    # -- the step
    def train_step(self, batch: Batch) -> StepStats:
        micro = batch.split(self.cfg.training.grad_accum_steps)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.topo.device)
        for i, mb in enumerate(micro):
            with self.no_sync() if i < len(micro) - 1 else nullcontext(), self.loss_context():
                loss = self.loss_fn(self.model(mb.inputs), mb.targets) / len(micro)
                loss.backward()
            loss_sum += loss.detach()
        t1 = time.perf_counter()
        if self.cfg.optimizer.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        finite = self.update_is_finite(loss_sum, self.model.parameters())
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        loss = self.mean_over_dp(loss_sum)
        nbytes, comm_s = self.meter.take()
        return StepStats(loss, batch.num_samples, batch.num_tokens, compute_s=t1 - t0, comm_s=comm_s,
                         optim_s=t2 - t1, bytes_sent=nbytes, extra={} if finite else {"nonfinite": True})

    # Ranks that take every step together (False: replicas that update alone: local SGD, DiLoCo,
    # gossip, Hogwild, parameter-server workers); they agree on non-finite updates with one
    # all-reduce a step.
    lockstep = True

    def update_is_finite(self, loss: torch.Tensor, params) -> bool:
        """Before an update: False to skip it (training.on_nonfinite = 'skip'), NonFiniteError to stop."""
        from paratrain.nonfinite import NonFiniteError, bad_ranks

        bad, where = bad_ranks(loss, list(params), self.topo.rank, self.topo.world_size, self.lockstep)
        if bad and self.cfg.training.on_nonfinite == "stop":
            raise NonFiniteError(bad, where=where)
        return not bad

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.model.eval()
        with self.loss_context():
            total = sum(self.loss_fn(self.module(b.inputs), b.targets) for b in batches) / len(batches)
        self.model.train()
        return self.mean_over_dp(total.detach().float())

    def mean_over_dp(self, value: torch.Tensor) -> float:
        if self.dp_size > 1:
            value = self.meter.all_reduce(value.reshape(1).clone(), self.topo.group("dp")) / self.dp_size
        return value.item()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_bytes(self) -> dict:
        """Bytes of parameters, gradients and optimizer state this rank holds: local shards only.

        Counts the parameters the optimizer updates (DTensors by their local shard), their
        gradients where present (the step sets them to None, so measure between backward and
        step to see them), and the optimizer's tensors (ZeroRedundancyOptimizer: this rank's share).
        Compare with ZeRO's per-rank model states for fp32 Adam: ddp 16P, ZeRO-1 4P + 4P + 8P/N,
        ZeRO-2 4P + 12P/N, ZeRO-3 16P/N.
        """
        # Imported here: importing torch.distributed.optim scripts its functional optimizers, which
        # costs start-up time and (torch 2.13) a deprecation warning for each, in every process.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        local = self.optimizer.optim if isinstance(self.optimizer, ZeroRedundancyOptimizer) else self.optimizer
        optim = [t for s in local.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return {"params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params if p.grad is not None),
                "optimizer": _local_bytes(optim)}

    # -- asynchronous strategies
    trains = True  # False on ranks that serve others (parameter servers) instead of training

    def serve(self) -> None:
        """On ranks that do not train: serve the others until they are done."""
        raise NotImplementedError(f"{type(self).__name__} has no serving ranks")

    def outside_training(self, seconds: float) -> None:
        """Time the trainer spent on evaluation and checkpoints after a step (strategies that
        budget their steps by time leave it out of the budget)."""

    def live_group(self):
        """The ranks still in the job, for end-of-run gathers and checkpoints (None: all of them).
        Strategies that survive a lost rank return the survivors' group."""
        return None

    checkpoints_on_stop = True  # False where a stop cannot gather a checkpoint (parameter servers)

    def agree_to_stop(self, signum: int) -> int:
        """After each step: this rank's pending signal (0: none) -> the one every rank stops on now
        (0: go on). Here one all-reduce over the world, since every rank takes every step together."""
        if self.topo.world_size == 1:
            return signum
        flag = torch.tensor([float(signum)], device=self.topo.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # not metered: no training traffic
        return int(flag.item())

    def close(self, run_dir) -> None:
        """After the last step: write what this strategy alone records (collective on all ranks)."""

    # -- checkpoints: full (unsharded) tensors keyed by parameter name, so that a checkpoint
    # written under one layout loads under any other (torch.distributed.checkpoint.state_dict).
    def state_dict(self) -> dict:
        """What this rank holds, unsharded; a collective where parameters are sharded."""
        model, optim = get_state_dict(self.module, self.optimizer, options=StateDictOptions(full_state_dict=True))
        return {"model": to_cpu(model), "optimizer": to_cpu(optim)}

    def load_state_dict(self, state: dict) -> None:
        load_full_state(self.module, self.optimizer, state)


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load the entries of a full, name-keyed state that `module` holds (any layout wrote it)."""
    mine = set(module.state_dict())
    model = {k: v for k, v in state["model"].items() if k in mine}
    optim = _select_optim(state["optimizer"], mine)
    if not any(torch.is_tensor(v) and v.dim() for s in optim["state"].values() for v in s.values()):
        # Stateless optimizer (plain SGD): torch's loader cannot place it on a device; nothing to load.
        set_model_state_dict(module, model, options=StateDictOptions(full_state_dict=True))
        return
    set_state_dict(module, optimizer, model_state_dict=model, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))


def _local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard; a plain tensor whole)."""
    return sum(t.numel() * t.element_size() for t in
               (t.to_local() if isinstance(t, DTensor) else t for t in tensors))


def to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def _select_optim(optim: dict, names: set) -> dict:
    groups = [{**g, "params": [p for p in g["params"] if p in names]} for g in optim["param_groups"]]
    return {"state": {k: v for k, v in optim["state"].items() if k in names}, "param_groups": groups}
