"""The parameter server's wire format and shard layout (the algorithm is in worker.py and server.py).

Shards: whole tensors, balanced by size with the greedy rule (largest tensor first, to the server
holding the fewest elements so far), as in Li et al.'s key ranges but per tensor. Every rank
computes the same layout from the same model, so no message carries sizes or names.

Messages travel over gloo point-to-point on three tags, each worker-server pair on a `Channel`
of its own: a gloo group of the two, made on the job's store under both ends' incarnations, so
that a worker restarted into the running job (apart.py) connects again where a group of the whole
job could not take it back. A request is a fixed-size float64
header (float64 so that it can carry the learning rate; the integers in it are exact), possibly
followed by a payload whose size the receiver knows already (gloo aborts the receiving process
when a buffer is smaller than the message, so nothing is ever sized by guess): a shard's flat
tensor in the parameters' dtype, or with a codec its packed payload, whose size the codec and
the shard fix (codec.py):

    worker -> server  [PUSH,    worker, clock, version, lr]   + the shard's gradient (flat or packed)
                      [BARRIER, worker, 0,     0,       0]    server 0 only
                      [STATE,   worker, 0,     0,       0]    the chief only, at checkpoints
                      [DONE,    worker, 0,     0,       0]    every server, after the last step
                      [JOIN,    worker, 0,     0,       0]    every server, from a restarted worker
                      [RECONNECT, worker, clock, 0,     0]    to a restarted server, from each worker
    server -> worker  PUSH, JOIN, RECONNECT: [version, staleness, next clock, applied]
                                                               + the shard's parameters (flat, or
                                                                 a packed difference: codec.py)
                      BARRIER, DONE:   live mask, one entry per worker (server 0): 1 a worker
                                       of the job's group, 2 one that rejoined (alone), 0 lost
                      STATE:           [nbytes] (int64)        + the shard's state (paratrain.messages)

Headers are read and written through named records (`Message.header` / `Message.from_header`,
`PushReply`), never by position. A worker has at most one request outstanding per server, so replies
need no matching. In a push reply, `next clock` is the step the worker is to compute next (past the
steps the server dropped for it under SSP's drop_behind; otherwise its clock + 1) and `applied` is 0
when the server discarded the gradient as too stale (drop_behind only).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from pathlib import Path

import torch
import torch.distributed as dist

from paratrain import messages
from paratrain.config import ConfigError
from paratrain.restarts import attempt
from paratrain.topology import REJOIN_ENV

HEADER, REPLY, PAYLOAD = 1, 2, 3  # tags
HEADER_NUMEL = 5
HEADER_BYTES = 8 * HEADER_NUMEL


class Kind(IntEnum):
    PUSH = 1
    BARRIER = 2
    STATE = 3
    DONE = 4
    DEAD = 5  # never sent: what a receiving thread reports when its worker's connection closes
    JOIN = 6
    RECONNECT = 7


MEMBER, REJOINED = 1, 2  # a live worker's entry in a membership mask


def rejoins(cfg) -> bool:
    """Whether a lost worker is restarted into the running job (apart.py, `run.max_restarts`): under
    SSP and ASP, where a worker that comes back at the slowest one's step fits at once, and without
    a codec (its copies and residuals would start over on both ends). BSP's rounds, one per step,
    would have to agree across servers on the round it joins: its lost worker is dropped."""
    return (cfg.strategy.ps.mode in ("ssp", "asp") and cfg.strategy.compression.codec == "none"
            and cfg.run.max_restarts > 0)


def job_store(run_dir) -> dist.Store:
    """A client of the job's store (MASTER_ADDR:MASTER_PORT: under `paratrain run`, the launcher's,
    which outlives every worker), where channels meet and incarnations are registered; its keys
    under the run directory's name (one store can serve several runs' processes, as in tests)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    return dist.PrefixStore(f"parameter_server/{Path(run_dir).resolve()}/", store)


def register(store: dist.Store, rank: int, incarnation: int) -> None:
    store.set(f"ps/incarnation/{rank}", str(incarnation))


