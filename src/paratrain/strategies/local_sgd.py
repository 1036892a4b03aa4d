"""Local SGD and DiLoCo: data parallelism that communicates once every H steps, not every step.

`local_sgd`: Local SGD, or periodic model averaging (Stich, "Local SGD Converges Fast and
Communicates Little", ICLR 2019; Lin et al., "Don't Use Large Mini-Batches, Use Local SGD",
ICLR 2020). Each rank trains its own replica with the inner optimizer on its data shard for
H = `strategy.local_sgd.sync_every` steps with no gradient communication, then one all-reduce
averages the replicas' parameters.

`diloco`: DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", 2023). The same inner loop; every rank keeps the parameters of the last sync, the
anchor theta. At a sync the pseudo-gradient theta - theta_i is averaged over ranks and an outer
SGD (Nesterov momentum in the paper) steps theta with it; theta becomes every replica's
parameters. Inner optimizer states stay local, as in the paper. With H = 1, outer lr 1, no outer
momentum and plain inner SGD both are exactly DDP: the average of parameters one step after a
common start, theta - lr * g_i, is theta - lr * mean(g_i).

Every sync records `replica_rms_dist` (RMS distance of this rank's parameters from the average,
just before averaging) and `replicas` (how many are averaged) in the step record. The last step
always syncs, so the trained model is the average. A global batch is split as in ddp.

A lost worker (`[faults] kill_at_step`) is survived: the failed collective is caught, the
survivors agree on who is alive through the rendezvous store, continue on a new process group
of their own, and average over themselves; the lost rank's data shard is no longer trained on.
The trainer's checkpoints and closing summary use that group too (`live_group`). Agreeing takes
`run.timeout_s` (see `Replicas`). Rank 0 cannot be lost: its process hosts the store.

Checkpoints hold rank 0's replica (read by any strategy), plus under the key "local_sgd" the
step count (where the sync cycle stands), every rank's inner optimizer state and, for DiLoCo, the anchor and
the outer momentum, all keyed by parameter name. On resume every rank starts from rank 0's
replica and its own inner state (rank 0's if the world size changed): a resume from a sync step
reproduces the uninterrupted run exactly; from the middle of a cycle the replicas' disagreement
is reset to zero.

With `strategy.compression.codec` set, diloco averages its pseudo-gradient through that codec
(paratrain.compression; error-feedback residual kept across syncs, not checkpointed), and a
lost worker then ends the run instead of being survived. Every rank's inner state makes the checkpoint n times bigger in that part.
"""
from __future__ import annotations

import sys
import time
import uuid

import torch
import torch.distributed as dist

from paratrain.config import Config, ConfigError
from paratrain.data import Batch
from paratrain.strategies.base import StepStats, Strategy, load_full_state, to_cpu
from paratrain.topology import ParallelDims

STATE_KEY = "local_sgd"  # extra top-level key of the strategy state; other strategies ignore it


