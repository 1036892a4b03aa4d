"""A finished (or failed) run directory read back: its config, summary, per-rank step and eval
records, pipeline timeline and planner prediction, as the comparison table and the report use them.

Nothing here trains or imports torch: a report is made from what runs wrote (metrics.py,
report/timeline.py, planner/commands.py), on any machine.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

SPLIT = ("compute_s", "comm_s", "wait_s", "optim_s", "data_s")  # a step's time, as metrics.py records it


@dataclass
class Run:
    name: str
    path: Path
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)  # rank -> [step record, ...]
    evals: list = field(default_factory=list)  # rank 0's (or the first rank's) eval records
    timeline: dict | None = None  # pipelines: events per rank, measured bubble
    error: str = ""  # a failed entry: its one-line error

    @property
    def strategy(self) -> str:
        return self.config.get("strategy", {}).get("name", "-")

    def records(self, rank: int | None = None) -> list[dict]:
        """One rank's step records (the first that has any, by default)."""
        if rank is None:
            rank = next((r for r in sorted(self.steps) if self.steps[r]), 0)
        return self.steps.get(rank, [])

    def split(self) -> dict:
        """Mean seconds per step past the first, on the rank that spent the most time per step (the
        slowest sets the pace), in parts that add up to the step: compute (forward and backward,
        with the communication they overlap: DDP's buckets, FSDP's prefetches), the update, data,
        waiting for other ranks, or for a pipeline its bubble (its ranks' idle time inside the
        schedule, which its strategy records as waiting), and the rest: the communication nothing
        hid. (`comm_s` as recorded is the time inside collectives, overlapped or not.)"""
        best: dict = {}
        for recs in self.steps.values():
            recs = [r for r in recs if not r.get("skipped")][1:] or recs
            if not recs:
                continue
            mean = {k: statistics.fmean(r.get(k, 0.0) for r in recs) for k in (*SPLIT, "step_s")}
            if mean["step_s"] > best.get("step_s", -1.0):
                best = mean
        if not best:
            return best
        if self.timeline:
            best["bubble_s"], best["wait_s"] = best["wait_s"], 0.0
        parts = sum(best.get(k, 0.0) for k in ("compute_s", "optim_s", "data_s", "wait_s", "bubble_s"))
        best["comm_s"] = max(0.0, best["step_s"] - parts)
        return best

    def eval_curve(self) -> list[tuple[int, float, float]]:
        """(step, seconds since the first step started, eval loss) per evaluation."""
        recs = self.records()
        if not recs:
            return []
        start = recs[0]["time"] - recs[0].get("step_s", 0.0)
        at = {r["step"]: r["time"] for r in recs}
        return [(e["step"], at.get(e["step"], start) - start, e["eval_loss"]) for e in self.evals]

    def time_to(self, target: float) -> float | None:
        """Wall seconds from the first step to the first evaluation at or below `target`."""
        return next((t for _, t, loss in self.eval_curve() if loss <= target), None)

    @property
    def best_eval(self) -> float | None:
        return min((e["eval_loss"] for e in self.evals), default=None)


def read_run(path: Path, name: str | None = None) -> Run:
    path = Path(path)
    run = Run(name or path.name, path)
    run.config = _json(path / "config.json") or {}
    run.summary = _json(path / "summary.json") or {}
    for f in sorted((path / "metrics").glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        run.steps[rank] = [r for r in recs if r.get("kind") == "step"]
        if not run.evals:
            run.evals = [r for r in recs if r.get("kind") == "eval"]
    run.timeline = _json(path / "timeline.json")
    return run


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
