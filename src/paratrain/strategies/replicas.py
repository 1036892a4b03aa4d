"""Collectives over the live replicas, retried over the survivors: local SGD, DiLoCo and gossip.

`Replicas` is the group of ranks still training. Every collective local_sgd / diloco makes at a
synchronisation goes through `Replicas.run` (the small all-gather of step statistics, the
parameter all-reduce, a codec's all-gather), and so do gossip's per-step stop flag, evaluations
and the checkpoints' membership (`agree`), so a worker lost at any of them is survived the same
way: the failed group is aborted, the survivors agree on who is left through the rendezvous
store, and the collective is run again on a new group of their own. gossip also calls `shrink`
itself when a neighbour's message fails. Written here, not taken from torchft: torchft forms its
quorums at a Lighthouse per replica group (replica_groups.py), while these ranks share one
torchrun-style world whose store the launcher hosts (apart.py); torch.distributed has no
shrinking group of its own.
"""
from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from paratrain import messages
from paratrain.comm import ring_allgather_bytes

T = TypeVar("T")


class Replicas:
    """The live replicas and a process group over them, shrunk when a worker is lost.

    A lost peer fails gloo's collective at once for the ranks that exchange data with it
    ("Connection reset by peer" / "Connection closed by peer"); the others wait for the
    process-group timeout (`timeout_s`): aborting or destroying a gloo group does not close its
    connections, so nothing can wake them sooner (measured, torch 2.13: a rank blocked in an
    all-reduce with a peer that had aborted failed at the group's timeout, or when that peer's
    process exited). The failed group is aborted all the same (it is never used again). Then
    each survivor sets a key in the rendezvous store and waits until all current members have,
    or the grace has passed, or the members still missing are lost by their heartbeats
    (`is_lost`, watchdog.py: dead, stopped or silent). The grace is two timeouts and a few
    seconds: a live rank may enter its collective up to about a timeout after the first
    survivor began to wait, and then take a timeout to fail there. The first to finish writes
    the member list with compare_set, so all survivors adopt the same one. `new_group` with local
    synchronization is documented to need only its members; a plain one must be entered by every
    process of the world (torch 2.13 with gloo did not wait for a dead one, measured, but that is
    not promised). It gets the same timeout (torch's default for a new group is 30 minutes). The
    world group stays broken; the trainer's own collectives use `agree_on_members()` instead.
    """

    def __init__(self, group, meter, timeout_s: float, is_lost: Callable[[int], bool] = lambda rank: False,
                 device: torch.device | None = None):
        self.group, self.meter, self.timeout_s, self.is_lost = group, meter, timeout_s, is_lost
        self.grace_s = 2 * timeout_s + 5
        self.device = device or torch.device("cpu")
        self.ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.generation, self.recovery_s = 0, 0.0
        if len(self.ranks) > 1:  # this training's own keys: trainings may share one store
            run_id = messages.broadcast(uuid.uuid4().hex, src=self.ranks[0], group=group)
            self.prefix = f"paratrain/local_sgd/{run_id}"

    def run(self, collective: Callable[[object], T], alone: Callable[[], T]) -> T:
        """`collective(group)` over the live replicas, retried over the survivors if one is lost;
        `alone()` once this rank is the only one left. `collective` must be safe to repeat: it
        may have run partly on the failed group (hence the clones in `mean`)."""
        while len(self.ranks) > 1:
            try:
                return collective(self.group)
            except RuntimeError as error:  # gloo: a peer's connection closed, or the timeout
                self.shrink(error)
        return alone()

    def max(self, value: float) -> float:
        """The largest `value` over the live replicas (not metered: no training traffic)."""
        def all_reduce(group) -> float:
            flag = torch.tensor([float(value)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            return flag.item()

        return self.run(all_reduce, lambda: float(value))

    def shard(self) -> tuple[int, int] | None:
        """This rank's slice of each global batch among the survivors once a replica is lost
        (None while none is): they take over its share, so no sample of a batch goes untrained."""
        if self.generation == 0:
            return None
        return (self.ranks.index(dist.get_rank()) if len(self.ranks) > 1 else 0), len(self.ranks)

    def agree(self):
        """Who is still here, found now by one small all-reduce rather than at the next
        collective: the survivors' group, or None while nobody was lost (the whole world). The
        checkpointer gathers over it, so a rank lost since the last collective fails no checkpoint."""
        self.max(0.0)
        return self.group if self.generation else None

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average over the live replicas (a ring all-reduce)."""
        # A clone per try: a failed all-reduce leaves its buffer half reduced.
        return self.run(lambda group: self.meter.all_reduce(tensor.clone(), group) / len(self.ranks),
                        tensor.clone)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every live replica's `values` (1-D, the same length everywhere), one row per rank."""
        def all_gather(group) -> torch.Tensor:
            n, t0 = len(self.ranks), time.perf_counter()
            rows = [torch.empty_like(values) for _ in range(n)]
            dist.all_gather(rows, values, group=group)
            self.meter.add(ring_allgather_bytes(n * values.numel() * values.element_size(), n),
                           time.perf_counter() - t0)
            return torch.stack(rows)

        return self.run(all_gather, lambda: values.unsqueeze(0).clone())

    def shrink(self, error: RuntimeError) -> None:
        """`error` failed a collective (or gossip's message) on the current group: agree on the
        survivors and go on over a group of theirs; raise if this rank was left out, or if
        everyone is alive (then the failure is not a lost worker)."""
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
                if all(self.is_lost(r) for r in set(self.ranks) - set(alive())):
                    break  # the rest are dead or stopped (their heartbeats): no need to wait out the grace
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
        self.group = dist.new_group(ranks, timeout=timedelta(seconds=self.timeout_s), use_local_synchronization=True)
        self.ranks = ranks
        self.recovery_s += time.perf_counter() - t0

    def gather_to_first(self, obj) -> dict | None:
        """{rank: obj} of every live rank on the first live rank (rank 0), None elsewhere."""
        if len(self.ranks) == 1:
            return {self.ranks[0]: obj}
        parts = messages.gather(obj, dst=self.ranks[0], group=self.group)
        return dict(zip(self.ranks, parts)) if parts is not None else None
