"""Local SGD and DiLoCo: data parallelism that communicates once every H steps, not every step.

`local_sgd`: Local SGD, or periodic model averaging (Stich, "Local SGD Converges Fast and
Communicates Little", ICLR 2019; Lin et al., "Don't Use Large Mini-Batches, Use Local SGD",
ICLR 2020). Each rank trains its own replica with the inner optimizer on its data shard for
H = `strategy.local_sgd.sync_every` steps with no communication at all, then one all-reduce
averages the replicas' parameters.

`diloco`: DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", 2023). The same inner loop; every rank keeps the parameters of the last sync, the
anchor theta. At a sync the pseudo-gradient theta - theta_i is averaged over ranks and an outer
SGD (Nesterov momentum in the paper) steps theta with it; theta becomes every replica's
parameters. Inner optimizer states stay local, as in the paper. With H = 1, outer lr 1, no outer
momentum and plain inner SGD both are exactly DDP: the average of parameters one step after a
common start, theta - lr * g_i, is theta - lr * mean(g_i).

Step records. Between syncs a rank sends nothing, not even its loss: a step's `loss` is this
rank's own batch's (`loss_ranks` = 1), since an all-reduce of it every step would make every
step a barrier. At a sync, where the ranks meet anyway, one small all-gather brings every
rank's loss (and, with a deadline, its step time), and `loss` is their mean over the global
batch (`loss_ranks` = the replicas that computed the step). Every sync also records
`replica_rms_dist` (RMS distance of this rank's parameters from the average, just before
averaging) and `replicas` (how many are averaged). Floating-point buffers (BatchNorm's running
statistics) are averaged at every sync too, as they are, with no codec. The last step always syncs, so the trained
model is the average. A global batch is split as in ddp. Evaluation averages over the replicas.

Compression (`strategy.compression.codec`, see paratrain.compression). diloco averages its
pseudo-gradient through the codec; local_sgd averages its delta from the last synchronised
parameters (the anchor) and applies the mean delta to the anchor, so the replicas are again
identical after each sync. A lossy codec's error-feedback residual carries what it dropped to
the next sync. (Compressed local SGD is DiLoCo with outer lr 1 and no outer momentum.)

Stragglers (`strategy.local_sgd.deadline = "auto"`, see deadline.py: DropCompute). Rounds are
bounded by time: a rank that would overrun the round's agreed budget drops its remaining inner
steps (`skipped` in the step record, `loss` NaN, `skipped_steps` per round at the sync), so the
ranks reach the sync together; the average stays a plain mean over ranks, to which a rank that
dropped steps contributes its smaller update.

A lost worker (`[faults] kill_at_step`) is survived, compressed or not: every collective of a
sync goes through `Replicas` (replicas.py), which catches the failure, lets the survivors agree
on who is alive through the rendezvous store and retries on a new process group of their own;
from the next step on the survivors split each global batch among themselves (`data_shard`), so
the lost rank's share is trained on by them. Ranks notice the loss at the next sync (or
evaluation, or checkpoint). The trainer's checkpoints and closing summary use that group too
(`agree_on_members`).
Agreeing takes up to 2 x `run.timeout_s` + 5 s (replicas.py). Rank 0 cannot be lost (checkpoints gather on it).

Checkpoints hold rank 0's replica (read by any strategy), plus under the key "local_sgd" the
step count (where the sync cycle stands), every rank's inner optimizer state, the anchor where
there is one (diloco; local_sgd with a codec), DiLoCo's outer momentum and, with a codec, every
rank's codec state (error-feedback residual over the flat vector, and random generator), the
rest keyed by parameter name. On resume every rank starts from rank 0's replica and its own
inner and codec state (rank 0's inner state and no residual if the world size changed): a
resume from a sync step reproduces the uninterrupted run exactly; from the middle of a cycle
the replicas' disagreement is reset to zero. A deadline's measurements start again (no budget
in the first round after a resume). Every rank's inner state makes that part of the checkpoint
n times bigger.
"""
from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from typing import ClassVar

import torch

from paratrain import watchdog
from paratrain.comm import flatten, unflatten
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.strategies.base import StepStats, Strategy, load_full_state, local_eval, local_step, to_cpu
from paratrain.strategies.local_sgd.deadline import RoundDeadline
from paratrain.strategies.replicas import Replicas

STATE_KEY = "local_sgd"  # extra top-level key of the strategy state; other strategies ignore it