def first_incarnation() -> int:
    """The lowest incarnation of a peer this process may meet: any, for a process restarted alone
    into a running job (apart.py) and its first start; this attempt's, after torch's agent restarted
    the whole group (the store keeps the keys of the attempt before)."""
    return 0 if os.environ.get(REJOIN_ENV) == "1" else attempt()


def incarnation(store: dist.Store, rank: int, newer_than: int = -1, closing=lambda: False) -> int | None:
    """`rank`'s registered incarnation once it is newer than `newer_than`; None once `closing()`."""
    key = f"ps/incarnation/{rank}"
    while not closing():
        if store.check([key]) and (n := int(store.get(key))) > newer_than:
            return n
        time.sleep(0.02)
    return None


class Channel:
    """One worker and one server, alone in a gloo group of two: made on the job's store under a
    prefix naming both ends' incarnations, so each start of either end meets the other afresh.
    Written by hand because torch's groups are made from its world group, whose members are fixed.

    The worker dials (`dial`): it says "hello k" in the store, then both ends make the group under
    a prefix ending in k, each blocking until the other arrives (up to `timeout_s`). The server
    answers each hello (`answer`), as late as the worker comes: a restarted server's workers come
    when their next message to it fails. A failed try is never made again under the same prefix
    (gloo would read the addresses the failed try left in the store): the worker dials k + 1."""

    TRIES = 3  # a worker's dials before its error stands

    def __init__(self, store: dist.Store, prefix: str, side: int, timeout_s: float):
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), side, 2, timedelta(seconds=timeout_s))
        self.peer = 1 - side

    @staticmethod
    def _key(worker: int, server: int, incarnations: tuple[int, int]) -> str:
        return f"ps/channel/{worker}-{server}/{incarnations[0]}-{incarnations[1]}/"

    @classmethod
    def dial(cls, store: dist.Store, worker: int, server: int, incarnations: tuple[int, int],
             timeout_s: float) -> "Channel":
        key = cls._key(worker, server, incarnations)
        for k in range(cls.TRIES):
            store.set(key + "hello", str(k))
            try:
                return cls(store, f"{key}{k}/", 0, timeout_s)
            except RuntimeError:
                if k == cls.TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def answer(cls, store: dist.Store, worker: int, server: int, incarnations: tuple[int, int], timeout_s: float,
               closing) -> "Channel | None":
        """The channel of the worker's next hello; None once `closing()`."""
        key, last = cls._key(worker, server, incarnations) + "hello", -1
        while not closing():
            if store.check([key]) and (k := int(store.get(key))) > last:
                try:
                    return cls(store, f"{key[:-len('hello')]}{k}/", 1, timeout_s)
                except RuntimeError:
                    last = k
                    continue
            time.sleep(0.02)
        return None

    def isend(self, tensor: torch.Tensor, tag: int):
        return self.pg.send([tensor], self.peer, tag)

    def irecv(self, tensor: torch.Tensor, tag: int):
        return self.pg.recv([tensor], self.peer, tag)

    def send(self, tensor: torch.Tensor, tag: int) -> None:
        self.isend(tensor, tag).wait()

    def send_object(self, obj) -> int:
        """A variable-size tree of tensors and plain values: its byte count, then its bytes
        (paratrain.messages: no pickle). Returns the bytes sent."""
        payload = messages.encode(obj)
        self.send(torch.tensor([payload.numel()], dtype=torch.int64), REPLY)
        self.send(payload, PAYLOAD)
        return 8 + payload.numel()

    def recv_object(self, timeout_s: float):
        size = torch.empty(1, dtype=torch.int64)
        wait_patiently(self.irecv(size, REPLY), timeout_s)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        wait_patiently(self.irecv(buf, PAYLOAD), timeout_s)
        return messages.decode(buf)


