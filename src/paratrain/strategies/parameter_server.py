"""Parameter server: workers push gradients, servers own the parameters and apply the optimizer.

Li et al., "Scaling Distributed Machine Learning with the Parameter Server", OSDI 2014, with its
three consistency models: BSP (bulk synchronous: a server waits for every live worker's gradient
of a step, averages them and updates once, the same math as ddp), ASP (asynchronous: every
gradient is applied on arrival and answered at once) and SSP (stale synchronous, Ho et al.,
"More Effective Distributed ML via a Stale Synchronous Parallel Parameter Server", NeurIPS 2013:
applied on arrival, but a worker's pull is answered only while its clock is at most
`strategy.ps.staleness` ahead of the slowest live worker's).

Ranks: W workers, then S = `strategy.ps.servers` servers (the last ranks, so that rank 0 is a
worker: the chief, which shows progress, writes checkpoints and the summary). The data-parallel
mesh axis spans the workers only (`ServerDims`), so the global batch is split W ways and the
topology's dp group is the workers' group. Servers hold whole tensors, balanced by size
(ps_protocol.partition), and the configured optimizer over their shard; a server's learning
rate for a gradient is the one the pushing worker's trainer computed for that worker's step
(carried in the push): with W asynchronous workers the server makes W updates per step of
data, so its own update count would run the schedule W times too fast. For the same reason ASP
and SSP want a smaller learning rate than BSP (measured: configs/mlp.toml's SGD, lr 0.05 and
momentum 0.9, diverged with 3 SSP workers and trained with lr 0.05 / 3).

A worker's step: forward and backward on its batch, push each server its part of the gradient,
pull the updated part back (the reply to the push), copy it into the model. `wait_s` is the
time blocked for the replies (the server's work, BSP's round, SSP's gate); `bytes_sent` is
exactly headers + gradient; the step record adds `staleness` (largest over servers) and
`bytes_received` (reply headers + parameters). The staleness of an applied gradient is the
server's version (updates applied) at apply time minus the version it was computed on: 0 under
BSP; under SSP with bound s and W workers at most (W-1)(2s+1), since between a worker's read at
clock c (all others at >= c-s) and its push, another worker can push at most up to clock c+s+1;
unbounded under ASP. Each server writes metrics/ps_server<rank>.json (histogram, bytes, lost
workers) at the end.

Training steps have no collectives among workers: the logged loss is the worker's own batch's.
Evaluation (mean over live workers), checkpoints and the end of the run go through `live_group`:
a membership barrier at server 0 (asynchronous workers meet there), whose reply lists the live
workers, then a group of exactly those. A lost worker (its connection closes: see ps_protocol.Inbox) is dropped by every server;
BSP rounds and SSP's slowest clock then count only the live ones and training goes on. Rank 0
cannot be lost (the checkpoints' collectives gather on it), nor can a server (a worker's receive
from it fails with gloo's error). Checkpoints hold the servers' state:
the chief asks each server for its shard and optimizer state at each checkpoint and writes one
ordinary, name-keyed checkpoint (any strategy can resume it, and this one any other's); on
resume every server loads its shard from it. Gradient clipping is refused: each server holds
part of the gradient, and the global norm would need the servers to talk to each other.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from paratrain.checkpoint import merge_states
from paratrain.config import Config, ConfigError
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.strategies import ps_protocol as wire
from paratrain.strategies.base import StepStats, Strategy, to_cpu
from paratrain.strategies.ps_server import Server, load_named_optimizer
from paratrain.topology import ParallelDims


def _needs_gloo(device: str) -> ConfigError:
    # A server blocks in one receive per worker at once (ps_protocol.Inbox); NCCL runs a
    # communicator's operations in order, so the first pending receive would hold up the others.
    return ConfigError(f"run.device = '{device}': parameter_server runs on gloo (CPU) only; use 'cpu'")


@dataclass(frozen=True)
class ServerDims(ParallelDims):
    """dp = the workers; the servers are `servers` more ranks after them, on no mesh axis.

    Neither ParallelDims(dp=world) (validate would ask the global batch to divide by W + S) nor
    ParallelDims(dp=W) (check: dp x pp x tp must be the world) fits; this keeps validate's batch
    check and the topology untouched, and the mesh (torch allows one smaller than the world)
    makes the workers' dp group with every rank taking part, as new_group requires."""
    servers: int = 0

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp + self.servers


