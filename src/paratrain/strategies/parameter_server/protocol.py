"""The parameter server's wire format and shard layout (the algorithm is in worker.py and server.py).

Shards: whole tensors, balanced by size with the greedy rule (largest tensor first, to the server
holding the fewest elements so far), as in Li et al.'s key ranges but per tensor. Every rank
computes the same layout from the same model, so no message carries sizes or names.

Messages travel over gloo point-to-point on three tags. A request is a fixed-size float64
header (float64 so that it can carry the learning rate; the integers in it are exact), possibly
followed by a payload whose size the receiver knows already (gloo aborts the receiving process
when a buffer is smaller than the message, so nothing is ever sized by guess): a shard's flat
tensor in the parameters' dtype, or with a codec its packed payload, whose size the codec and
the shard fix (codec.py):

    worker -> server  [PUSH,    worker, clock, version, lr]   + the shard's gradient (flat or packed)
                      [BARRIER, worker, 0,     0,       0]    server 0 only
                      [STATE,   worker, 0,     0,       0]    the chief only, at checkpoints
                      [DONE,    worker, 0,     0,       0]    every server, after the last step
    server -> worker  PUSH:  [version, staleness, next clock, applied]
                                                               + the shard's parameters (flat, or
                                                                 a packed difference: codec.py)
                      BARRIER, DONE:   live mask, one entry per worker (server 0)
                      STATE:           [nbytes] (int64)        + the shard's state (paratrain.messages)

Headers are read and written through named records (`Message.header` / `Message.from_header`,
`PushReply`), never by position. A worker has at most one request outstanding per server, so replies
need no matching. In a push reply, `next clock` is the step the worker is to compute next (past the
steps the server dropped for it under SSP's drop_behind; otherwise its clock + 1) and `applied` is 0
when the server discarded the gradient as too stale (drop_behind only).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist

from paratrain import messages
from paratrain.config import ConfigError

HEADER, REPLY, PAYLOAD = 1, 2, 3  # tags
HEADER_NUMEL = 5
HEADER_BYTES = 8 * HEADER_NUMEL


class Kind(IntEnum):
    PUSH = 1
    BARRIER = 2
    STATE = 3
    DONE = 4
    DEAD = 5  # never sent: what a receiving thread reports when its worker's connection closes


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


def send_object(obj, dst: int) -> int:
    """A variable-size tree of tensors and plain values: its byte count first, then its bytes
    (paratrain.messages: no pickle). Returns the bytes sent, both messages."""
    return messages.send(obj, dst, size_tag=REPLY, payload_tag=PAYLOAD)


def recv_object(src: int):
    return messages.recv(src, size_tag=REPLY, payload_tag=PAYLOAD)


@dataclass
class Message:
    """A request: header fields by name, and the payload that follows a push."""
    kind: Kind
    worker: int
    clock: int = 0
    version: int = 0
    lr: float = 0.0
    payload: torch.Tensor | None = None

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
    """The server's incoming messages, from one receiving thread per worker, in one queue.

    Why threads: gloo's any-source `recv` never notices a dead sender (measured, torch 2.13: it
    goes on waiting for the others, up to the process-group timeout), while a `recv` from one
    named rank fails at once when that rank's process is gone: RuntimeError "[.../gloo/transport/
    tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:PORT". So each worker's connection
    gets a thread blocked on it; a failure there is that worker's death (Kind.DEAD), reported
    after everything it sent before dying. A thread ends after its worker's DONE or death.

    A hung worker (stopped, its connection open) is found by `alive(worker)`, asked every second:
    the worker's heartbeat (watchdog.py) silent for longer than the process-group timeout; `end`
    then ends it if it can (SIGKILL to a stopped process on this host). A
    worker that waits for a reply the server holds back (SSP's gate) is alive and keeps beating,
    so it is never lost for waiting; its receiving thread waits as long as it takes.
    """

    def __init__(self, workers: list[int], empty_payload: Callable[[], torch.Tensor],
                 alive: Callable[[int], bool] | None = None, end: Callable[[int], bool] = lambda w: False):
        self.queue: queue.Queue[Message] = queue.Queue()
        self.empty_payload = empty_payload  # a push's buffer, of exactly its size
        self.alive, self.end, self.ended = alive, end, set()  # ended: DONE or DEAD reported
        self.hung: set[int] = set()  # found hung and not ended: their receiving threads stay blocked
        self._lock = threading.Lock()
        self.threads = {w: threading.Thread(target=self._receive, args=(w,), daemon=True) for w in workers}
        for t in self.threads.values():
            t.start()
        if alive is not None:
            threading.Thread(target=self._watch, args=(workers,), daemon=True).start()

    def get(self) -> Message:
        return self.queue.get()

    def join(self) -> None:
        """Wait for the receiving threads of the workers that said DONE or whose connection closed
        (a hung worker's thread stays blocked on its open connection; it is a daemon)."""
        for w, t in self.threads.items():
            if w not in self.hung:
                t.join()

    def _end(self, msg: Message) -> None:
        with self._lock:
            if msg.worker in self.ended:
                return
            self.ended.add(msg.worker)
        self.queue.put(msg)

    def _receive(self, worker: int) -> None:
        try:
            while True:
                h = torch.zeros(HEADER_NUMEL, dtype=torch.float64)
                wait_patiently(dist.irecv(h, src=worker, tag=HEADER), SERVER_PATIENCE_S)
                if worker in self.ended:  # woke up after it was found hung: no longer a member
                    return
                msg = Message.from_header(h)
                if msg.kind == Kind.PUSH:
                    msg.payload = self.empty_payload()
                    wait_patiently(dist.irecv(msg.payload, src=worker, tag=PAYLOAD), SERVER_PATIENCE_S)
                if msg.kind == Kind.DONE:
                    self._end(msg)
                    return
                self.queue.put(msg)
        except RuntimeError:  # the connection closed: the worker is gone
            self._end(Message(Kind.DEAD, worker))

    def _watch(self, workers: list[int]) -> None:
        while len(self.ended) < len(workers):
            time.sleep(1.0)
            for w in workers:
                if w not in self.ended and not self.alive(w):
                    # Ended if it is stopped on this host: its connection closes, and its receiving thread
                    # ends (a receive still posted at exit makes gloo terminate the process).
                    if not self.end(w):
                        self.hung.add(w)
                    self._end(Message(Kind.DEAD, w))


PUSH_REPLY_NUMEL = PushReply.NUMEL