def partition(sizes: dict[str, int], num_servers: int) -> list[list[str]]:
    """Names per server: greedy balance by element count; each shard keeps the model's order."""
    load, owner = [0] * num_servers, {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: ties keep the model's order
        s = min(range(num_servers), key=lambda i: load[i])
        owner[name], load[s] = s, load[s] + sizes[name]
    return [[n for n in sizes if owner[n] == s] for s in range(num_servers)]


def shard_layout(model: torch.nn.Module, num_servers: int) -> list[list[str]]:
    """Parameter names per server, the same on every rank (workers and servers alike)."""
    params = dict(model.named_parameters())
    if len({p.dtype for p in params.values()}) > 1:
        raise ConfigError("strategy.name = 'parameter_server': the model's parameters must share one dtype")
    return partition({n: p.numel() for n, p in params.items()}, num_servers)


@dataclass
class Message:
    """A request: header fields by name, and the payload that follows a push."""
    kind: Kind
    worker: int
    clock: int = 0
    version: int = 0
    lr: float = 0.0
    payload: torch.Tensor | None = None
    channel: "Channel | None" = None  # a later incarnation's, with its first message (Inbox)

    def header(self) -> torch.Tensor:
        return torch.tensor([self.kind, self.worker, self.clock, self.version, self.lr], dtype=torch.float64)

    @classmethod
    def from_header(cls, h: torch.Tensor) -> "Message":
        return cls(Kind(int(h[0])), int(h[1]), int(h[2]), int(h[3]), float(h[4]))


@dataclass(frozen=True)
class PushReply:
    """A server's answer to a push, before the shard's parameters."""
    version: int  # updates applied to the shard so far
    staleness: int  # of the pushed gradient when applied
    next_clock: int  # the step the worker computes next (past steps dropped for it: drop_behind)
    applied: bool  # False: discarded as too stale (drop_behind only)

    NUMEL = 4

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.version, self.staleness, self.next_clock, self.applied], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "PushReply":
        return cls(int(t[0]), int(t[1]), int(t[2]), bool(t[3]))


def wait_patiently(work, timeout_s: float) -> None:
    """Wait for a receive from a peer that may be alive and slow to answer for longer than the
    process-group timeout: a worker held at the SSP gate, or a server holding it until a hung
    worker is found lost. gloo closes the pair when a receive times out (measured: "Application
    timeout caused pair closure" on every later operation), so a timeout cannot be retried; a
    death fails the receive at once (its connection closes), and a hang is the heartbeats' to find."""
    work.wait(timeout=timedelta(seconds=timeout_s))


def gate_patience(run_timeout_s: float) -> float:
    """How long a worker waits for a server's reply: enough for the server to find a hung worker
    lost (its heartbeat silent for `run.timeout_s`, checked each second) and open the gate."""
    return 3 * run_timeout_s + 10


SERVER_PATIENCE_S = 24 * 3600.0  # a server waits on a worker until it says DONE, dies or goes silent