class ParameterServer(Strategy):
    name = "parameter_server"

    @classmethod
    def parallel_dims(cls, cfg: Config, world_size: int) -> ParallelDims:
        servers, f = cfg.strategy.ps.servers, cfg.faults
        if servers >= world_size:
            raise ConfigError(f"strategy.ps.servers = {servers}: leaves no worker among {world_size} processes; "
                              f"use at most {world_size - 1}")
        workers = world_size - servers
        if cfg.run.device == "cuda":
            raise _needs_gloo(cfg.run.device)
        if cfg.optimizer.grad_clip:
            raise ConfigError(f"optimizer.grad_clip = {cfg.optimizer.grad_clip}: parameter_server does not clip "
                              "(each server holds part of the gradient); set 0")
        if f.rank >= workers:
            raise ConfigError(f"faults.rank = {f.rank}: a server (ranks {workers}..{world_size - 1} serve); "
                              f"faults act on training steps: pick a worker, 0..{workers - 1}")
        if f.rank == 0 and f.kill_at_step >= 0:
            raise ConfigError("faults.rank = 0: parameter_server's rank 0 is the chief worker (checkpoints, "
                              "summary) and cannot be lost; kill another worker")
        return ServerDims(dp=workers, servers=servers)

    # -- roles and the shard layout, settled before the base class builds the optimizer
    def wrap(self, model: nn.Module) -> nn.Module:
        self.num_workers = self.topo.size("dp")
        self.is_server = self.topo.rank >= self.num_workers
        self.trains = not self.is_server
        if self.topo.device.type != "cpu":  # run.device = 'auto' found a GPU
            raise _needs_gloo(self.cfg.run.device)
        params = dict(model.named_parameters())
        if len({p.dtype for p in params.values()}) > 1:
            raise ConfigError("strategy.name = 'parameter_server': the model's parameters must share one dtype")
        layout = wire.partition({n: p.numel() for n, p in params.items()}, self.topo.world_size - self.num_workers)
        self.shard_names = layout  # per server index
        self.shards = [[params[n] for n in names] for names in layout]
        self.server_ranks = [self.num_workers + s for s in range(len(layout))]
        self.clock, self.lr = 0, self.cfg.optimizer.lr
        self.versions = [0] * len(layout)  # worker: the version of each shard it holds
        self._groups: dict[tuple, object] = {}
        self._final_members = None
        return model

    def make_optimizer(self, params) -> torch.optim.Optimizer | None:
        if not self.is_server:
            return None  # workers never step: the servers own the optimizer
        shard = self.shards[self.topo.rank - self.num_workers]
        return build_optimizer(self.cfg.optimizer, shard) if shard else None

    def set_lr(self, lr: float) -> None:
        self.lr = lr  # sent with the next push; the server applies it

    @property
    def dp_rank(self) -> int:
        return 0 if self.is_server else self.topo.rank  # servers read no data

    @property
    def dp_size(self) -> int:
        return self.num_workers

    @property
    def holds_unique_state(self) -> bool:
        return self.topo.rank == 0  # the chief writes what it fetched from the servers

    def _busy_servers(self) -> list[int]:
        return [s for s, names in enumerate(self.shard_names) if names]  # more servers than tensors: idle ones

    # -- a worker's step
    def train_step(self, batch: Batch) -> StepStats:
        micro = batch.split(self.cfg.training.grad_accum_steps)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.topo.device)
        for mb in micro:
            loss = self.loss_fn(self.model(mb.inputs), mb.targets) / len(micro)
            loss.backward()
            loss_sum += loss.detach()
        t1 = time.perf_counter()
        busy = self._busy_servers()
        replies = {s: (torch.zeros(wire.PUSH_REPLY_NUMEL, dtype=torch.float64),
                       torch.empty(sum(p.numel() for p in self.shards[s]), dtype=self.shards[s][0].dtype))
                   for s in busy}
        pending = [dist.irecv(t, src=self.server_ranks[s], tag=tag) for s, (h, flat) in replies.items()
                   for t, tag in ((h, wire.REPLY), (flat, wire.PAYLOAD))]  # posted first: the reply never waits
        sends, nbytes = [], 0
        for s in busy:
            grad = wire.flatten(p.grad if p.grad is not None else torch.zeros_like(p) for p in self.shards[s])
            head = wire.header(wire.Kind.PUSH, self.topo.rank, self.clock, self.versions[s], self.lr)
            sends += [dist.isend(head, dst=self.server_ranks[s], tag=wire.HEADER),
                      dist.isend(grad, dst=self.server_ranks[s], tag=wire.PAYLOAD)]
            nbytes += wire.HEADER_BYTES + grad.numel() * grad.element_size()
        for w in sends:
            w.wait()
        t2 = time.perf_counter()
        self.meter.add(nbytes, t2 - t1)
        for w in pending:
            w.wait()
        t3 = time.perf_counter()
        staleness, received = 0, 0
        with torch.no_grad():
            for s, (head, flat) in replies.items():
                for p, value in zip(self.shards[s], wire.unflatten(flat, self.shards[s])):
                    p.copy_(value)
                self.versions[s], staleness = int(head[0]), max(staleness, int(head[1]))
                received += head.numel() * 8 + flat.numel() * flat.element_size()
        self.model.zero_grad(set_to_none=True)
        self.clock += 1
        sent, comm_s = self.meter.take()
        return StepStats(loss_sum.item(), batch.num_samples, batch.num_tokens, compute_s=t1 - t0, comm_s=comm_s,
                         optim_s=time.perf_counter() - t3, wait_s=t3 - t2, bytes_sent=sent,
                         extra={"staleness": staleness, "bytes_received": received})

    # -- membership: who is still in the job, agreed on at server 0
    def _members(self, kind: wire.Kind) -> tuple[int, ...]:
        mask = torch.zeros(self.num_workers, dtype=torch.float64)
        dist.send(wire.header(kind, self.topo.rank), dst=self.server_ranks[0], tag=wire.HEADER)
        dist.recv(mask, src=self.server_ranks[0], tag=wire.REPLY)
        return tuple(w for w in range(self.num_workers) if mask[w] > 0)

    def _group_of(self, ranks: tuple[int, ...]):
        if ranks == tuple(range(self.num_workers)):
            return self.topo.group("dp")  # made by the topology: every worker alive
        if ranks not in self._groups:  # made here: membership changes at run time. Local
            # synchronization: only the members call new_group (the lost rank cannot).
            self._groups[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
        return self._groups[ranks]

    def live_group(self):
        """Workers: a barrier at server 0, then the group of the live workers. Servers: their own."""
        if self.is_server:
            return self._group_of((self.topo.rank,))
        if self._final_members is not None:  # after close(): the membership of the last barrier
            return self._group_of(self._final_members)
        return self._group_of(self._members(wire.Kind.BARRIER))

    def mean_over_dp(self, value: torch.Tensor) -> float:
        group = self.live_group()
        n = dist.get_world_size(group)
        return (self.meter.all_reduce(value.reshape(1).clone(), group) / n if n > 1 else value).item()

    def serve(self) -> None:
        index = self.topo.rank - self.num_workers
        self.server = Server(self.cfg, index, self.num_workers, self.shard_names[index], self.shards[index],
                             self.optimizer)
        self.server.run()

    def close(self, run_dir) -> None:
        if self.is_server:
            path = Path(run_dir) / "metrics" / f"ps_server{self.topo.rank}.json"
            path.write_text(json.dumps(self.server.report(), indent=2))
            return
        for rank in self.server_ranks[1:]:
            dist.send(wire.header(wire.Kind.DONE, self.topo.rank), dst=rank, tag=wire.HEADER)
        self._final_members = self._members(wire.Kind.DONE)  # server 0's reply: the final barrier

    # -- checkpoints: one ordinary name-keyed checkpoint, the servers' shards fetched by the chief
    def state_dict(self) -> dict:
        model = to_cpu(self.module.state_dict())  # buffers, and this worker's replica of the parameters
        if self.topo.rank != 0:
            return {"model": model, "optimizer": {"state": {}, "param_groups": []}}
        parts = [{"model": model, "optimizer": {"state": {}, "param_groups": []}}]
        for s in self._busy_servers():
            dist.send(wire.header(wire.Kind.STATE, self.topo.rank), dst=self.server_ranks[s], tag=wire.HEADER)
            parts.append(wire.recv_object(self.server_ranks[s]))
        state = merge_states(parts)  # later parts win: the servers' parameters over the replica's
        canonical = {id(p): n for n, p in self.module.named_parameters()}
        for name, p in self.module.named_parameters(remove_duplicate=False):  # tied weights: every name
            state["model"][name] = state["model"][canonical[id(p)]]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        if self.is_server and self.optimizer is not None:
            load_named_optimizer(self.optimizer, self.shard_names[self.topo.rank - self.num_workers],
                                 state["optimizer"])
