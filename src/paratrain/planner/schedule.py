"""A pipeline step, simulated action by action in the order torch's own schedules run them.

torch.distributed.pipelining generates each schedule's order of actions per rank (forward F,
backward B, or its input and weight halves I and W for the zero-bubble schedules), the same
order `paratrain`'s pipeline strategy executes; its schedule classes build it from (stages,
micro-batches) alone (`actions`). Written here: torch's own simulator
(`schedules._simulate_comms_compute`) gives every action one unit of time and models neither
compute time, overlap nor memory (its docstring). This one gives each action its stage's time
and starts it when its rank is free and its inputs have arrived:
- F(s, m) after F(s-1, m) plus the point-to-point time of the activation between their ranks;
- B or I (s, m) after B or I (s+1, m) plus the gradient's point-to-point time (the last stage:
  after its own F(s, m)); W(s, m) after I(s, m);
a rank's own sends occupy it (its action ends when its output has left), and it counts the
activations each rank holds (+ at F, - at B; the zero-bubble I frees what W does
not need), so the peak in-flight memory is the schedule's, not a formula's.
The result: the step's makespan, each rank's busy time (the rest is the bubble), and each
rank's peak number of micro-batches held. `model_parallel` is GPipe with one micro-batch.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

TORCH_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B",
               "interleaved_zb": "InterleavedZeroBubble", "zbv": "ZBVZeroBubble"}
MULTI = ("interleaved_1f1b", "interleaved_zb", "zbv")  # several stages per rank
W_SHARE = 0.4  # of a backward's activations, what its weight half (W) still needs: the matmuls' inputs


@dataclass(frozen=True)
class Simulated:
    makespan: float
    busy: tuple[float, ...]  # per rank
    peak_held: tuple[float, ...]  # per rank: micro-batch activations held at once (W's share counted)

    @property
    def bubble(self) -> float:
        """The idle share of the step on the busiest rank's timeline (what the README's tables measure)."""
        return 1.0 - max(self.busy) / self.makespan if self.makespan else 0.0


def valid(schedule: str, pp: int, microbatches: int, virtual: int) -> str | None:
    """Why this schedule cannot run this layout (None: it can), as paratrain's layout rules say."""
    if schedule not in TORCH_NAMES:
        return f"unknown schedule {schedule!r}"
    if schedule in MULTI and virtual < 2:
        return f"{schedule} needs 2 or more stages per rank"
    if schedule == "zbv" and virtual != 2:
        return "zbv needs exactly 2 stages per rank"
    if schedule not in MULTI and virtual != 1:
        return f"{schedule} runs one stage per rank"
    if schedule != "gpipe" and microbatches < pp:
        return f"{schedule} needs at least as many micro-batches as stages per rank group ({pp})"
    if schedule in ("interleaved_1f1b", "interleaved_zb") and microbatches % max(1, microbatches // pp):
        return "interleaved schedules need micro-batches a multiple of their rounds"
    return None


@lru_cache(maxsize=512)
def actions(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> tuple[tuple[tuple, ...], ...]:
    """Per rank, its actions in order: (kind F/B/I/W, stage, micro-batch), from torch's schedule
    class itself on stand-in stages (only the sizes are read; `_schedule_visualizer.get_schedule_ops`
    does the same with mocks). The multi-stage schedules' lowering to sends and receives, which
    this simulation does its own way, is skipped: it costs seconds for long pipelines."""
    from types import SimpleNamespace

    import torch.distributed.pipelining.schedules as torch_schedules

    cls = getattr(torch_schedules, "Schedule" + TORCH_NAMES[schedule])
    if schedule in MULTI:
        fast = type(cls.__name__, (cls,), {"_prepare_schedule_with_comms": lambda self, *a, **k: None})
        stages = [SimpleNamespace(num_stages=pp * virtual, group_size=pp, group_rank=0, submod=None,
                                  stage_index_to_group_rank=None) for _ in range(virtual)]
        order = fast(stages, microbatches).pipeline_order
    else:
        order = cls(SimpleNamespace(num_stages=pp), microbatches).pipeline_order
    ranks = []
    for rank in range(pp):
        # The k-th action of a kind on a stage is micro-batch k (torch 2.13's 1F1B numbers the last
        # rank's forwards 1..m; every schedule runs a stage's micro-batches in order).
        seen: dict = defaultdict(int)
        mine = []
        for a in order[rank]:
            if a is None:
                continue
            kind = a.computation_type.value
            if kind not in ("F", "B", "I", "W"):
                continue
            mine.append((kind, a.stage_index, seen[(kind, a.stage_index)]))
            seen[(kind, a.stage_index)] += 1
        ranks.append(tuple(mine))
    return tuple(ranks)


def stage_rank(schedule: str, pp: int, virtual: int) -> list[int]:
    """Which rank holds each stage: round robin, or a V for zbv (rank r: stages r and 2pp-1-r)."""
    stages = pp * virtual
    if schedule == "zbv":
        return [s if s < pp else 2 * pp - 1 - s for s in range(stages)]
    return [s % pp for s in range(stages)]


@lru_cache(maxsize=4096)
def peak_held(schedule: str, pp: int, microbatches: int, virtual: int) -> tuple[float, ...]:
    """Per rank, the most micro-batch activations it holds at once (+1 at F, -1 at B; I frees what W
    does not need): a count along each rank's own order, whatever the actions' durations."""
    if microbatches > STEADY * pp:  # past the warm-up the count grows by the same step each round
        lo, hi = peak_held(schedule, pp, 4 * pp, virtual), peak_held(schedule, pp, 6 * pp, virtual)
        k = (microbatches - 6 * pp) / (2 * pp)
        return tuple(z + k * (z - a) for a, z in zip(lo, hi))
    peaks = []
    for rank in actions(schedule, pp, microbatches, virtual):
        held = peak = 0.0
        for kind, _, _ in rank:
            held += {"F": 1.0, "B": -1.0, "I": -(1 - W_SHARE), "W": -W_SHARE}[kind]
            peak = max(peak, held)
        peaks.append(peak)
    return tuple(peaks)


STEADY = 8  # above STEADY x pp micro-batches, simulate 4pp and 6pp and extrapolate (see `simulate`)


def simulate(schedule: str, pp: int, microbatches: int, virtual: int, f: list[float], b: list[float],
             send: list[float], action: float = 0.0) -> Simulated:
    """The step of `microbatches` micro-batches. Past the warm-up every schedule repeats the same
    pattern once per micro-batch (per round of pp, interleaved), so makespan, busy time and the
    activations held grow by the same amount per micro-batch from there on: above STEADY x pp
    micro-batches it simulates 4pp and 6pp and extends the line (exact where both are past the
    warm-up: tested against the full simulation), which keeps a plan on thousands of devices
    within milliseconds. Results are cached on the times relative to the first stage's forward.
    `action`: seconds every action costs beyond its stage's compute, F, B, I and W alike (torch's
    schedule runtime on a CPU: calibrate.pipeline_action_seconds)."""
    unit = f[0] or 1.0
    key = (schedule, pp, microbatches, virtual, round(action / unit, 4), *(round(x / unit, 4) for x in (*f, *b, *send)))
    sim = _cached(key)
    return Simulated(sim.makespan * unit, tuple(x * unit for x in sim.busy), sim.peak_held)


@lru_cache(maxsize=65536)
def _cached(key: tuple) -> Simulated:
    schedule, pp, m, v, action, *times = key
    n = pp * v
    f, b, send = list(times[:n]), list(times[n:2 * n]), list(times[2 * n:])
    if m <= STEADY * pp:
        return _simulate(schedule, pp, m, v, f, b, send, action)
    lo, hi = (_simulate(schedule, pp, 4 * pp, v, f, b, send, action),
              _simulate(schedule, pp, 6 * pp, v, f, b, send, action))
    k = (m - 6 * pp) / (2 * pp)  # rounds of 2pp micro-batches past the larger simulation

    def extend(a: float, z: float) -> float:
        return z + k * (z - a)

    return Simulated(extend(lo.makespan, hi.makespan), tuple(map(extend, lo.busy, hi.busy)),
                     tuple(map(extend, lo.peak_held, hi.peak_held)))


@lru_cache(maxsize=1024)
def _compiled(schedule: str, pp: int, microbatches: int, virtual: int) -> tuple:
    """Each rank's actions as (own slot, slot waited for or -1, kind 0 F / 1 B / 2 I / 3 W, stage),
    slots indexing one flat table of completion times: F(s, m), then B or I(s, m), then W(s, m)."""
    stages, m_count = pp * virtual, microbatches
    code = {"F": 0, "B": 1, "I": 2, "W": 3}
    ranks = []
    for rank in actions(schedule, pp, microbatches, virtual):
        mine = []
        for kind, s, m in rank:
            k = code[kind]
            if k == 0:
                own, dep = s * m_count + m, (-1 if s == 0 else (s - 1) * m_count + m)
            elif k == 3:
                own, dep = (2 * stages + s) * m_count + m, (stages + s) * m_count + m
            else:
                own = (stages + s) * m_count + m
                dep = s * m_count + m if s == stages - 1 else (stages + s + 1) * m_count + m
            mine.append((own, dep, k, s))
        ranks.append(tuple(mine))
    return tuple(ranks), 3 * stages * m_count


def _simulate(schedule: str, pp: int, microbatches: int, virtual: int, f: list[float], b: list[float],
              send: list[float], action: float = 0.0) -> Simulated:
    """`f[s]`, `b[s]`: forward and whole-backward seconds of stage s for one micro-batch (I and W
    are half a backward each); `send[s]`: seconds to move one micro-batch's activation (or its
    gradient) across the boundary after stage s, paid where the two stages are on different ranks."""
    order, slots = _compiled(schedule, pp, microbatches, virtual)
    where = stage_rank(schedule, pp, virtual)
    last = pp * virtual - 1
    # per stage: the wait on its input (arrival after the neighbour's send) and each kind's duration,
    # which includes the rank's own send of what it made (it goes on once the bytes are out)
    cross_next = [s < last and where[s + 1] != where[s] for s in range(last + 1)]
    cross_prev = [s > 0 and where[s - 1] != where[s] for s in range(last + 1)]
    wait = [[(send[s - 1] if cross_prev[s] else 0.0), (send[s] if cross_next[s] else 0.0),
             (send[s] if cross_next[s] else 0.0), 0.0] for s in range(last + 1)]
    for s in range(last + 1):
        if s == last:
            wait[s][1] = wait[s][2] = 0.0  # the last stage's backward waits on its own forward
    out = [send[s] if cross_next[s] else 0.0 for s in range(last + 1)]
    back = [send[s - 1] if cross_prev[s] else 0.0 for s in range(last + 1)]
    duration = [[action + f[s] + out[s], action + b[s] + back[s], action + b[s] / 2 + back[s], action + b[s] / 2]
                for s in range(last + 1)]
    delta = (1.0, -1.0, -(1 - W_SHARE), -W_SHARE)
    done = [-1.0] * slots
    free, busy, held, peak, nxt = [0.0] * pp, [0.0] * pp, [0.0] * pp, [0.0] * pp, [0] * pp
    remaining = sum(len(o) for o in order)
    while remaining:
        progressed = False
        for r in range(pp):
            mine, i, t_free = order[r], nxt[r], free[r]
            while i < len(mine):
                own, dep, k, s = mine[i]
                if dep < 0:
                    t_ready = 0.0
                else:
                    t_dep = done[dep]
                    if t_dep < 0:  # not done yet (a B and an I fill the same slot)
                        break
                    t_ready = t_dep + wait[s][k]
                d = duration[s][k]
                t_free = done[own] = (t_ready if t_ready > t_free else t_free) + d
                busy[r] += d
                held[r] += delta[k]
                if held[r] > peak[r]:
                    peak[r] = held[r]
                i += 1
            if i != nxt[r]:
                remaining -= i - nxt[r]
                nxt[r], free[r] = i, t_free
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule}: the simulated order deadlocks (pp={pp}, m={microbatches}, v={virtual})")
    return Simulated(max(free), tuple(busy), tuple(peak))