class Inbox:
    """The server's incoming messages, from one receiving thread per worker, in one queue; and the
    server's channel to each worker (`channels`), which that thread opens.

    Why threads: gloo's any-source `recv` never notices a dead sender (measured, torch 2.13: it
    goes on waiting for the others, up to the process-group timeout), while a `recv` from one
    named peer fails at once when that peer's process is gone: RuntimeError "[.../gloo/transport/
    tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:PORT". So each worker's channel
    gets a thread blocked on it; a failure there is that worker's death (Kind.DEAD), reported
    after everything it sent before dying. With `rejoins`, the thread then waits for the worker's
    next incarnation (restarted by apart.py), opens a channel to it, and goes on: its first
    message is a JOIN. A thread ends after its worker's DONE, or its death without `rejoins`.

    A hung worker (stopped, its connection open) is found by `alive(worker)`, asked every second:
    the worker's heartbeat (watchdog.py) silent for longer than the process-group timeout; `end`
    then ends it if it can (SIGKILL to a stopped process on this host). A
    worker that waits for a reply the server holds back (SSP's gate) is alive and keeps beating,
    so it is never lost for waiting; its receiving thread waits as long as it takes.
    """

    def __init__(self, workers: list[int], empty_payload: Callable[[], torch.Tensor], connect: Callable,
                 alive: Callable[..., bool] | None = None, end: Callable[[int], bool] = lambda w: False,
                 rejoins: bool = False):
        self.queue: queue.Queue[Message] = queue.Queue()
        self.empty_payload = empty_payload  # a push's buffer, of exactly its size
        # connect(worker, its previous incarnation or None) -> (its next incarnation, Channel, or None
        # if it never connected); None once the server is closing
        self.connect = connect
        self.rejoins = rejoins
        self.alive, self.end, self.ended = alive, end, set()  # ended: DONE or DEAD reported
        self.finished: set[int] = set()  # DONE reported
        self.hung: set[int] = set()  # found hung and not ended: their receiving threads stay blocked
        self.closing = False
        self.channels: dict[int, Channel] = {}
        self.connected_at: dict[int, float] = {}  # when each worker's channel opened: silence counts from there
        self._lock = threading.Lock()
        self.threads = {w: threading.Thread(target=self._receive, args=(w,), daemon=True) for w in workers}
        for t in self.threads.values():
            t.start()
        if alive is not None:
            threading.Thread(target=self._watch, args=(workers,), daemon=True).start()

    def get(self) -> Message:
        return self.queue.get()

    def close(self) -> None:
        """Wait for the receiving threads of the workers that said DONE (one waiting for a lost
        worker's next incarnation, or blocked on a hung one's open connection, is a daemon)."""
        self.closing = True
        for w, t in self.threads.items():
            if w not in self.hung and (not self.rejoins or w in self.finished):
                t.join()

    def _end(self, msg: Message) -> None:
        with self._lock:
            if msg.worker in self.ended:
                return
            self.ended.add(msg.worker)
            if msg.kind == Kind.DONE:
                self.finished.add(msg.worker)
        self.queue.put(msg)

    def _receive(self, worker: int) -> None:
        previous = None
        while (found := self.connect(worker, previous)) is not None:
            previous, channel = found
            if channel is None:  # it never came (died first, or hung): lost as if it had died here
                self._end(Message(Kind.DEAD, worker))
                if not self.rejoins:
                    return
                continue
            later = worker in self.channels  # a later incarnation: its channel goes in with its JOIN
            with self._lock:
                if not later:
                    self.channels[worker] = channel
                self.connected_at[worker] = time.time()
                if worker in self.ended:  # a new incarnation: a member again once its JOIN is handled
                    self.ended.discard(worker)
                    self.hung.discard(worker)
            try:
                while True:
                    h = torch.zeros(HEADER_NUMEL, dtype=torch.float64)
                    wait_patiently(channel.irecv(h, HEADER), SERVER_PATIENCE_S)
                    if worker in self.ended:  # woke up after it was found hung: no longer a member
                        break
                    msg = Message.from_header(h)
                    if later:  # the server's main thread swaps channels as it handles this (JOIN):
                        msg.channel, later = channel, False  # its replies to the lost one go there until then
                    if msg.kind == Kind.PUSH:
                        msg.payload = self.empty_payload()
                        wait_patiently(channel.irecv(msg.payload, PAYLOAD), SERVER_PATIENCE_S)
                    if msg.kind == Kind.DONE:
                        self._end(msg)
                        return
                    self.queue.put(msg)
            except RuntimeError:  # the connection closed: the worker is gone
                self._end(Message(Kind.DEAD, worker))
            if not self.rejoins:
                return

    def _watch(self, workers: list[int]) -> None:
        while not self.closing:
            time.sleep(1.0)
            for w in workers:
                if w not in self.ended and w in self.channels and not self.alive(w, self.connected_at[w]):
                    # Ended if it is stopped on this host: its connection closes, and its receiving thread
                    # ends (a receive still posted at exit makes gloo terminate the process).
                    if not self.end(w):
                        self.hung.add(w)
                    self._end(Message(Kind.DEAD, w))


PUSH_REPLY_NUMEL = PushReply.NUMEL
