"""Pipeline timelines: when each rank ran each micro-batch's forward, backward and weight work.

The bubble is the share of the step a rank sits idle: 1 - busy / span, where span runs from
the first action on any rank to the last (perf_counter is CLOCK_MONOTONIC, shared by the
processes of one machine), averaged over ranks. Theory for p ranks, m micro-batches and v
stages per rank, with equal forward and backward times: ((p-1)/v) / (m + (p-1)/v), which is
(p-1)/(m+p-1) for GPipe and 1F1B (Narayanan et al., SC 2021).
"""
from __future__ import annotations

import json
from pathlib import Path

COLOURS = {"F": "#4C72B0", "B": "#55A868", "W": "#DD8452"}


def theory_bubble(p: int, m: int, v: int = 1) -> float:
    idle = (p - 1) / v
    return idle / (m + idle)


def measured_bubble(events_by_rank: list[list[tuple]]) -> float:
    """events: (kind, stage, micro-batch, start_s, end_s) per rank."""
    everything = [e for events in events_by_rank for e in events]
    if not everything:
        return 0.0
    span = max(e[4] for e in everything) - min(e[3] for e in everything)
    idle = [1 - sum(e[4] - e[3] for e in events) / span for events in events_by_rank]
    return sum(idle) / len(idle)


def plot_gantt(events_by_rank: list[list[tuple]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min(e[3] for events in events_by_rank for e in events)
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(events_by_rank) + 1.8))
    for rank, events in enumerate(events_by_rank):
        for kind, _stage, mb, start, end in events:
            ax.barh(rank, 1000 * (end - start), left=1000 * (start - t0), color=COLOURS[kind], edgecolor="white")
            ax.text(1000 * ((start + end) / 2 - t0), rank, f"{mb}", ha="center", va="center", fontsize=7,
                    color="white")
    ax.set_yticks(range(len(events_by_rank)), [f"rank {r}" for r in range(len(events_by_rank))])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began (numbers: micro-batch)")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in
                       (("forward", COLOURS["F"]), ("backward", COLOURS["B"]), ("weight grad", COLOURS["W"]))],
              loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_timeline(events_by_rank: list[list[tuple]], run_dir: Path, schedule: str, p: int, m: int, v: int) -> dict:
    """timeline.json (raw records + bubbles) and timeline.png in the run directory."""
    summary = {"schedule": schedule, "ranks": p, "microbatches": m, "virtual_stages": v,
               "bubble_measured": measured_bubble(events_by_rank), "bubble_theory": theory_bubble(p, m, v),
               "events": events_by_rank}
    run_dir = Path(run_dir)
    (run_dir / "timeline.json").write_text(json.dumps(summary))
    plot_gantt(events_by_rank, run_dir / "timeline.png",
               f"{schedule}: p={p}, m={m}, v={v}; bubble {summary['bubble_measured']:.0%} "
               f"(theory {summary['bubble_theory']:.0%})")
    return summary