class LocalSGD(Strategy):
    name = "local_sgd"
    lockstep = False  # replicas update alone: own loss between syncs, own decision on non-finite updates
    anchored: ClassVar[bool] = False  # keeps the last sync's parameters without a codec too (DiLoCo)

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())  # the inner optimizer
        o, c = cfg.strategy.local_sgd, cfg.strategy.compression
        self.sync_every, self.total_steps = o.sync_every, cfg.training.steps
        self.steps_done = 0
        self.stop_request = self.stop_agreed = 0  # a signal: agreed on at the next synchronisation
        self.replicas = Replicas(topo.group("dp"), self.meter, cfg.run.timeout_s,
                                 functools.partial(watchdog.is_lost, cfg.run.dir), topo.device)
        self.compressor = None
        if c.codec != "none":
            from paratrain.compression import make_codec
            from paratrain.compression.adapters import DeltaCompressor

            self.compressor = DeltaCompressor(make_codec(c.codec, c.ratio, c.error_feedback), topo.rank)
        self.names = [n for n, _ in self.module.named_parameters()]
        # The parameters of the last sync: compressed deltas are taken from them (DiLoCo: always).
        anchored = self.anchored or self.compressor is not None
        self.anchor = [p.detach().clone() for p in self.module.parameters()] if anchored else None
        self.deadline = RoundDeadline(o.deadline_slack) if o.deadline == "auto" else None

    def data_shard(self) -> tuple[int, int]:
        return self.replicas.shard() or super().data_shard()  # after a loss: split over the survivors

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> list[float]:
        own = local_eval(self, batches)  # this replica's loss (and metrics) on this rank's held-out shard
        return self.replicas.mean(own.reshape(-1)).tolist()

    @contextmanager
    def paused(self):
        # Evaluation and checkpoints gather over the ranks (fast ones wait there for slow ones):
        # not the round's own work.
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.deadline is not None:
                self.deadline.pause(time.perf_counter() - t0)

    def agree_to_stop(self, signum: int) -> int:
        """Replicas meet only at synchronisations: a signal is shared at the next one (in its loss
        gather, no extra collective), and every replica stops after that step."""
        self.stop_request = signum
        return self.stop_agreed

    def agree_on_members(self):
        """The survivors (replicas.py), checked by one small all-reduce: a rank lost since the last
        synchronisation is found here, not by the checkpoint's gather."""
        return self.replicas.agree()

    def train_step(self, batch: Batch) -> StepStats:
        self.steps_done += 1
        if self.deadline is not None and self.deadline.skip(time.perf_counter()):
            # Dropped to keep the round's pace: no forward, no backward, this batch unused.
            stats = StepStats(math.nan, 0, 0, skipped=True)
        else:
            stats = local_step(self, batch)  # the local step: no communication
        stats.extra["loss_ranks"] = 0 if stats.skipped else 1
        if self.steps_done % self.sync_every == 0 or self.steps_done == self.total_steps:
            self._sync(stats)
        stats.wait_s += self.replicas.recovery_s  # agreeing on survivors after a loss
        self.replicas.recovery_s = 0.0
        return stats

    def _sync(self, stats: StepStats) -> None:
        t0 = time.perf_counter()
        fastest_step_s = self._share_step_stats(stats)
        params = list(self.module.parameters())
        with torch.no_grad():
            local = self._to_average(params)
            mean = self._mean(local)
            self._apply(params, mean)
            # Buffers (BatchNorm's running statistics) are not trained by the optimizer: averaged
            # as they are, uncompressed, so that the replicas are one model again after a sync.
            buffers = [b for b in self.module.buffers() if b.is_floating_point()]
            if buffers:
                for b, m in zip(buffers, unflatten(self.replicas.mean(flatten(buffers)), buffers)):
                    b.copy_(m)
        # For every variant local - mean is this replica's offset from the average replica.
        stats.extra.update(replica_rms_dist=(local - mean).pow(2).mean().sqrt().item(),
                           replicas=len(self.replicas.ranks))
        if self.deadline is not None:
            stats.extra.update(skipped_steps=self.deadline.skipped, round_budget_s=self.deadline.budget_s)
            self.deadline.next_round(fastest_step_s, min(self.sync_every, self.total_steps - self.steps_done))
        nbytes, comm_s = self.meter.take()
        # comm_s includes the time this rank waits at the collectives for slower replicas:
        # gloo's blocking collectives give no way to tell the barrier from the transfer.
        stats.bytes_sent += nbytes
        stats.comm_s += comm_s
        stats.optim_s += time.perf_counter() - t0 - comm_s

    def _share_step_stats(self, stats: StepStats) -> float:
        """All-gather every replica's loss (NaN: dropped the step), with a deadline its median step
        time, and its pending signal; set `stats.loss` to the mean loss; return the fastest
        replica's step time."""
        row = [stats.loss] + ([self.deadline.own_median_s()] if self.deadline is not None else []) + [self.stop_request]
        rows = self.replicas.gather(torch.tensor(row, dtype=torch.float32, device=self.topo.device))
        self.stop_agreed = int(rows[:, -1].max().item())
        losses = rows[:, 0][~rows[:, 0].isnan()]
        stats.loss = losses.mean().item() if losses.numel() else math.nan
        stats.extra["loss_ranks"] = losses.numel()
        return rows[:, 1].min().item() if self.deadline is not None else math.inf

    # -- the synchronisation: what is averaged and what is done with the average
    def _to_average(self, params) -> torch.Tensor:
        if self.anchor is None:
            return flatten(params)
        return flatten(params) - flatten(self.anchor)  # compressed: this replica's delta since the last sync

    def _mean(self, local: torch.Tensor) -> torch.Tensor:
        if self.compressor is None:
            return self.replicas.mean(local)
        state = self.compressor.state
        residual, rng = state.residual, state.generator.get_state()

        def exchange(group) -> torch.Tensor:
            # A retry after a lost worker must compress the same input as the failed try: the
            # codec state (residual, random draws) goes back to what it was before it.
            state.residual = residual
            state.generator.set_state(rng)
            return self.compressor.mean(local, group, self.meter)

        return self.replicas.run(exchange, local.clone)

    def _apply(self, params, mean: torch.Tensor) -> None:
        if self.anchor is None:
            for p, m in zip(params, unflatten(mean, params)):
                p.copy_(m)
            return
        for a, p, d in zip(self.anchor, params, unflatten(mean, self.anchor)):
            a.add_(d)  # the same anchor and mean delta on every rank: identical replicas
            p.copy_(a)

    # -- checkpoints
    def state_dict(self, group=None) -> dict:
        state = super().state_dict()
        own = {"optimizer": state["optimizer"], "codec": self._codec_state()}
        parts = self.replicas.gather_to_first(own)  # collective: every rank's inner and codec state
        if parts is not None:
            ranks = range(self.topo.world_size)
            state[STATE_KEY] = {"step": self.steps_done, **self._extra_state(),
                                "inner_optimizers": [parts[r]["optimizer"] if r in parts else None for r in ranks]}
            if self.compressor is not None:
                state[STATE_KEY]["codec_states"] = [parts[r]["codec"] if r in parts else None for r in ranks]
        return state

    def _codec_state(self) -> dict | None:
        return None if self.compressor is None else to_cpu(self.compressor.state.to_dict())

    def _extra_state(self) -> dict:
        return to_cpu({"anchor": dict(zip(self.names, self.anchor))}) if self.anchor is not None else {}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)  # rank 0's replica and inner optimizer state
        extra = state.get(STATE_KEY)
        if extra is None:  # written by another strategy: the next sync comes H steps from here
            self._load_extra({})
            return
        self.steps_done = extra["step"]
        # This rank's place in the world that wrote it (replica groups: each group's own world)
        inner, rank = extra["inner_optimizers"], self.topo.group_rank
        same_world = len(inner) == self.topo.world_size
        if same_world and inner[rank] is not None:
            load_full_state(self.module, self.optimizer, {"model": state["model"], "optimizer": inner[rank]})
        codec = extra.get("codec_states")
        if self.compressor is not None and same_world and codec is not None and codec[rank] is not None:
            self.compressor.state.load(codec[rank], self.topo.device)
        self._load_extra(extra)

    def _load_extra(self, extra: dict) -> None:
        if self.anchor is None:
            return
        # Another strategy's checkpoint has no anchor: its replica is the last sync point.
        anchor = extra.get("anchor") or dict(zip(self.names, self.module.parameters()))
        with torch.no_grad():
            for n, a in zip(self.names, self.anchor):
                a.copy_(anchor[n])


