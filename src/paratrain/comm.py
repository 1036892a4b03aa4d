"""Communication accounting: bytes this rank puts on the wire and time spent communicating.

Counted at the collective call, not estimated afterwards. An all-reduce of S bytes over n ranks
is charged as the ring algorithm's 2 (n-1)/n S bytes sent per rank (reduce-scatter, then
all-gather), the bandwidth-optimal cost that gloo and NCCL attain for large tensors.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def flatten(tensors) -> torch.Tensor:
    """One flat vector of `tensors` (one message, however many tensors), detached."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like) -> list[torch.Tensor]:
    """Views of `flat` shaped as each of `like`, in order."""
    return [c.view_as(t) for c, t in zip(torch.split(flat, [t.numel() for t in like]), like)]


def timed(meter: "CommMeter", nbytes: int, launch):
    """Launch a collective: bytes charged at once (so they land in this step whatever the timing),
    launch-to-completion time when it finishes. `launch()` returns a Work, or None if it blocked."""
    t0 = time.perf_counter()
    meter.add(nbytes, 0.0)
    work = launch()
    if work is None:
        meter.add(0, time.perf_counter() - t0)
    else:
        work.get_future().then(lambda _: meter.add(0, time.perf_counter() - t0))
    return work


def counted(meter: "CommMeter", nbytes: int, t0: float, fut: torch.futures.Future,
            result: Callable = lambda f: f.value(), uncompressed: int | None = None) -> torch.futures.Future:
    """`fut` (a collective launched at perf_counter `t0`), then `result(f)` of it, charging the
    meter `nbytes` and the launch-to-completion time once it completes (DDP comm hooks)."""
    def done(f):
        value = result(f)  # re-raises a failed collective: nothing is charged for it
        meter.add(nbytes, time.perf_counter() - t0, uncompressed=uncompressed)
        return value

    return fut.then(done)


def ring_allreduce_bytes(nbytes: int, n: int) -> int:
    return 0 if n <= 1 else round(2 * (n - 1) * nbytes / n)


def ring_allgather_bytes(nbytes: int, n: int) -> int:
    """All-gather into S = `nbytes` in all: each rank passes on the n-1 shards it lacks, (n-1)/n S."""
    return 0 if n <= 1 else round((n - 1) * nbytes / n)


def ring_reduce_scatter_bytes(nbytes: int, n: int) -> int:
    """Reduce-scatter of S = `nbytes` per rank: the first half of a ring all-reduce, (n-1)/n S."""
    return ring_allgather_bytes(nbytes, n)


class CommMeter:
    """Per-step totals; `take()` returns them and starts the next step from zero.

    A codec's call also says what the same exchange would have sent uncompressed, so that
    `compression_ratio` (after `take()`) is uncompressed bytes / bytes sent over the step.
    """

    def __init__(self):
        self.bytes_sent = 0
        self.comm_s = 0.0
        self.uncompressed = 0
        self.compression_ratio: float | None = None  # of the last step taken; None: nothing sent
        self._lock = threading.Lock()  # async collectives complete on the backend's threads

    def add(self, nbytes: int, seconds: float, uncompressed: int | None = None) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            self.comm_s += seconds
            self.uncompressed += nbytes if uncompressed is None else uncompressed

    def take(self) -> tuple[int, float]:
        out = (self.bytes_sent, self.comm_s)
        self.compression_ratio = self.uncompressed / self.bytes_sent if self.bytes_sent else None
        self.bytes_sent, self.comm_s, self.uncompressed = 0, 0.0, 0
        return out

    def all_reduce(self, tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """A blocking all-reduce, counted."""
        n = dist.get_world_size(group)
        t0 = time.perf_counter()
        dist.all_reduce(tensor, op=op, group=group)
        self.add(ring_allreduce_bytes(tensor.numel() * tensor.element_size(), n), time.perf_counter() - t0)
        return tensor

    def means(self, value: torch.Tensor, group) -> list[float]:
        """The element-wise mean of a vector over `group`, counted."""
        n = dist.get_world_size(group) if dist.is_initialized() else 1
        value = value.reshape(-1)
        if n > 1:
            value = self.all_reduce(value.clone(), group) / n
        return value.tolist()

    def mean(self, value: torch.Tensor, group) -> float:
        """The mean of a scalar over `group` (None: the world, or no group at all), counted."""
        return self.means(value, group)[0]
