"""Local SGD's communication: collectives over the live replicas, retried over the survivors.

`Replicas` is the group of ranks still training, and every collective local_sgd / diloco makes
at a synchronisation goes through `Replicas.run`, so a worker lost at any of them (the small
all-gather of step statistics, the parameter all-reduce, a codec's all-gather) is survived the
same way: the failed group is aborted, the survivors agree on who is left through the
rendezvous store, and the collective is run again on a new group of their own.
"""
from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from paratrain import messages
from paratrain.comm import ring_allgather_bytes

T = TypeVar("T")


class Replicas:
    """The live replicas and a process group over them, shrunk when a worker is lost.

    A lost peer fails gloo's collective at once for the ranks that exchange data with it
    ("Connection reset by peer" / "Connection closed by peer"); the others would wait for the
    process-group timeout. Aborting the failed group closes our connections, which fails those
    at once too. Then each survivor sets a key in the rendezvous store and waits until all
    current members have, or `grace_s` has passed (the process-group timeout: the bound within
    which a live rank reaches a collective), or the members still missing are lost by their
    heartbeats (`is_lost`, watchdog.py: dead, stopped or silent). The first to finish writes the member list with
    compare_set, so all survivors adopt the same one. `new_group` with local synchronization is
    documented to need only its members; a plain one must be entered by every process of the
    world (torch 2.13 with gloo did not wait for a dead one, measured, but that is not promised).
    The world group stays broken; the trainer's own collectives use `agree_on_members()` instead.
    """

    def __init__(self, group, meter, grace_s: float, is_lost: Callable[[int], bool] = lambda rank: False):
        self.group, self.meter, self.grace_s, self.is_lost = group, meter, grace_s, is_lost
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
                self._shrink(error)
        return alone()

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
        self.group = dist.new_group(ranks, use_local_synchronization=True)
        self.ranks = ranks
        self.recovery_s += time.perf_counter() - t0

    def gather_to_first(self, obj) -> dict | None:
        """{rank: obj} of every live rank on the first live rank (rank 0), None elsewhere."""
        if len(self.ranks) == 1:
            return {self.ranks[0]: obj}
        parts = messages.gather(obj, dst=self.ranks[0], group=self.group)
        return dict(zip(self.ranks, parts)) if parts is not None else None