class DiLoCo(LocalSGD):
    name = "diloco"
    anchored = True  # theta, the outer optimizer's parameters

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        o = cfg.strategy.local_sgd
        self.outer = torch.optim.SGD(self.anchor, lr=o.outer_lr, momentum=o.outer_momentum, nesterov=o.outer_nesterov)

    def _to_average(self, params) -> torch.Tensor:
        return flatten(self.anchor) - flatten(params)  # the pseudo-gradient

    def _apply(self, params, mean: torch.Tensor) -> None:
        for a, g in zip(self.anchor, unflatten(mean, self.anchor)):
            a.grad = g
        self.outer.step()
        for p, a in zip(params, self.anchor):
            p.copy_(a)

    def _extra_state(self) -> dict:
        momentum = {n: self.outer.state[a]["momentum_buffer"] for n, a in zip(self.names, self.anchor)
                    if self.outer.state.get(a, {}).get("momentum_buffer") is not None}
        return {**super()._extra_state(), "outer_momentum": to_cpu(momentum)}

    def _load_extra(self, extra: dict) -> None:
        super()._load_extra(extra)  # the anchor
        self.outer.state.clear()
        for n, a in zip(self.names, self.anchor):
            if n in extra.get("outer_momentum", {}):
                self.outer.state[a]["momentum_buffer"] = extra["outer_momentum"][n].to(a.device).clone()