class Replicas:
    """The live replicas and a process group over them, shrunk when a worker is lost.

    A lost peer fails gloo's collective at once for the ranks that exchange data with it
    ("Connection reset by peer" / "Connection closed by peer"); the others would wait for the
    process-group timeout. Aborting the failed group closes our connections, which fails those
    at once too. Then each survivor sets a key in the rendezvous store and waits until all
    current members have, or `grace_s` has passed (the process-group timeout: the bound within
    which a live rank reaches a collective). The first to finish writes the member list with
    compare_set, so all survivors adopt the same one. `new_group` with local synchronization is
    documented to need only its members; a plain one must be entered by every process of the
    world (torch 2.13 with gloo did not wait for a dead one, measured, but that is not promised).
    The world group stays broken; the trainer's own collectives use `live_group()` instead.
    """

    def __init__(self, group, meter, grace_s: float):
        self.group, self.meter, self.grace_s = group, meter, grace_s
        self.ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.generation, self.recovery_s = 0, 0.0
        if len(self.ranks) > 1:  # this training's own keys: trainings may share one store
            run_id = [uuid.uuid4().hex]
            dist.broadcast_object_list(run_id, src=self.ranks[0], group=group)
            self.prefix = f"paratrain/local_sgd/{run_id[0]}"

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average over the live replicas; retried over the survivors if one is lost."""
        while len(self.ranks) > 1:
            try:  # a clone: a failed all-reduce leaves its buffer half reduced
                return self.meter.all_reduce(tensor.clone(), self.group) / len(self.ranks)
            except RuntimeError as error:  # gloo: a peer's connection closed, or the timeout
                self._shrink(error)
        return tensor.clone()

    def _shrink(self, error: RuntimeError) -> None:
        t0, me = time.perf_counter(), dist.get_rank()
        self.group.abort()  # release the peers still blocked in this collective on us
        self.generation += 1
        key = f"{self.prefix}/{self.generation}"
        try:  # the rendezvous TCPStore, outside every process group (torch has no public getter)
            store = dist.distributed_c10d._get_default_store()
            store.set(f"{key}/alive/{me}", "1")

            def alive() -> list[int]:
                return [r for r in self.ranks if store.check([f"{key}/alive/{r}"])]

            deadline = time.monotonic() + self.grace_s
            while len(alive()) < len(self.ranks) and time.monotonic() < deadline:
                time.sleep(0.05)
            agreed = store.compare_set(f"{key}/ranks", "", ",".join(map(str, alive()))).decode()
        except RuntimeError:  # DistNetworkError
            raise RuntimeError("lost the rendezvous store (it lives in rank 0's process): "
                               "cannot agree on survivors") from error
        ranks = [int(r) for r in agreed.split(",")]
        if me not in ranks:
            raise RuntimeError(f"rank {me} was left out: the survivors agreed on ranks {ranks} "
                               f"before it arrived ({self.grace_s:.0f} s grace)") from error
        if ranks == self.ranks:
            raise error  # everyone is alive: the failure is not a lost worker
        print(f"paratrain: lost rank(s) {sorted(set(self.ranks) - set(ranks))}; continuing on ranks {ranks}",
              file=sys.stderr, flush=True)
        self.group = dist.new_group(ranks, use_local_synchronization=True)
        self.ranks = ranks
        self.recovery_s += time.perf_counter() - t0

    def gather_to_first(self, obj) -> dict | None:
        """{rank: obj} of every live rank on the first live rank (rank 0), None elsewhere."""
        if len(self.ranks) == 1:
            return {self.ranks[0]: obj}
        parts = [None] * len(self.ranks) if dist.get_rank() == self.ranks[0] else None
        dist.gather_object(obj, parts, dst=self.ranks[0], group=self.group)
        return dict(zip(self.ranks, parts)) if parts is not None else None


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, like) -> list[torch.Tensor]:
    return [c.view_as(t) for c, t in zip(torch.split(flat, [t.numel() for t in like]), like)]


class LocalSGD(Strategy):
    name = "local_sgd"

    def __init__(self, cfg: Config, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        self.sync_every, self.total_steps = cfg.strategy.local_sgd.sync_every, cfg.training.steps
        self.steps_done = 0
        self.replicas = Replicas(topo.group("dp"), self.meter, cfg.run.timeout_s)

    def mean_over_dp(self, value: torch.Tensor) -> float:
        return self.replicas.mean(value.reshape(1).float()).item()

    def live_group(self):
        return self.replicas.group if self.replicas.generation else None  # None: the whole world

    def train_step(self, batch: Batch) -> StepStats:
        stats = super().train_step(batch)  # local step: no gradient communication (no DDP wrapper)
        self.steps_done += 1
        if self.steps_done % self.sync_every == 0 or self.steps_done == self.total_steps:
            t0 = time.perf_counter()
            params = list(self.module.parameters())
            with torch.no_grad():
                local = self._to_average(params)
                mean = self._mean(local)
                self._apply(params, mean)
            # For both algorithms local - mean is this replica's offset from the average replica.
            stats.extra = {"replica_rms_dist": (local - mean).pow(2).mean().sqrt().item(),
                           "replicas": len(self.replicas.ranks)}
            nbytes, comm_s = self.meter.take()
            # comm_s includes the time this rank waits at the all-reduce for slower replicas:
            # gloo's blocking all-reduce gives no way to tell the barrier from the transfer.
            stats.bytes_sent += nbytes
            stats.comm_s += comm_s
            stats.optim_s += time.perf_counter() - t0 - comm_s
        stats.wait_s += self.replicas.recovery_s  # agreeing on survivors after a loss
        self.replicas.recovery_s = 0.0
        return stats

    # -- the synchronisation: what is averaged and what is done with the average
    def _mean(self, local: torch.Tensor) -> torch.Tensor:
        return self.replicas.mean(local)

    def _to_average(self, params) -> torch.Tensor:
        return _flat(params)

    def _apply(self, params, mean: torch.Tensor) -> None:
        for p, m in zip(params, _unflat(mean, params)):
            p.copy_(m)

    # -- checkpoints
    def state_dict(self) -> dict:
        state = super().state_dict()
        inner = self.replicas.gather_to_first(state["optimizer"])  # collective: every rank's state
        if inner is not None:
            state[STATE_KEY] = {"step": self.steps_done, **self._extra_state(),
                                "inner_optimizers": [inner.get(r) for r in range(self.topo.world_size)]}
        return state

    def _extra_state(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)  # rank 0's replica and inner optimizer state
        extra = state.get(STATE_KEY)
        if extra is None:  # written by another strategy: the next sync comes H steps from here
            self._load_extra({})
            return
        self.steps_done = extra["step"]
        inner = extra["inner_optimizers"]
        if len(inner) == self.topo.world_size and inner[self.topo.rank] is not None:
            load_full_state(self.module, self.optimizer, {"model": state["model"], "optimizer": inner[self.topo.rank]})
        self._load_extra(extra)

    def _load_extra(self, extra: dict) -> None:
        pass


class DiLoCo(LocalSGD):
    name = "diloco"

    @classmethod
    def parallel_dims(cls, cfg: Config, world_size: int) -> ParallelDims:
        o = cfg.strategy.local_sgd
        if o.outer_nesterov and o.outer_momentum == 0:
            raise ConfigError("strategy.local_sgd.outer_nesterov = true: needs strategy.local_sgd.outer_momentum > 0")
        return super().parallel_dims(cfg, world_size)

    def __init__(self, cfg: Config, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        o = cfg.strategy.local_sgd
        self.names = [n for n, _ in self.module.named_parameters()]
        self.anchor = [p.detach().clone() for p in self.module.parameters()]
        self.outer = torch.optim.SGD(self.anchor, lr=o.outer_lr, momentum=o.outer_momentum, nesterov=o.outer_nesterov)
        self.compressor = None
        if cfg.strategy.compression.codec != "none":
            from paratrain.compression import make_codec
            from paratrain.compression.adapters import DeltaCompressor

            c = cfg.strategy.compression
            self.compressor = DeltaCompressor(make_codec(c.codec, c.ratio, c.error_feedback), topo.rank)

    def _mean(self, local: torch.Tensor) -> torch.Tensor:
        # Compressed: no recovery from a lost worker (a failed collective ends the run).
        if self.compressor is None:
            return super()._mean(local)
        return self.compressor.mean(local, self.replicas.group, self.meter)

    def _to_average(self, params) -> torch.Tensor:
        return _flat(self.anchor) - _flat(params)  # the pseudo-gradient

    def _apply(self, params, mean: torch.Tensor) -> None:
        for a, g in zip(self.anchor, _unflat(mean, self.anchor)):
            a.grad = g
        self.outer.step()
        for p, a in zip(params, self.anchor):
            p.copy_(a)

    def _extra_state(self) -> dict:
        momentum = {n: self.outer.state[a]["momentum_buffer"] for n, a in zip(self.names, self.anchor)
                    if self.outer.state.get(a, {}).get("momentum_buffer") is not None}
        return to_cpu({"anchor": dict(zip(self.names, self.anchor)), "outer_momentum": momentum})

    def _load_extra(self, extra: dict) -> None:
        # Another strategy's checkpoint has no anchor: its replica is the last sync point.
        anchor = extra.get("anchor") or dict(zip(self.names, self.module.parameters()))
        with torch.no_grad():
            for n, a in zip(self.names, self.anchor):
                a.copy_(anchor[n])
        self.outer.state.clear()
        for n, a in zip(self.names, self.anchor):
            if n in extra.get("outer_momentum", {}):
                self.outer.state[a]["momentum_buffer"] = extra["outer_momentum"][n].to(a.device).clone()
