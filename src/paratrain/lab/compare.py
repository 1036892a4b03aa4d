"""`paratrain compare`: strategies side by side on the same model, data and seed.

A comparison is a list of entries, each a config (a base config plus its own overrides) run with
`paratrain run` into its own directory under one comparison directory, one entry at a time (on a
CPU, two runs at once would halve each other's cores and the comparison would measure that), with
one progress bar over the whole matrix. An entry that fails is reported in its row with its own
one-line error, and the others still run. Ctrl-C stops the running entry at a step boundary (with
its checkpoint), skips the rest, and still writes the table and the report (exit 130). The table,
`compare.json` and `report.html` (report.py) come from what the runs wrote (runs.py).

The matrix file (TOML):

    base = "demo.toml"           # a config file, relative to this one (or omit: built-in defaults)
    nproc = 2                    # processes per entry (an entry may say its own)
    set = ["training.steps=60"]  # overrides for every entry
    target = 3.0                 # eval loss for the "time to target" column (optional)

    [[entry]]
    name = "ddp"
    set = ["strategy.name=ddp"]

Or `paratrain compare A.toml B.toml ...`: each config an entry named after its file.
Written by hand: a matrix of runs is a loop over `paratrain run`; nothing in torch does it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from paratrain.config import ConfigError, load_config
from paratrain.lab.runs import Run, read_run

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Entry:
    name: str
    config: str | None  # the config file, or None: built-in defaults
    sets: list = field(default_factory=list)
    nproc: int = 2


@dataclass
class Matrix:
    entries: list
    target: float | None = None


def read_matrix(paths: list[str], sets: list[str], nproc: int | None) -> Matrix:
    """The entries from one matrix file (it has [[entry]] tables) or several config files; bad
    input raises ConfigError (one line, exit 2, before anything runs)."""
    if not paths:
        raise ConfigError("compare: give a matrix file (with [[entry]] tables) or two or more config files")
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"compare: {p}: no such file")
    raw = _toml(paths[0])
    if "entry" in raw:
        if len(paths) > 1:
            raise ConfigError("compare: a matrix file is compared alone; its entries name their overrides")
        matrix = _from_matrix(Path(paths[0]), raw, sets, nproc)
    else:
        entries = [Entry(Path(p).stem, p, list(sets), nproc or 2) for p in paths]
        matrix = Matrix(entries)
    names = [e.name for e in matrix.entries]
    if len(names) != len(set(names)):
        raise ConfigError(f"compare: entry names must differ: {', '.join(names)}")
    return matrix


def _from_matrix(path: Path, raw: dict, sets: list[str], nproc: int | None) -> Matrix:
    allowed = {"base", "nproc", "set", "target", "entry"}
    if unknown := set(raw) - allowed:
        raise ConfigError(f"compare: {path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                          f"{', '.join(sorted(allowed))}")
    base = str((path.parent / raw["base"]).resolve()) if raw.get("base") else None
    if base and not Path(base).is_file():
        raise ConfigError(f"compare: {path}: base = {raw['base']!r}: no such file")
    common = [*_strings(raw.get("set", []), path, "set"), *sets]
    entries = []
    if not isinstance(raw["entry"], list) or not raw["entry"]:
        raise ConfigError(f"compare: {path}: [[entry]] tables expected, one per strategy")
    for i, e in enumerate(raw["entry"], 1):
        if unknown := set(e) - {"name", "set", "nproc"}:
            raise ConfigError(f"compare: {path}: entry {i}: unknown key(s) {', '.join(sorted(unknown))}; "
                              "allowed: name, set, nproc")
        name = e.get("name", "")
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"compare: {path}: entry {i}: name = {name!r}: letters, digits and _.+- "
                              "(it names the entry's run directory)")
        n = nproc or e.get("nproc") or raw.get("nproc", 2)
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"compare: {path}: entry {name!r}: nproc = {n!r}: an integer >= 1")
        entries.append(Entry(name, base, [*common, *_strings(e.get("set", []), path, f"entry {name!r} set")], n))
    target = raw.get("target")
    if target is not None and not isinstance(target, (int, float)):
        raise ConfigError(f"compare: {path}: target = {target!r}: an eval loss (a number)")
    return Matrix(entries, target)


def _strings(value, path: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"compare: {path}: {key} must be a list of \"section.key=value\" strings")
    return value


def _toml(path: str) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"compare: {path}: {e}") from None


def settle_out(out: str | None) -> Path:
    """The comparison directory: new, or empty; never one with runs in it (nothing is overwritten)."""
    path = Path(out) if out else Path("runs") / datetime.now().strftime("compare-%Y%m%d-%H%M%S")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"compare: --out {path}: exists and is not empty; name a new directory "
                          "(nothing already written is overwritten)")
    return path


def compare(matrix: Matrix, out: Path, progress: bool = True) -> list[Run]:
    """Run every entry, one at a time, into out/<name>; return each run read back (a failed one
    with its error)."""
    out.mkdir(parents=True, exist_ok=True)
    plans = []
    for e in matrix.entries:  # every entry's config checked before the first one starts
        run_dir = out / e.name
        sets = [*e.sets, f"run.dir={json.dumps(str(run_dir.resolve()))}", "run.progress=off"]
        try:
            steps = load_config(e.config, sets).training.steps
            plans.append((e, sets, steps, None))
        except ConfigError as err:
            plans.append((e, sets, 0, str(err)))
    runs, stop = [], ""
    with _Progress(sum(p[2] for p in plans), progress) as bar:
        for e, sets, steps, error in plans:
            bar.entry(e.name)
            if stop:
                error = f"not run: {stop}"
            elif error is None:
                try:
                    error = _run(e, sets, out / e.name, bar)
                except Interrupted as why:
                    stop = error = str(why)
            run = read_run(out / e.name, e.name) if (out / e.name).is_dir() else Run(e.name, out / e.name)
            run.error = error or ""
            bar.done(steps)
            runs.append(run)
    return runs


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) during an entry: it stopped at a step boundary; the rest do not run."""


