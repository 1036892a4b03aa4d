"""`paratrain report DIR...`: one self-contained HTML page of plots from run directories.

Each DIR is a comparison (`paratrain compare`'s directory, with compare.json) or a single run
directory. The page embeds every plot as a PNG data URI (it opens with no network and no files
beside it): eval loss against step and against wall time, throughput, bytes sent, the time of a
step split into compute, exposed communication, waiting, bubble and the update, memory per rank,
the planner's predicted step against the measured one, and where such runs are present the
pipeline timelines (Gantt), the parameter server's staleness histogram and the replicas' drift
(local SGD and DiLoCo from their average, gossip from the neighbours). matplotlib draws; jinja2
(already installed with torch) fills report.html.j2.
"""
from __future__ import annotations

import base64
import io
import json
import os
from datetime import datetime
from pathlib import Path

from paratrain.config import ConfigError
from paratrain.lab.runs import Run, read_run

PARTS = (("compute_s", "compute", "#4C72B0"), ("comm_s", "exposed comm", "#DD8452"), ("wait_s", "waiting", "#C44E52"),
         ("bubble_s", "bubble", "#8172B3"), ("optim_s", "update", "#55A868"), ("data_s", "data", "#937860"))


def collect(dirs: list[str]) -> tuple[list[Run], float | None]:
    """Every run under the given directories (a comparison's entries in its order), and the target."""
    runs, target = [], None
    for d in dirs:
        path = Path(d)
        if (path / "compare.json").is_file():
            table = json.loads((path / "compare.json").read_text())
            target = table.get("target", target)
            for row in table["entries"]:
                run = read_run(path / row["name"], row["name"]) if (path / row["name"]).is_dir() else Run(
                    row["name"], path / row["name"])
                run.error = row.get("error", "")
                runs.append(run)
        elif (path / "config.json").is_file():
            runs.append(read_run(path))
        else:
            raise ConfigError(f"report: {d}: neither a comparison (compare.json) nor a run directory (config.json)")
    if not runs:
        raise ConfigError("report: give one or more comparison or run directories")
    return runs, target


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(runs: list[Run]) -> list[dict]:
    """[{title, src, note}] in the page's order; a plot with nothing to show is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if not r.error and r.steps]
    out = []
    if not ok:
        return out
    names = [r.name for r in ok]

    for by, xlabel in (("step", "step"), ("time", "wall seconds since the first step")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in ok:
            curve = r.eval_curve()
            if curve:
                ax.plot([c[0] if by == "step" else c[1] for c in curve], [c[2] for c in curve], marker="o", ms=3,
                        label=r.name)
            elif by == "step":  # no evaluation: the training loss
                recs = r.records()
                ax.plot([x["step"] for x in recs], [x["loss"] for x in recs], alpha=0.6, label=f"{r.name} (train)")
        ax.set_xlabel(xlabel), ax.set_ylabel("eval loss"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
        out.append({"title": f"Eval loss against {'step' if by == 'step' else 'wall time'}", "src": _png(fig)})

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].barh(names, [r.summary.get("samples_per_s", 0) for r in ok], color="#4C72B0")
    axes[0].set_xlabel("samples / s (whole job)")
    sent = [max(r.summary.get("bytes_sent_per_step_per_rank") or [r.summary.get("bytes_sent_per_step", 0)]) / 2**20
            for r in ok]
    axes[1].barh(names, sent, color="#DD8452")
    axes[1].set_xlabel("MiB sent per step, busiest rank")
    for ax in axes:
        ax.invert_yaxis(), ax.grid(axis="x", alpha=0.3)
    out.append({"title": "Throughput and bytes sent", "src": _png(fig)})

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ok) + 1.6))
    left, splits = [0.0] * len(ok), [r.split() for r in ok]
    for key, label, colour in PARTS:
        vals = [(sp.get(key) or 0.0) * 1e3 for sp in splits]
        ax.barh(names, vals, left=left, color=colour, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis(), ax.set_xlabel("ms per step (the slowest rank)")
    ax.legend(fontsize=8, ncol=6, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    out.append({"title": "Where a step's time goes", "src": _png(fig),
                "note": "compute includes the communication it overlaps (DDP's buckets, FSDP's prefetches); exposed "
                        "comm: the rest of the step; bubble: a pipeline's idle time inside its schedule"})

    mem = [(r.name, r.summary.get("memory_bytes_per_rank") or []) for r in ok]
    if any(m for _, m in mem):
        fig, ax = plt.subplots(figsize=(8, 3.8))
        width = 0.8 / max(len(m) for _, m in mem)
        for i, (_, per) in enumerate(mem):
            for rank, nbytes in enumerate(per):
                ax.bar(i + rank * width, nbytes / 2**20, width, color=f"C{rank}",
                       label=f"rank {rank}" if i == 0 else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mem))], [n for n, _ in mem], rotation=20, ha="right")
        ax.set_ylabel("MiB (model states + saved activations)"), ax.legend(fontsize=8)
        out.append({"title": "Memory per rank", "src": _png(fig)})

    pred = [(r.name, r.summary.get("predicted_step_s"), r.summary.get("step_s_steady")) for r in ok]
    pred = [p for p in pred if p[1] and p[2]]
    if pred:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        top = max(max(p[1], p[2]) for p in pred) * 1.1e3
        ax.plot([0, top], [0, top], color="grey", lw=1, ls="--")
        ax.fill_between([0, top], [0, top * 0.8], [0, top * 1.2], color="grey", alpha=0.12, label="within 20%")
        for name, p, m in pred:
            ax.scatter(m * 1e3, p * 1e3)
            ax.annotate(name, (m * 1e3, p * 1e3), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("measured ms per step"), ax.set_ylabel("planner's ms per step"), ax.legend(fontsize=8)
        out.append({"title": "The planner's prediction against the measured step", "src": _png(fig)})

    for r in ok:  # the Gantt chart the pipeline strategy drew of its last step (report/timeline.py)
        if r.timeline and (r.path / "timeline.png").is_file():
            out.append({"title": f"Pipeline timeline: {r.name}", "src": "data:image/png;base64," +
                        base64.b64encode((r.path / "timeline.png").read_bytes()).decode(),
                        "note": f"bubble measured {r.timeline.get('bubble_measured', 0):.1%}, "
                                f"theory {r.timeline.get('bubble_theory', 0):.1%}"})

    stale = [(r.name, [x["staleness"] for recs in r.steps.values() for x in recs if "staleness" in x]) for r in ok]
    stale = [s for s in stale if s[1]]
    if stale:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        top = max(max(v) for _, v in stale)
        ax.hist([v for _, v in stale], bins=range(0, int(top) + 2), label=[n for n, _ in stale], align="left")
        ax.set_xlabel("staleness (updates applied since the worker pulled)"), ax.set_ylabel("worker steps")
        ax.legend(fontsize=8)
        out.append({"title": "Parameter server: staleness", "src": _png(fig)})

    # Replica drift: local SGD and DiLoCo record at each synchronisation how far this replica had
    # moved from the average (RMS per parameter); gossip records each step its L2 distance to the
    # neighbours' parameters. Two quantities, so two panels.
    kinds = (("replica_rms_dist", "local SGD / DiLoCo: RMS distance from the average at each sync"),
             ("neighbour_distance", "gossip: L2 distance to the neighbours' parameters"))
    drift = {key: [(r.name, [(x["step"], x[key]) for x in r.records() if key in x]) for r in ok] for key, _ in kinds}
    drift = {key: [d for d in curves if d[1]] for key, curves in drift.items()}
    shown = [(key, label) for key, label in kinds if drift[key]]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 3.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], shown):
            for name, pts in drift[key]:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3,
                        label=name)
            ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel(label.split(": ")[1]), ax.legend(fontsize=8)
            ax.set_title(label.split(": ")[0], fontsize=9)
        out.append({"title": "Replica drift", "src": _png(fig)})
    return out


def render(runs: list[Run], target: float | None, title: str) -> str:
    import jinja2

    from paratrain.lab.compare import rows

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True)
    return env.get_template("report.html.j2").render(
        title=title, made=datetime.now().strftime("%Y-%m-%d %H:%M"), rows=rows(runs, target), target=target,
        plots=plots(runs))


def write_report(runs: list[Run], target: float | None, out: Path, title: str) -> Path:
    html = render(runs, target, title)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(html)
    tmp.replace(out)  # a page half-written is never the one a reader opens
    return out


def report_command(args) -> int:
    runs, target = collect(args.dirs)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report.html"
    write_report(runs, target, out, f"paratrain report: {', '.join(args.dirs)}")
    print(f"report: {out} ({len(runs)} run(s))")
    return 0
