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
mesh axis spans the workers only (`layout.ServerDims`), so the global batch is split W ways and the
topology's dp group is the workers' group. Servers hold whole tensors, balanced by size
(protocol.partition), and the configured optimizer over their shard; a server's learning
rate for a gradient is the one the pushing worker's trainer computed for that worker's step
(carried in the push): with W asynchronous workers the server makes W updates per step of
data, so its own update count would run the schedule W times too fast. For the same reason ASP
and SSP want a smaller learning rate than BSP (measured: configs/mlp.toml's SGD, lr 0.05 and
momentum 0.9, diverged with 3 SSP workers and trained with lr 0.05 / 3).

A worker's step: forward and backward on its batch, push each server its part of the gradient, pull
the updated part back (the reply to the push), copy it into the model. `wait_s` is the time blocked
for the replies (the server's work, BSP's round, SSP's gate); `bytes_sent` is exactly headers +
gradient (or its codec's payload); the step record adds `staleness` (largest over servers) and
`bytes_received` (reply headers + parameters, or payloads). The staleness of an applied gradient is
the server's version (updates applied) at apply time minus the version it was computed on: 0 under
BSP; under SSP with bound s and W workers at most (W-1)(2s+1), since between a worker's read at
clock c (all others at >= c-s) and its push, another worker can push at most up to clock c+s+1;
unbounded under ASP. Each server (server.py: `serve`, run by the launcher on server ranks in place
of the trainer) writes metrics/ps_server<rank>.json (histogram, bytes, lost workers, dropped steps)
at the end.

Stragglers under SSP: `strategy.ps.drop_behind` (DropCompute, Giladi et al., 2023, which drops
the compute a worker has not finished in time; backup workers, Chen et al., "Revisiting
Distributed Synchronous SGD", 2016, which drop the last gradients of a step). Plain SSP holds a
worker that is s clocks ahead of the slowest. With drop_behind the server moves the laggards'
clocks up to that worker's clock - s instead, and answers at once: no worker waits for a slower
one. A moved worker's step in progress still counts; the steps between it and its new clock are
dropped, never computed: the reply to its next push carries the clock to go on from, and until
then its trainer steps return at once (`skipped` in the step record, loss NaN, no samples, no
injected fault delay; `skipped_total` counts them), so every rank keeps the same step numbers.
The staleness bound, no longer kept by waiting, is kept on arrival: a gradient staler than
(W-1)(2s+1) is discarded (`discarded` in the step record, `discarded_gradients` in the report),
so every applied gradient is within it, as under plain SSP.

Compression: with `strategy.compression.codec` (fp16, bf16, int8, topk, randomk, sign; PowerSGD,
a DDP comm hook, is refused before any worker starts), a push carries each shard's gradient
through the codec with error feedback, and a pull the difference between the server's parameters
and the copy this worker holds (codec.py). The worker trains and evaluates on that copy.

Training steps have no collectives among workers: the logged loss is the worker's own batch's.
Evaluation (mean over live workers), checkpoints and the end of the run go through
`agree_on_members`: a membership barrier at server 0 (asynchronous workers meet there), whose reply
lists the live workers, then a group of exactly those. A lost worker (its connection closes: see
protocol.Inbox) is dropped by every server; BSP rounds and SSP's slowest clock then count only the
live ones and training goes on. Under SSP and ASP without a codec, `paratrain run` restarts a lost
worker (apart.py, `run.max_restarts`): it talks to the servers on channels of its own (protocol.
Channel), so it connects afresh outside the job's process group, sends each server a JOIN, pulls
the current parameters and goes on from the slowest live worker's step (`begin_step`). It is alone
in the barriers' groups from then on: its evaluation is its own, and checkpoints hold rank 0's
random state for it. A lost server is restarted too, from the newest checkpoint: each worker's
next send or receive to it fails (a stopped one's once run.timeout_s or the patience has passed;
the worker then ends it if it is on this host), and the worker waits for its next incarnation,
connects and pulls its shard (RECONNECT); that step's gradient for the shard is lost, and the
shard goes back to the checkpoint. Rank 0 cannot be lost (the checkpoints' collectives gather on
it); where lost workers do not rejoin (BSP, a codec), neither can a server. Checkpoints hold the servers'
state: the chief asks each server for its shard and optimizer state at each checkpoint and writes
one ordinary, name-keyed checkpoint (any strategy can resume it, and this one any other's); on
resume every server loads its shard from it. With a codec the checkpoint also holds, under the key
"parameter_server", every live worker's push residuals and each server's copies of what its workers
hold, with the codecs' generators: a resumed run goes on exactly (under another layout, or from
another strategy's checkpoint, residuals start at zero and copies at the parameters). Gradient
clipping is refused: each server holds part of the gradient, and the global norm would need the
servers to talk to each other.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from paratrain import messages, watchdog
from paratrain.checkpoint import merge_states
from paratrain.comm import flatten, unflatten
from paratrain.data import Batch
from paratrain.metrics import StepStats
from paratrain.nonfinite import check_update
from paratrain.restarts import JobFinished, attempt, previous_end
from paratrain.strategies.base import Strategy, local_eval, to_cpu
from paratrain.strategies.layout import needs_gloo
from paratrain.strategies.parameter_server import protocol as wire
from paratrain.strategies.parameter_server.codec import WorkerLinks
from paratrain.strategies.parameter_server.protocol import Kind, Message, PushReply
from paratrain.strategies.parameter_server.server import STATE_KEY
from paratrain.topology import REJOIN_ENV


class ParameterServer(Strategy):
    """A worker: ranks 0..W-1. The servers (ranks W..W+S-1) run server.serve, never this class."""

    name = "parameter_server"
    lockstep = False  # workers push alone (asynchronous modes); the servers are not in the step
    # A signal stops this worker at once: the servers cannot gather a checkpoint for one worker
    # (the last periodic checkpoint stands; server ranks end on the signal itself).
    checkpoints_on_stop = False

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        if topo.device.type != "cpu":  # run.device = 'auto' found a GPU
            raise needs_gloo(cfg.run.device)
        self.num_workers = topo.size("dp")
        self.shard_names = wire.shard_layout(self.model, topo.world_size - self.num_workers)  # per server
        self.patience_s = wire.gate_patience(cfg.run.timeout_s)
        params = dict(self.model.named_parameters())
        self.shards = [[params[n] for n in names] for names in self.shard_names]
        self.server_ranks = [self.num_workers + s for s in range(len(self.shard_names))]
        self.optimizer = None  # workers never step: the servers own the optimizer
        self.clock, self.lr = 0, cfg.optimizer.lr
        self.versions = [0] * len(self.shard_names)  # the version of each shard this worker holds
        # SSP's drop_behind: the step the servers expect next (steps before it are skipped)
        self.resume_at, self.skipped = 0, 0
        numels = [sum(p.numel() for p in shard) for shard in self.shards]
        self.links = WorkerLinks(cfg.strategy.compression, topo.rank, numels, next(iter(params.values())).dtype)
        self._groups: dict[tuple, object] = {}
        # One channel to each server (protocol.Channel), under this start's incarnation: a worker
        # restarted into the running job (`alone`: outside the job's group) connects again.
        self.alone = os.environ.get(REJOIN_ENV) == "1"
        self.store, self.incarnation = wire.job_store(cfg.run.dir), attempt()
        wire.register(self.store, topo.rank, self.incarnation)
        deadline = time.monotonic() + self.patience_s
        self.server_incarnations = [wire.incarnation(self.store, rank, wire.first_incarnation() - 1,
                                                     closing=lambda: time.monotonic() > deadline)
                                    for rank in self.server_ranks]
        if None in self.server_incarnations:
            raise RuntimeError(f"parameter server rank {self.server_ranks[self.server_incarnations.index(None)]} "
                               f"did not start within {self.patience_s:.0f} s")
        with self._unless_finished():
            self.channels = [self._channel(s) for s in range(len(self.server_ranks))]
        self._failed: list = []  # channels to a server's earlier incarnation: kept, with receives still posted
        self.started = False

    def _channel(self, s: int) -> wire.Channel:
        return wire.Channel.dial(self.store, self.topo.rank, self.server_ranks[s],
                                 (self.incarnation, self.server_incarnations[s]), self.cfg.run.timeout_s)

    @contextmanager
    def _unless_finished(self):
        """A restarted worker whose servers finished before it reached them: JobFinished, exit 0."""
        try:
            yield
        except RuntimeError:
            if self.alone and previous_end(self.cfg.run.dir) == 0:
                raise JobFinished(f"rank {self.topo.rank}: the job finished before it could rejoin") from None
            raise

    def set_lr(self, lr: float) -> None:
        self.lr = lr  # sent with the next push; the server applies it

    @property
    def holds_unique_state(self) -> bool:
        return self.topo.rank == 0  # the chief writes what it fetched from the servers

    def _busy_servers(self) -> list[int]:
        return [s for s, names in enumerate(self.shard_names) if names]  # more servers than tensors: idle ones

    def begin_step(self, step: int) -> int:
        """The first step: this worker's clock is the trainer's step from here on (a resumed run's
        too); one restarted into the running job first pulls the current parameters and the step
        to go on from (the slowest live worker's: protocol `JOIN`)."""
        if not self.started:
            self.started, self.clock = True, step
            if self.alone:
                with self._unless_finished():
                    self.clock = max(step, self._join())
            else:  # the workers start together (each connected on its own), as SSP's clocks assume
                self.agree_on_members()
        return self.clock

    def _join(self) -> int:
        """Servers 1.. first; server 0, which keeps the barriers, last with their answer."""
        at = max((self._pull(s, Kind.JOIN, 0).next_clock for s in range(1, len(self.channels))), default=0)
        return max(at, self._pull(0, Kind.JOIN, at).next_clock)

    def _pull(self, s: int, kind: Kind, clock: int) -> PushReply:
        """JOIN or RECONNECT: server s's current shard and its version, copied into the model."""
        channel = self.channels[s]
        channel.send(Message(kind, self.topo.rank, clock, int(self.alone)).header(), wire.HEADER)
        head, flat = torch.zeros(PushReply.NUMEL, dtype=torch.float64), self.links.reply_buffer(s)
        for t, tag in ((head, wire.REPLY), (flat, wire.PAYLOAD)):
            wire.wait_patiently(channel.irecv(t, tag), self.patience_s)
        reply = PushReply.from_tensor(head)
        with torch.no_grad():
            for p, value in zip(self.shards[s], unflatten(flat, self.shards[s])):
                p.copy_(value)
        self.versions[s] = reply.version
        return reply

    def _reconnect(self, s: int, error: RuntimeError, clock: int) -> None:
        """Server s's channel failed (its process died, or stopped past our patience). Where lost
        workers rejoin (protocol.rejoins), apart.py restarts a lost server too, from the newest
        checkpoint: wait for its next incarnation (a stopped one on this host is ended first, so
        that it restarts), connect, and pull its shard (RECONNECT). Else, or if it does not come
        back within the patience, `error`."""
        rank = self.server_ranks[s]
        if not wire.rejoins(self.cfg):
            raise error
        watchdog.end_if_stopped(Path(self.cfg.run.dir), rank)
        deadline = time.monotonic() + self.patience_s
        n = wire.incarnation(self.store, rank, self.server_incarnations[s], closing=lambda: time.monotonic() > deadline)
        if n is None:
            raise error
        self._failed.append(self.channels[s])
        self.server_incarnations[s] = n
        self.channels[s] = self._channel(s)
        self._pull(s, Kind.RECONNECT, clock)
        print(f"paratrain: rank {self.topo.rank}: parameter server {s} (rank {rank}) restarted; reconnected at "
              f"step {clock + 1}, its parameters pulled", file=sys.stderr, flush=True)

    def _ask(self, s: int, exchange, clock: int):
        """`exchange(channel)` with server s, once more after reconnecting if its channel failed."""
        try:
            return exchange(self.channels[s])
        except RuntimeError as e:
            self._reconnect(s, e, clock)
            return exchange(self.channels[s])

    # -- a worker's step
    def train_step(self, batch: Batch) -> StepStats:
        if self.clock < self.resume_at:
            return self._skip()
        micro = batch.split(self.cfg.training.grad_accum_steps)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.topo.device)
        for mb in micro:
            loss = self.loss_fn(self.model(mb.inputs), mb.targets) / len(micro)
            loss.backward()
            loss_sum += loss.detach()
        t1 = time.perf_counter()
        check_update(self, loss_sum, self.model.parameters())  # alone: only 'stop' is allowed here
        busy = self._busy_servers()
        replies = {s: (torch.zeros(PushReply.NUMEL, dtype=torch.float64), self.links.reply_buffer(s))
                   for s in busy}
        failed: dict[int, RuntimeError] = {}  # server -> its channel's error (a closed one fails as the op is posted)
        pending, sends, nbytes, plain = {}, {}, 0, 0
        for s, (h, flat) in replies.items():  # posted first: the reply never waits
            try:
                pending[s] = [self.channels[s].irecv(t, tag) for t, tag in ((h, wire.REPLY), (flat, wire.PAYLOAD))]
            except RuntimeError as e:
                failed[s] = e
        for s in busy:
            grad = self.links.encode_push(s, flatten(p.grad if p.grad is not None else torch.zeros_like(p)
                                                    for p in self.shards[s]))
            head = Message(Kind.PUSH, self.topo.rank, self.clock, self.versions[s], self.lr).header()
            nbytes += wire.HEADER_BYTES + grad.numel() * grad.element_size()
            plain += wire.HEADER_BYTES + sum(p.numel() * p.element_size() for p in self.shards[s])  # as is
            if s not in failed:
                try:
                    sends[s] = [self.channels[s].isend(head, wire.HEADER), self.channels[s].isend(grad, wire.PAYLOAD)]
                except RuntimeError as e:
                    failed[s] = e
        for s in sends:
            try:
                for w in sends[s]:
                    w.wait()
            except RuntimeError as e:
                failed[s] = e
        t2 = time.perf_counter()
        self.meter.add(nbytes, t2 - t1, uncompressed=plain)
        for s in pending.keys() - failed.keys():
            try:
                for w in pending[s]:
                    wire.wait_patiently(w, self.patience_s)  # held at the SSP gate: longer than the group timeout
            except RuntimeError as e:
                failed[s] = e
        for s, error in failed.items():  # this step's gradient for that shard is lost with the server
            self._reconnect(s, error, self.clock + 1)
            del replies[s]
        t3 = time.perf_counter()
        staleness, received, discarded, self.clock = 0, 0, 0, self.clock + 1
        with torch.no_grad():
            for s, (head, buf) in replies.items():
                reply = PushReply.from_tensor(head)
                flat = self.links.apply_pull(s, buf, self.shards[s])
                for p, value in zip(self.shards[s], unflatten(flat, self.shards[s])):
                    p.copy_(value)
                self.versions[s] = reply.version
                if reply.applied:  # else discarded as too stale (drop_behind): its staleness never counted
                    staleness = max(staleness, reply.staleness)
                discarded += not reply.applied
                self.resume_at = max(self.resume_at, reply.next_clock)  # past the steps dropped for us
                received += head.numel() * 8 + buf.numel() * buf.element_size()
        self.model.zero_grad(set_to_none=True)
        sent, comm_s = self.meter.take()
        extra = {"staleness": staleness, "bytes_received": received}
        if self.cfg.strategy.ps.drop_behind:
            extra.update(discarded=discarded, skipped_total=self.skipped)
        return StepStats(loss_sum.item(), batch.num_samples, batch.num_tokens, compute_s=t1 - t0, comm_s=comm_s,
                         optim_s=time.perf_counter() - t3, wait_s=t3 - t2, bytes_sent=sent, extra=extra)

    def _skip(self) -> StepStats:
        """drop_behind: the servers counted this step as dropped; nothing to compute or send (no
        loss: NaN, as local_sgd's dropped steps; no samples)."""
        self.clock += 1
        self.skipped += 1
        return StepStats(float("nan"), 0, 0, skipped=True, extra={"skipped_total": self.skipped})

    # -- membership: who is still in the job, agreed on at server 0
    def _members(self, kind: Kind):
        """Server 0's barrier at this step boundary; the group of the live workers of the job's
        group, or None (this process's own world) for a worker that rejoined: it is alone."""
        mask = torch.zeros(self.num_workers, dtype=torch.float64)

        def barrier(channel):
            channel.send(Message(kind, self.topo.rank, self.clock).header(), wire.HEADER)
            wire.wait_patiently(channel.irecv(mask, wire.REPLY), self.patience_s)
        self._ask(0, barrier, self.clock)
        if self.alone:
            return None
        return self._group_of(tuple(w for w in range(self.num_workers) if mask[w] == wire.MEMBER))

    def _group_of(self, ranks: tuple[int, ...]):
        if ranks == tuple(range(self.num_workers)):
            return self.topo.group("dp")  # made by the topology: every worker alive
        if ranks not in self._groups:  # made here: membership changes at run time. Local
            # synchronization: only the members call new_group (the lost rank cannot).
            self._groups[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
        return self._groups[ranks]

    def agree_to_stop(self, signum: int) -> int:
        return signum  # alone: see checkpoints_on_stop

    def agree_on_members(self):
        """A barrier at server 0 (asynchronous workers meet there); its reply lists the live
        workers, and this returns their group."""
        return self._members(Kind.BARRIER)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> list[float]:
        return self.meter.means(local_eval(self, batches), self.agree_on_members())

    def close(self, run_dir):
        """Tell every server this worker is done; server 0's reply is the final barrier, whose
        members are the workers that finished."""
        for s in range(1, len(self.channels)):
            self._ask(s, lambda channel: channel.send(Message(Kind.DONE, self.topo.rank).header(), wire.HEADER),
                      self.clock)
        return self._members(Kind.DONE)

    # -- checkpoints: one ordinary name-keyed checkpoint, the servers' shards fetched by the chief
    def state_dict(self, group=None) -> dict:
        """`group`: the live workers, agreed on for this checkpoint (agree_on_members)."""
        model = to_cpu(self.module.state_dict())  # buffers, and this worker's replica of the parameters
        pushes = self._gather_push_states(group)
        if self.topo.rank != 0:
            return {"model": model, "optimizer": {"state": {}, "param_groups": []}}
        parts, pulls = [{"model": model, "optimizer": {"state": {}, "param_groups": []}}], {}
        for s in self._busy_servers():
            def fetch(channel):
                channel.send(Message(Kind.STATE, self.topo.rank).header(), wire.HEADER)
                return channel.recv_object(self.patience_s)
            parts.append(self._ask(s, fetch, self.clock))
            pulls[s] = parts[-1].pop("pull", None)
        state = merge_states(parts)  # later parts win: the servers' parameters over the replica's
        canonical = {id(p): n for n, p in self.module.named_parameters()}
        for name, p in self.module.named_parameters(remove_duplicate=False):  # tied weights: every name
            state["model"][name] = state["model"][canonical[id(p)]]
        if self.links.compressed:
            state[STATE_KEY] = {"num_workers": self.num_workers, "layout": self.shard_names,
                                "push": pushes, "pull": pulls}
        return state

    def _gather_push_states(self, group) -> dict | None:
        """With a codec: every live worker's push residuals and generators, on the chief."""
        if not self.links.compressed:
            return None
        mine = to_cpu(self.links.state())
        if group is None or dist.get_world_size(group) == 1:
            return {self.topo.rank: mine}
        parts = messages.gather((self.topo.rank, mine), dst=0, group=group)
        return dict(parts) if parts is not None else None

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        extra = state.get(STATE_KEY)
        if (not self.links.compressed or extra is None or extra["layout"] != self.shard_names
                or extra["num_workers"] != self.num_workers):
            return  # written without a codec or for another layout: residuals start at zero, copies from here
        me = self.topo.rank
        replicas = [((extra["pull"].get(s) or {}).get(me) or {}).get("sent") for s in range(len(self.shards))]
        self.links.load(extra["push"].get(me), replicas)
        with torch.no_grad():  # this worker goes on from the copy it held, as the servers know it
            for shard, flat in zip(self.shards, replicas):
                if flat is not None:
                    for p, value in zip(shard, unflatten(flat, shard)):
                        p.copy_(value)