def _run(e: Entry, sets: list[str], run_dir: Path, bar) -> str | None:
    """`paratrain run` for one entry; its one-line error (None: it finished)."""
    cmd = [sys.executable, "-m", "paratrain", "run", *([e.config] if e.config else []), "--nproc", str(e.nproc),
           *[a for s in sets for a in ("--set", s)]]
    log = run_dir.parent / f".{e.name}.stderr"
    metrics = run_dir / "metrics" / "rank0.jsonl"
    stopped = 0
    with open(log, "w") as err, _signals_raise():
        # Its own session: a Ctrl-C at the terminal reaches this process alone, which passes on one
        # SIGINT (the run stops at its next step boundary with a checkpoint); a second passes on
        # a second (the run stops at once).
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=os.environ.copy(),
                                start_new_session=True)
        while proc.poll() is None:
            try:
                time.sleep(0.5)
                bar.at(_lines(metrics))
            except KeyboardInterrupt:
                stopped += 1
                proc.send_signal(signal.SIGINT)
    text = log.read_text().strip()
    log.unlink()
    if stopped:
        raise Interrupted(f"interrupted after {_lines(metrics)} step(s)")
    if proc.returncode == 0:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    said = [line for line in lines if "error" in line.lower()] or lines
    return (said[-1].removeprefix("paratrain: error: ") if said else f"exit code {proc.returncode}").strip()


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM handled as Ctrl-C is (KeyboardInterrupt), so that a scheduler's stop is passed on too;
    and SIGINT itself, as `paratrain run` handles it (signals.py), even where this process started
    with it ignored (a shell's background job: Python then installs no KeyboardInterrupt of its own,
    and a Ctrl-C sent to the comparison would never reach its run)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(b'"kind": "step"' in line for line in f)
    except OSError:
        return 0


class _Progress:
    """One bar over every entry's steps (rich at a terminal; one line per entry otherwise)."""

    def __init__(self, total: int, show: bool):
        self.total, self.show, self.base, self.name = total, show, 0, ""
        self.rich = show and sys.stderr.isatty()

    def __enter__(self):
        if self.rich:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                "{task.total} steps"), TimeElapsedColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("compare", total=self.total)
        return self

    def entry(self, name: str) -> None:
        self.name = name
        if self.rich:
            self.bar.update(self.task, description=f"compare: {name}")
        elif self.show:
            print(f"paratrain compare: {name} ...", file=sys.stderr, flush=True)

    def at(self, steps: int) -> None:
        if self.rich:
            self.bar.update(self.task, completed=self.base + steps)

    def done(self, steps: int) -> None:
        self.base += steps
        if self.rich:
            self.bar.update(self.task, completed=self.base)

    def __exit__(self, *exc):
        if self.rich:
            self.bar.stop()


