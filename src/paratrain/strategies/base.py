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
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from paratrain.comm import CommMeter
from paratrain.config import Config
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.topology import ParallelDims, Topology


@dataclass
class StepStats:
    loss: float  # mean over the global batch
    samples: int  # processed by this rank
    tokens: int
    compute_s: float = 0.0  # forward + backward (with whatever communication it could not hide)
    comm_s: float = 0.0  # time inside collectives; for DDP it overlaps compute
    optim_s: float = 0.0
    wait_s: float = 0.0  # waiting for other ranks (asynchronous strategies)
    bytes_sent: int = 0  # payload this rank put on the wire


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
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())

    # -- hooks for data-parallel variants
    def wrap(self, model: nn.Module) -> nn.Module:
        return model

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

    # -- the step
    def train_step(self, batch: Batch) -> StepStats:
        micro = batch.split(self.cfg.training.grad_accum_steps)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.topo.device)
        for i, mb in enumerate(micro):
            with self.no_sync() if i < len(micro) - 1 else nullcontext():
                loss = self.loss_fn(self.model(mb.inputs), mb.targets) / len(micro)
                loss.backward()
            loss_sum += loss.detach()
        t1 = time.perf_counter()
        if self.cfg.optimizer.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        loss = self.mean_over_dp(loss_sum)
        nbytes, comm_s = self.meter.take()
        return StepStats(loss, batch.num_samples, batch.num_tokens, compute_s=t1 - t0, comm_s=comm_s,
                         optim_s=t2 - t1, bytes_sent=nbytes)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.model.eval()
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

    # -- checkpoints
    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
