"""Time-bounded rounds for local SGD and DiLoCo: a straggler drops inner steps to keep pace.

DropCompute (Giladi et al., "DropCompute: simple and more robust distributed synchronous
training via compute variance reduction", 2023) bounds each worker's compute between two
synchronisations by a time threshold: what a worker has not done by then is dropped, not
waited for. Backup workers (Chen et al., "Revisiting Distributed Synchronous SGD", 2016) drop
the slowest workers' whole contribution instead. Here the unit dropped is one inner step of a
round of H local steps (`strategy.local_sgd.deadline = "auto"`):

    budget of a round = its steps x (fastest rank's median step time last round) x (1 + slack)
    before each inner step: drop it if  elapsed + own median step time > budget
                            (own: this round's steps so far, else the last round it measured)

The fastest rank's median reaches every rank through the small all-gather made at each
synchronisation anyway, so all ranks hold the same budget; the first round has none. A step's
time is measured from the start of one step to the start of the next (what a straggler's
slowness adds, an injected delay included), over steps it computed; the synchronisation step
is not measured (its time includes waiting for the others), and evaluation and checkpoint
gathers (collectives: time everyone spends alike, and where fast ranks wait for slow ones) are
paused out of the clock. A rank that dropped a whole round computes the first step of the
next anyway, to measure itself again: a straggler that recovers comes back.

This class is the bookkeeping alone (no communication), one per rank.
"""
from __future__ import annotations

import math
import statistics


class RoundDeadline:
    def __init__(self, slack: float):
        self.slack = slack
        self.budget_s: float | None = None  # of the current round; None: no bound (the first round)
        self.own_step_s: float | None = None  # this rank's median step time, from the last round it measured
        self.probe = False  # dropped every step of the last round: compute this round's first step
        self._new_round()

    def _new_round(self) -> None:
        self.start: float | None = None  # the round's clock starts at its first step
        self.paused_s = 0.0
        self.step_times: list[float] = []
        self.computed = self.skipped = 0
        self._prev_start: float | None = None  # start of the previous step, if it was computed
        self._prev_paused = 0.0

    def pause(self, seconds: float) -> None:
        """Time outside the round's own work (evaluation, checkpoint gathers): not counted."""
        if self.start is not None:  # before the round's first step the clock is not running anyway
            self.paused_s += seconds

    def skip(self, now: float) -> bool:
        """At the start of an inner step: True if this rank should drop the step."""
        if self.start is None:
            self.start = now
        if self._prev_start is not None:  # the previous step took from its start to now
            self.step_times.append(now - self._prev_start - (self.paused_s - self._prev_paused))
        elapsed, own_s = now - self.start - self.paused_s, self.own_median_s()
        first = self.computed + self.skipped == 0
        # Never measured (own_s inf): no ground to drop anything.
        drop = (self.budget_s is not None and math.isfinite(own_s) and not (self.probe and first)
                and elapsed + own_s > self.budget_s)
        if drop:
            self.skipped += 1
            self._prev_start = None
        else:
            self.computed += 1
            self._prev_start, self._prev_paused = now, self.paused_s
        return drop

    def own_median_s(self) -> float:
        """This rank's median step time: this round's so far if it measured any, else the last
        round's that did (inf: never measured)."""
        if self.step_times:
            self.own_step_s = statistics.median(self.step_times)
        return self.own_step_s if self.own_step_s is not None else math.inf

    def next_round(self, fastest_step_s: float, steps: int) -> None:
        """After a synchronisation: the agreed budget of the next round of `steps` steps."""
        self.own_median_s()  # keep this round's measurement before the round's times are cleared
        self.probe = self.computed == 0
        self.budget_s = steps * fastest_step_s * (1 + self.slack) if math.isfinite(fastest_step_s) else None
        self._new_round()