def rows(runs: list[Run], target: float | None = None) -> list[dict]:
    """One row per entry, what the table and compare.json show."""
    out = []
    for r in runs:
        s, split = r.summary, r.split()
        row = {"name": r.name, "strategy": r.strategy, "error": r.error, "run_dir": str(r.path),
               "final_eval_loss": s.get("eval_loss"), "best_eval_loss": r.best_eval,
               "time_to_target_s": r.time_to(target) if target is not None else None,
               "samples_per_s": s.get("samples_per_s"), "step_s": s.get("step_s_steady"),
               "split": {k: split.get(k) for k in ("compute_s", "comm_s", "wait_s", "bubble_s", "optim_s", "data_s",
                                                   "step_s")},
               "bytes_per_step_per_rank": max(s.get("bytes_sent_per_step_per_rank") or [0]) or s.get(
                   "bytes_sent_per_step"),
               "peak_memory_bytes": max(s.get("memory_bytes_per_rank") or [0]) or None,
               "predicted_step_s": s.get("predicted_step_s"), "step_error": s.get("step_error")}
        out.append(row)
    return out


def print_table(table: list[dict], target: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="paratrain compare", title_justify="left")
    heads = ["entry", "strategy", "final eval", "best eval", f"time to {target:g}" if target is not None else None,
             "samples/s", "step", "compute", "comm", "wait", "bubble", "sent/step/rank", "peak mem/rank",
             "planner (error)"]
    for h in (h for h in heads if h):
        t.add_column(h, justify="left" if h in ("entry", "strategy") else "right")
    for r in table:
        if r["error"]:
            t.add_row(r["name"], r["strategy"], "[red]failed[/red]")
            continue
        sp = r["split"]
        cells = [r["name"], r["strategy"], _f(r["final_eval_loss"], "{:.4f}"), _f(r["best_eval_loss"], "{:.4f}"),
                 *([_f(r["time_to_target_s"], "{:.1f} s")] if target is not None else []),
                 _f(r["samples_per_s"], "{:.1f}"), _ms(r["step_s"]), _ms(sp["compute_s"]), _ms(sp["comm_s"]),
                 _ms(sp["wait_s"]), _ms(sp["bubble_s"]), _bytes(r["bytes_per_step_per_rank"]),
                 _bytes(r["peak_memory_bytes"]),
                 f"{_ms(r['predicted_step_s'])} ({r['step_error']:+.0%})" if r["predicted_step_s"] else "-"]
        t.add_row(*cells)
    console = Console(width=200)
    console.print(t)
    for r in table:
        if r["error"]:
            console.print(f"[red]{r['name']} failed:[/red] {r['error']}", highlight=False)


def _f(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def _ms(x) -> str:
    return "-" if not x else f"{x * 1e3:.1f} ms"


def _bytes(n) -> str:
    if not n:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def compare_command(args) -> int:
    matrix = read_matrix(args.configs, args.set, args.nproc)
    if args.target is not None:
        matrix.target = args.target
    out = settle_out(args.out)
    runs = compare(matrix, out, progress=not args.json)
    table = rows(runs, matrix.target)
    from paratrain.rundir import write_json

    write_json(out / "compare.json", {"target": matrix.target, "entries": table})
    from paratrain.lab.report import write_report

    page = write_report(runs, matrix.target, out / "report.html", f"paratrain compare: {out}")
    if args.json:
        print(json.dumps({"target": matrix.target, "entries": table, "report": str(page)}, indent=1))
    else:
        print_table(table, matrix.target)
        print(f"comparison: {out}; report: {page}")
    if any(r["error"].startswith("interrupted") for r in table):
        return 128 + signal.SIGINT
    return 0 if not any(r["error"] for r in table) else 1
