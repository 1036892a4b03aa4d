"""Every valid plan for a model, a global batch and a cluster; predicted, filtered by memory, ranked.

The space: dp x pp x tp over the devices (tp within a node and dividing the heads, pp at most
the blocks, dp dividing the batch), micro-batches per dp rank, each pipeline schedule with its
stages per rank, the ZeRO stage of the dp axis (0-3 for pure data parallelism, replicate or
shard in a mesh, as paratrain's hybrid runs it), activation recomputation, sequence parallelism,
and the asynchronous families (local SGD and DiLoCo with sync period and codec, the parameter
server, ddp with a codec). `runnable=True` keeps to what paratrain runs (no recomputation: its
strategies do not recompute). Plans that do not fit the device's memory are dropped and counted
by reason; the rest are ranked by predicted step time, and `explain` says in one sentence why
the first beats the second.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from paratrain.planner.cost import estimate
from paratrain.planner.hardware import Cluster
from paratrain.planner.model import ModelProfile
from paratrain.planner.plan import Estimate, Plan
from paratrain.planner.schedule import valid

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")
SYNC_PERIODS = (4, 16, 64)
CODECS = ("none", "fp16", "int8")


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass
class Search:
    ranked: list[Estimate]
    dropped: Counter = field(default_factory=Counter)  # reason -> plans
    considered: int = 0
    smallest_bytes: float = 0.0  # the least memory any plan needed (when none fits)

    @property
    def best(self) -> Estimate | None:
        return self.ranked[0] if self.ranked else None


def plans(model: ModelProfile, cluster: Cluster, global_batch: int, dtype: str = "fp32", runnable: bool = False,
          asynchronous: bool = True, max_microbatches: int = 64) -> Iterator[Plan]:
    n, blocks = cluster.devices, len(model.blocks)
    for tp in divisors(n):
        if tp > 1 and (tp > cluster.per_node or not model.heads or model.heads % tp):
            continue
        for pp in divisors(n // tp):
            if pp > max(1, blocks):
                continue
            dp = n // (tp * pp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            zeros = (0, 1, 2, 3) if dp > 1 and pp == 1 and tp == 1 else (0, 3) if dp > 1 else (0,)
            recomputes = ("none",) if runnable else ("none", "selective", "full") if model.heads else ("none", "full")
            sps = (False, True) if tp > 1 else (False,)
            # micro-batches: a pipeline takes any count from pp up (more shrinks its bubble); without
            # one, gradient accumulation only saves memory, so a few counts are enough
            counts = [d for d in divisors(per_rank) if (d >= pp if pp > 1 else d <= max_microbatches)] or [per_rank]
            for m in counts:
                for schedule, virtual in _schedules(pp, m, blocks):
                    for zero in zeros:
                        for recompute in recomputes:
                            for sp in sps:
                                yield Plan(dp, pp, tp, m, schedule, virtual, zero, recompute, sp, dtype)
    if asynchronous and n > 1:
        yield from _asynchronous(n, global_batch, dtype)


def _schedules(pp: int, m: int, blocks: int) -> Iterator[tuple[str, int]]:
    if pp == 1:
        yield "none", 1
        return
    for schedule in SCHEDULES:
        for virtual in ((2, 3, 4) if schedule == "interleaved_1f1b" else (2,) if schedule in ("interleaved_zb", "zbv")
                        else (1,)):
            if pp * virtual <= blocks and valid(schedule, pp, m, virtual) is None:
                yield schedule, virtual


def _asynchronous(n: int, global_batch: int, dtype: str) -> Iterator[Plan]:
    if global_batch % n == 0:
        for codec in (*CODECS[1:], "powersgd"):  # ddp with a compressed gradient all-reduce (a DDP comm hook)
            yield Plan(dp=n, dtype=dtype, codec=codec)
        for family in ("local_sgd", "diloco"):
            for h in SYNC_PERIODS:
                for codec in CODECS:
                    yield Plan(dp=n, dtype=dtype, family=family, sync_every=h, codec=codec)
    if n > 2 and global_batch % (n - 1) == 0:
        for mode in ("bsp", "asp"):
            for codec in CODECS:
                yield Plan(dp=n - 1, dtype=dtype, family="parameter_server", servers=1, codec=codec, mode=mode)


def search(model: ModelProfile, cluster: Cluster, global_batch: int, dtype: str = "fp32", runnable: bool = False,
           asynchronous: bool = True, slowdown: float = 1.0) -> Search:
    """Every plan predicted; those that fit ranked by step time (per sample: the same order, the
    global batch being the same for all; with a straggler, by samples per second)."""
    out = Search([])
    smallest = float("inf")
    for plan in plans(model, cluster, global_batch, dtype, runnable, asynchronous):
        out.considered += 1
        est = estimate(plan, model, cluster, global_batch, slowdown)
        if not est.fits:
            out.dropped["does not fit in memory"] += 1
            smallest = min(smallest, est.memory_bytes)
            continue
        out.ranked.append(est)
    out.ranked.sort(key=lambda e: (-e.samples_per_s, e.memory_bytes))
    out.smallest_bytes = smallest if not out.ranked else 0.0
    return out


def explain(first: Estimate, second: Estimate | None) -> str:
    """One sentence: why the first plan beats the runner-up."""
    if second is None:
        return f"{first.plan.describe()} is the only plan that fits."
    parts = {"compute": (first.compute_s, second.compute_s), "exposed communication": (first.comm_s, second.comm_s),
             "pipeline bubble": (first.bubble_s, second.bubble_s),
             "optimizer step": (first.optimizer_s, second.optimizer_s)}
    name, (a, b) = max(parts.items(), key=lambda kv: kv[1][1] - kv[1][0])
    gain = (second.step_s - first.step_s) / second.step_s if second.step_s else 0.0
    return (f"{first.plan.describe()} beats {second.plan.describe()} by {gain:.1%} a step: its {name} is "
            f"{_ms(a)} against {_ms(b)}, and it needs {first.memory_bytes / 2**30:.2f} GiB a device against "
            f"{second.memory_bytes / 2**30:.2f}.")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"
