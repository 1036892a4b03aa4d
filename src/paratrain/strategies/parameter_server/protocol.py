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
from collections.abc import Callable
from dataclasses import dataclass
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


class Inbox:
    """The server's incoming messages, from one receiving thread per worker, in one queue.

    Why threads: gloo's any-source `recv` never notices a dead sender (measured, torch 2.13: it
    goes on waiting for the others, up to the process-group timeout), while a `recv` from one
    named rank fails at once when that rank's process is gone: RuntimeError "[.../gloo/transport/
    tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:PORT". So each worker's connection
    gets a thread blocked on it; a failure there is that worker's death (Kind.DEAD), reported
    after everything it sent before dying. A thread ends after its worker's DONE or death.
    """

    def __init__(self, workers: list[int], empty_payload: Callable[[], torch.Tensor]):
        self.queue: queue.Queue[Message] = queue.Queue()
        self.empty_payload = empty_payload  # a push's buffer, of exactly its size
        self.threads = [threading.Thread(target=self._receive, args=(w,), daemon=True) for w in workers]
        for t in self.threads:
            t.start()

    def get(self) -> Message:
        return self.queue.get()

    def _receive(self, worker: int) -> None:
        try:
            while True:
                h = torch.zeros(HEADER_NUMEL, dtype=torch.float64)
                dist.recv(h, src=worker, tag=HEADER)
                msg = Message.from_header(h)
                if msg.kind == Kind.PUSH:
                    msg.payload = self.empty_payload()
                    dist.recv(msg.payload, src=worker, tag=PAYLOAD)
                self.queue.put(msg)
                if msg.kind == Kind.DONE:
                    return
        except RuntimeError:  # the connection closed: the worker is gone
            self.queue.put(Message(Kind.DEAD, worker))


PUSH_REPLY_NUMEL = PushReply.NUMEL
