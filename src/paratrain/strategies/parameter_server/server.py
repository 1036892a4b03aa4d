"""One parameter server's rank: BSP, ASP and SSP over protocol.py's messages.

The consistency models of Li et al. (OSDI 2014) and SSP of Ho et al. (NeurIPS 2013); the strategy
around it, and what the numbers mean, are described in worker.py, and SSP's drop_behind there too
(DropCompute, Giladi et al. 2023). A server rank never runs the trainer: the launcher calls `serve`
there instead (its layout, `layout.ServerDims`, names it a server). Messages are handled one at a
time, in arrival order, by this thread alone; after each, whatever it made ready (a full BSP round,
an SSP reply whose gate opened, a barrier) is answered. Gradients come in and parameters go out
through `ServerLinks` (codec.py): as they are, or through a codec.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from paratrain import watchdog
from paratrain.comm import flatten, unflatten
from paratrain.config import Config
from paratrain.optim import build_optimizer
from paratrain.restarts import attempt, record_end
from paratrain.strategies.base import named_optimizer_state
from paratrain.strategies.layout import needs_gloo
from paratrain.strategies.parameter_server import protocol as wire
from paratrain.strategies.parameter_server.codec import ServerLinks
from paratrain.strategies.parameter_server.protocol import Kind, Message, rejoins
from paratrain.topology import Topology

STATE_KEY = "parameter_server"  # a checkpoint's codec state (residuals, copies); other strategies ignore it


def serve(cfg: Config, topo: Topology, run_dir: Path, ckpt: dict | None, model: nn.Module) -> dict:
    """A server rank, start to end: its shard of `model` (the workers' initial weights), the
    optimizer over it, its part of a checkpoint; serve until every worker is done or lost, then
    write metrics/ps_server<rank>.json. Returns that report."""
    if topo.device.type != "cpu":  # run.device = 'auto' found a GPU
        raise needs_gloo(cfg.run.device)
    num_workers = topo.size("dp")
    index = topo.rank - num_workers
    layout = wire.shard_layout(model, topo.world_size - num_workers)
    names = layout[index]
    params = dict(model.named_parameters())
    shard = [params[n] for n in names]
    optimizer = build_optimizer(cfg.optimizer, shard) if shard else None
    links = ServerLinks(cfg.strategy.compression, index, sum(p.numel() for p in shard),
                        next(iter(params.values())).dtype, num_workers)
    if ckpt is not None:
        state = ckpt["strategy"]
        model.load_state_dict(state["model"])  # in place: `shard` holds the loaded values
        if optimizer is not None:
            load_named_optimizer(optimizer, names, state["optimizer"])
        extra = state.get(STATE_KEY)
        if links.compressed and extra is not None and extra["num_workers"] == num_workers \
                and extra["layout"] == layout:  # else (no codec, another layout): copies start at the parameters
            links.load(extra["pull"].get(index) or {})
    server = Server(cfg, index, num_workers, names, shard, optimizer, links)
    heartbeat = watchdog.Heartbeat(run_dir, topo.rank).start(topo.world_size)
    heartbeat.at(0, "serving")
    if attempt() > 0:  # restarted by apart.py (protocol.rejoins): from the checkpoint train() found
        where = "its initial parameters" if ckpt is None else f"the checkpoint of step {ckpt['step']}"
        print(f"paratrain: parameter server {index} (rank {topo.rank}): restart {attempt()}: serving from {where}; "
              "its workers reconnect", file=sys.stderr, flush=True)
    store = wire.job_store(run_dir)
    wire.register(store, topo.rank, attempt())

    alive = _alive_by_heartbeat(run_dir, cfg.run.timeout_s)

    def connect(worker: int, previous: int | None):
        """The channel to `worker`'s first incarnation, or (`previous` given: it was lost) its next:
        (incarnation, Channel), or (incarnation, None) if it is lost before or while connecting (a
        first one that never registers: -1); None once the server is closing. A live worker that
        has not come to this channel yet (a restarted server's: it reconnects at its next message
        here, maybe after a wait elsewhere) is met again."""
        first = previous is None
        n = wire.incarnation(store, worker, wire.first_incarnation() - 1 if first else previous,
                             closing=lambda: server.closing or (first and not alive(worker)))
        if n is None:
            return None if server.closing else (-1, None)
        channel = wire.Channel.answer(store, worker, topo.rank, (n, attempt()), cfg.run.timeout_s,
                                      closing=lambda: server.closing or not alive(worker))
        return None if server.closing else (n, channel)
    try:
        server.run(connect, alive, functools.partial(watchdog.end_if_stopped, run_dir), rejoins=rejoins(cfg))
    finally:
        heartbeat.close("finished")
    if index == 0:  # a worker restarted from here on (apart.py) exits at once: nothing is left to join
        record_end(run_dir, 0, "the parameter servers finished")
    report = server.report()
    path = Path(run_dir) / "metrics" / f"ps_server{topo.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report


def _alive_by_heartbeat(run_dir: Path, timeout_s: float):
    """alive(worker): its process is there and its heartbeat (watchdog.py) is not silent for longer
    than `run.timeout_s`. A heartbeat older than this server's start is an earlier start's (a resumed
    run's directory holds them): until the worker's first one, silence counts from our start."""
    start = time.time()

    def alive(worker: int, since: float | None = None) -> bool:
        """`since`: when this incarnation's channel opened; a heartbeat before it is the previous one's."""
        now, started = time.time(), max(start, since or 0.0)
        peer = watchdog.read_peer(watchdog.heartbeat_path(run_dir, worker), now)
        fresh = peer is not None and now - peer.silent_s >= started
        if fresh and (peer.state == "gone" or peer.doing in ("failed", "stopped")):
            return False
        last = now - peer.silent_s if fresh else started
        return now - last <= timeout_s
    return alive


def staleness_bound(mode: str, num_workers: int, slack: int) -> int | None:
    """Largest staleness an applied gradient can have: 0 under BSP, (W-1)(2s+1) under SSP (see
    worker.py; drop_behind enforces it by discarding), none under ASP."""
    return {"bsp": 0, "ssp": (num_workers - 1) * (2 * slack + 1), "asp": None}[mode]


class Server:
    def __init__(self, cfg: Config, index: int, num_workers: int, names: list[str], params: list, optimizer,
                 links: ServerLinks):
        ps = cfg.strategy.ps
        self.mode, self.slack, self.drop_behind = ps.mode, ps.staleness, ps.drop_behind
        self.bound = staleness_bound(ps.mode, num_workers, ps.staleness)
        self.index, self.num_workers = index, num_workers
        self.names, self.params, self.optimizer, self.links = names, params, optimizer, links
        self.live, self.done, self.lost = set(range(num_workers)), set(), []
        # SSP's clocks: steps of each worker accounted for, pushed or (drop_behind) dropped
        self.clock = [0] * num_workers
        self.pushes = [0] * num_workers
        self.first: dict[int, int] = {}  # each worker's first pushed step
        self.missed = [0] * num_workers  # steps skipped by a worker that rejoined (its data not trained on)
        self.discarded = 0  # drop_behind: gradients that arrived staler than the bound
        self.version = 0  # updates applied to this shard
        self.round: dict[int, Message] = {}  # BSP: the open round's gradients, by worker
        self.held: dict[int, tuple[int, bool]] = {}  # SSP: worker -> (staleness, applied), reply held back
        self.held_replies = 0  # SSP: replies not sent at once because the gate was closed (a worker waited)
        self.waiting: set[int] = set()  # the workers whose reply is held now
        self.at_barrier: dict[int, int] = {}  # worker -> the step boundary it waits at
        self.joined_at: dict[int, int] = {}  # a worker that rejoined -> the step it rejoined at
        self.rejoined: list[int] = []
        self.reconnected: list[int] = []  # workers that reconnected to this (restarted) server
        self.final_sent = False
        self.staleness: Counter[int] = Counter()
        self.push_bytes = self.pull_bytes = self.checkpoint_bytes = 0  # gradients in, parameters out, state out

    def run(self, connect, alive=None, end=lambda worker: False, rejoins: bool = False) -> None:
        """Serve until every worker is done or lost (dead, or hung: not `alive(worker)`, then `end`ed).
        `connect`: protocol.Inbox's; `rejoins`: a lost worker may come back (JOIN)."""
        self.links.start(self.params)
        inbox = self.inbox = wire.Inbox(list(range(self.num_workers)), self.links.push.empty, connect, alive, end,
                                        rejoins)
        handlers = {Kind.PUSH: self._push, Kind.BARRIER: self._barrier, Kind.STATE: self._state,
                    Kind.DONE: self._done, Kind.DEAD: self._lose, Kind.JOIN: self._join,
                    Kind.RECONNECT: self._reconnect}
        try:
            while self.live - self.done:
                msg = inbox.get()
                handlers[msg.kind](msg)
                if self.mode == "bsp":
                    self._close_round()
                if self.mode == "ssp":
                    self._open_gate()
                if self.index == 0:
                    self._release_barrier()
        finally:
            self.closing = True
            inbox.close()

    closing = False

    # -- gradients
    def _push(self, msg: Message) -> None:
        self.push_bytes += wire.HEADER_BYTES + msg.payload.numel() * msg.payload.element_size()
        self.pushes[msg.worker] += 1
        self.first.setdefault(msg.worker, msg.clock)  # a resumed run's workers start at its step
        # max: under drop_behind the clock may be past this step already (dropped while it was
        # computed), or a worker may come with a later step than this server knew (another server
        # dropped steps for it); otherwise it is clock + 1.
        self.clock[msg.worker] = max(self.clock[msg.worker], msg.clock + 1)
        msg.payload = self.links.decode_push(msg.payload)
        if self.mode == "bsp":
            self.round[msg.worker] = msg
            return
        stale = self.version - msg.version
        applied = not (self.drop_behind and stale > self.bound)
        if applied:
            self._apply(msg.payload, msg.lr)
            self.staleness[stale] += 1
        else:  # too late to be of use within the bound: dropped, as DropCompute drops late work
            self.discarded += 1
        if self.mode == "asp":
            self._reply(msg.worker, stale, applied, flatten(self.params))
        else:
            self.held[msg.worker] = (stale, applied)

    def _close_round(self) -> None:
        """BSP: once every live worker has pushed, average (worker order: deterministic) and step once."""
        expected = self.live - self.done
        if not expected or not expected <= self.round.keys():
            return
        msgs = [self.round.pop(w) for w in sorted(self.round)]
        assert len({m.clock for m in msgs}) == 1, "BSP: gradients of different steps in one round"
        total = msgs[0].payload.clone()
        for m in msgs[1:]:
            total += m.payload
        version = self.version
        self._apply(total / len(msgs), msgs[0].lr)
        flat = flatten(self.params)
        for m in msgs:
            self.staleness[version - m.version] += 1
            self._reply(m.worker, version - m.version, True, flat)

    def _open_gate(self) -> None:
        """SSP: answer a held pull once its worker is at most `staleness` clocks ahead of the slowest.

        drop_behind: a worker never waits; the workers it would wait for are moved up to its
        clock - staleness instead. A moved worker's step in progress still counts (its gradient
        is applied if within the bound); the steps after it, up to the new clock, are dropped:
        the reply to its next push tells it to skip them."""
        if self.drop_behind:
            for w in self.held:
                for v in self.live - self.done:
                    self.clock[v] = max(self.clock[v], self.clock[w] - self.slack)
        active = [self.clock[w] for w in self.live - self.done]
        slowest = min(active) if active else 0
        ready = [w for w in sorted(self.held) if self.clock[w] - slowest <= self.slack]
        flat = flatten(self.params) if ready else None
        for w in ready:
            self._reply(w, *self.held.pop(w), flat)
        self.held_replies += len(self.held.keys() - self.waiting)  # counted once, when first held back
        self.waiting = set(self.held)

    def _apply(self, grad: torch.Tensor, lr: float) -> None:
        for p, g in zip(self.params, unflatten(grad, self.params)):
            p.grad = g
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1

    def _reply(self, worker: int, stale: int, applied: bool, flat: torch.Tensor) -> None:
        head = wire.PushReply(self.version, stale, self.clock[worker], applied).to_tensor()
        payload = self.links.encode_pull(worker, flat)
        try:
            self.inbox.channels[worker].send(head, wire.REPLY)
            self.inbox.channels[worker].send(payload, wire.PAYLOAD)
        except RuntimeError:  # gone: its receiving thread reports the death, and _lose acts on it
            return
        self.pull_bytes += head.numel() * 8 + payload.numel() * payload.element_size()

    # -- membership (server 0 coordinates), lost workers, checkpoints
    def _barrier(self, msg: Message) -> None:
        self.at_barrier[msg.worker] = msg.clock  # the step boundary it is at

    def _done(self, msg: Message) -> None:
        self.done.add(msg.worker)

    def _release_barrier(self) -> None:
        """Answer a barrier (or, once all are done, the final one) with the live workers. A worker
        that rejoined at step j takes part in the barriers after it only (boundaries > j)."""
        if self.at_barrier:
            boundary = max(self.at_barrier.values())
            expected = {w for w in self.live - self.done if self.joined_at.get(w, -1) < boundary}
            if expected <= self.at_barrier.keys():
                self._send_members(sorted(self.at_barrier))
                self.at_barrier.clear()
        if self.live and self.live <= self.done and not self.final_sent:
            self._send_members(sorted(self.live))
            self.final_sent = True

    def _send_members(self, workers: list[int]) -> None:
        mask = torch.zeros(self.num_workers, dtype=torch.float64)
        for w in self.live:
            mask[w] = wire.REJOINED if w in self.joined_at else wire.MEMBER
        for w in workers:
            try:
                self.inbox.channels[w].send(mask, wire.REPLY)
            except RuntimeError:  # lost in between: its thread reports it
                pass

    def _lose(self, msg: Message) -> None:
        worker = msg.worker
        self.live.discard(worker)
        self.lost.append(worker)
        if self.index == 0:
            print(f"paratrain: parameter server: lost worker {worker}; going on with workers {sorted(self.live)}",
                  file=sys.stderr, flush=True)
        for pending in (self.round, self.held):
            pending.pop(worker, None)  # its data shard is no longer trained on
        self.at_barrier.pop(worker, None)

    def _join(self, msg: Message) -> None:
        """A lost worker restarted (apart.py): a member again from the slowest live worker's step
        on (it would hold SSP's gate shut for the steps it missed otherwise; those of its data
        shard are not trained on), with the current parameters."""
        if msg.channel is not None:
            self.inbox.channels[msg.worker] = msg.channel
        # Server 0 is asked last, with the others' answer in `clock`: the step it expects the worker
        # at (`joined_at`) is the one the worker starts from, the largest.
        worker, others = msg.worker, [self.clock[w] for w in self.live - self.done if w != msg.worker]
        at = max(self.clock[worker], min(others, default=self.clock[worker]), msg.clock)
        self.missed[worker] += at - self.clock[worker]
        self.clock[worker] = at
        self.live.add(worker)
        self.joined_at[worker] = self.clock[worker]
        self.rejoined.append(worker)
        if self.index == 0:
            print(f"paratrain: parameter server: worker {worker} rejoined at step {self.clock[worker] + 1}; "
                  f"workers {sorted(self.live)}", file=sys.stderr, flush=True)
        self._send_current(worker)

    def _reconnect(self, msg: Message) -> None:
        """A worker whose channel to this server's previous incarnation failed: this server was
        restarted (apart.py) from the newest checkpoint. Its clock goes on from the worker's; one
        that had rejoined before (alone: `version` 1) stays alone in the barriers' groups."""
        if msg.channel is not None:
            self.inbox.channels[msg.worker] = msg.channel
        if msg.version == 1:
            self.joined_at.setdefault(msg.worker, -1)  # expected at every boundary from here on
        self.clock[msg.worker] = max(self.clock[msg.worker], msg.clock)
        self.first.setdefault(msg.worker, msg.clock)
        self.reconnected.append(msg.worker)
        self._send_current(msg.worker)

    def _send_current(self, worker: int) -> None:
        """The shard's version and parameters as they are, in full (no codec where workers rejoin)."""
        head = wire.PushReply(self.version, 0, self.clock[worker], True).to_tensor()
        flat = flatten(self.params)
        try:
            self.inbox.channels[worker].send(head, wire.REPLY)
            self.inbox.channels[worker].send(flat, wire.PAYLOAD)
        except RuntimeError:  # lost again: its thread reports it
            return
        self.pull_bytes += head.numel() * 8 + flat.numel() * flat.element_size()

    def _state(self, msg: Message) -> None:
        state = {"model": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)},
                 "optimizer": named_optimizer_state(self.optimizer, self.names)}
        if self.links.compressed:  # what each worker holds, and the pull's generators (codec.py)
            state["pull"] = self.links.state()
        self.checkpoint_bytes += self.inbox.channels[msg.worker].send_object(state)

    def report(self) -> dict:
        return {"server": self.index, "mode": self.mode, "parameters": sum(p.numel() for p in self.params),
                "updates": self.version, "gradients": sum(self.staleness.values()),
                "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
                "max_staleness": max(self.staleness, default=0), "staleness_bound": self.bound,
                "drop_behind": self.drop_behind, "discarded_gradients": self.discarded,
                "held_replies": self.held_replies,
                # per worker: steps the clock counted but no push brought (dropped for it)
                "dropped_steps": [c - self.first.get(w, c) - n - m
                                  for w, (c, n, m) in enumerate(zip(self.clock, self.pushes, self.missed))],
                "missed_steps": self.missed,
                "lost_workers": self.lost, "rejoined_workers": self.rejoined,
                "reconnected_workers": self.reconnected, "incarnation": attempt(),
                "push_bytes": self.push_bytes, "pull_bytes": self.pull_bytes,
                "checkpoint_bytes": self.checkpoint_bytes}


def load_named_optimizer(optimizer, names: list[str], full: dict) -> None:
    """This shard's entries of a name-keyed optimizer state (from any layout) into `optimizer`."""
    if not full["param_groups"]:
        return
    state = {i: full["state"][n] for i, n in enumerate(names) if n in full["state"]}
    group = {**full["param_groups"][0], "params": list(range(len(names)))}  # hyperparameters: one group
    optimizer.load_state_dict({"state": state, "param_groups": [group]})
