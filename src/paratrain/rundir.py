"""Run directories: one owner each, nothing overwritten, and which checkpoint a run continues.

A run directory is created atomically (`mkdir`, so two starts never pick the same one) and held
for the whole run by an advisory lock (`filelock`: flock underneath, released by the kernel when
its holder dies, so a crashed run never blocks its directory). `owner.json` beside the lock names
the holder for the refusal message and says how the run ended.

The rules that keep work (decided by `settle` before any worker starts, applied by `claim` once
the directory is owned):
- `--resume DIR` continues from DIR's newest checkpoint that verifies (newer files that do not are
  renamed `*.corrupt`); a DIR with none yet starts from step 0 there (a restart before the first
  checkpoint).
- `--resume FILE` of an older checkpoint than its run's newest forks into a new run directory
  (with the run's metrics up to that step), unless `--discard-newer` says to delete the newer
  ones, which are then named. An explicit `run.dir` is honoured: the run continues there.
- A directory that holds a run is refused without `--resume`, unless it holds nothing but a start
  that ended before its first checkpoint: that start's files move to `attempts/NNN/`.
- `config.json` is written once; a resumed run with other settings records `config-2.json`, ...

Written here: no library knows what a training run's directory holds.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from paratrain.checkpoint import list_checkpoints, newest_verified, read_checkpoint, step_of
from paratrain.config import Config, ConfigError
from paratrain.restarts import ENDED

LOCK, OWNER = ".lock", "owner.json"
_BOOKKEEPING = {LOCK, OWNER, ENDED, "attempts"}


@dataclass
class Plan:
    """What a start will do with its run directory, decided before anything is written."""
    run_dir: Path
    numbered: Callable[[], Path] | None = None  # a fresh runs/<name>-NNN: the next free number at claim
    ckpt_path: Path | None = None
    ckpt: dict | None = None
    discard: list[Path] = field(default_factory=list)  # newer checkpoints the user said to delete
    set_aside: list[Path] = field(default_factory=list)  # newer ones that failed to verify: renamed *.corrupt
    fork_of: Path | None = None  # the run whose metrics up to the checkpoint's step are carried over
    notes: list[str] = field(default_factory=list)

    @property
    def in_place(self) -> bool:
        """Continuing a run in its own directory (else the directory must be free for a new run)."""
        return self.ckpt is not None and self.run_dir == _source_dir(self.ckpt_path)

    @property
    def start_step(self) -> int:
        return int(self.ckpt["step"]) if self.ckpt is not None else 0


def next_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """The first free runs/<name>-NNN (not created: `claim` creates it atomically)."""
    i = 1
    while (root / f"{name}-{i:03d}").exists():
        i += 1
    return root / f"{name}-{i:03d}"


def read_owner(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / OWNER).read_text())
    except (OSError, ValueError):
        return {}


def _holds_anything(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in _BOOKKEEPING for p in run_dir.iterdir())


def _check_writable(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir = '{run_dir}': is a file, not a directory")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"run.dir = '{run_dir}': '{parent}' is a file, not a directory")
    try:  # a probe, not os.access: root passes access() on read-only and virtual file systems
        os.rmdir(tempfile.mkdtemp(prefix=".paratrain-probe-", dir=parent))
    except OSError as e:
        raise ConfigError(f"run.dir = '{run_dir}': cannot write in '{parent}' ({e.strerror})") from None


def _in_use(run_dir: Path) -> ConfigError:
    o = read_owner(run_dir)
    who = f"pid {o.get('pid', '?')} on host {o.get('host', '?')}, started {o.get('started', '?')}"
    return ConfigError(f"run.dir = '{run_dir}': in use by a live run ({who}); wait for it to end or choose "
                       "another run.dir")


def _refusal(run_dir: Path) -> ConfigError | None:
    """Why a fresh start may not use `run_dir` (None: it may). Read-only."""
    if not _holds_anything(run_dir):
        return None
    found = list_checkpoints(run_dir)
    if found:
        return ConfigError(f"run.dir = '{run_dir}': already holds a run (checkpoints up to step "
                           f"{step_of(found[-1])}); pass --resume {run_dir} to continue it or choose another run.dir")
    status = read_owner(run_dir).get("status")
    if status in ("failed", "interrupted", "running"):  # "running" with a free lock: its owner died
        return None
    what = "a finished run without checkpoints" if status == "finished" else "a run"
    return ConfigError(f"run.dir = '{run_dir}': already holds {what}; choose another run.dir")


def settle(cfg: Config, resume: str | Path | None, *, discard_newer: bool = False,
           numbered: Callable[[], Path] | None = None) -> tuple[Config, Plan]:
    """Decide the run directory and the checkpoint to continue from. Writes nothing.

    `numbered`: where a start without run.dir goes (default runs/<run.name>-NNN, the next free)."""
    explicit = Path(cfg.run.dir) if cfg.run.dir else None
    numbered = numbered or (lambda: next_run_dir(cfg.run.name))
    plan = Plan(run_dir=explicit or numbered(), numbered=None if explicit else numbered)
    target = Path(resume) if resume is not None else None
    from_dir = False
    if target is not None and target.is_dir():
        found = newest_verified(target)
        if found is None:  # nothing to continue yet: start there from step 0
            plan.run_dir, plan.numbered = explicit or target, None
            plan.notes.append(f"{target} holds no checkpoint yet: starting from step 0")
        else:  # continued in place; newer files that failed to verify are set aside, not deleted
            plan.ckpt_path, plan.ckpt, plan.set_aside = found
            from_dir = True
    elif target is not None:
        plan.ckpt_path, plan.ckpt = target, read_checkpoint(target)
    if plan.ckpt is not None:
        _settle_resume(cfg, plan, explicit, discard_newer, from_dir)
    _check_writable(plan.run_dir)
    if not plan.numbered and (plan.run_dir / LOCK).exists():  # a live owner first: that is the reason to say
        probe = FileLock(plan.run_dir / LOCK)
        try:
            probe.acquire(timeout=0)
            probe.release()
        except Timeout:
            raise _in_use(plan.run_dir) from None
    if not plan.in_place and not plan.numbered and (err := _refusal(plan.run_dir)):
        raise err
    return cfg.replace(f"run.dir={json.dumps(str(plan.run_dir))}"), plan


def _source_dir(ckpt_path: Path | None) -> Path | None:
    """The run directory a checkpoint file belongs to (None: a loose file)."""
    if ckpt_path is None or ckpt_path.parent.name != "checkpoints":
        return None
    return ckpt_path.parent.parent


def _settle_resume(cfg: Config, plan: Plan, explicit: Path | None, discard_newer: bool, from_dir: bool) -> None:
    """`from_dir`: the newest checkpoint of a directory that verifies (newer ones did not)."""
    step, src = plan.start_step, _source_dir(plan.ckpt_path)
    if cfg.training.steps <= step:
        raise ConfigError(f"training.steps = {cfg.training.steps}: the checkpoint '{plan.ckpt_path}' is at step "
                          f"{step} already; set training.steps above {step} to train further")
    newer = [p for p in list_checkpoints(src) if step_of(p) > step] if src is not None and not from_dir else []
    where = f"step {step} of {src or plan.ckpt_path}"
    if explicit is not None and explicit != src:  # continue where the user said
        plan.run_dir, plan.numbered, plan.fork_of = explicit, None, src
        plan.notes.append(f"resumed from {where}, into {explicit}")
    elif src is None:  # a loose checkpoint file: a new run directory
        plan.notes.append(f"resumed from {where}, into {plan.run_dir}")
    elif newer and not discard_newer:
        plan.fork_of = src
        plan.notes.append(f"resumed from {where}; {src} has newer checkpoints (up to step "
                          f"{step_of(newer[-1])}), kept: this run forks into {{run_dir}} "
                          "(--discard-newer to continue in place instead)")
    else:
        plan.run_dir, plan.numbered = src, None
        plan.discard = newer
        plan.notes.append(f"resumed from {where}" + (
            f"; deleting its newer checkpoints: {', '.join(p.name for p in newer)}" if newer else ""))


class RunLock:
    """Ownership of one run directory for the life of a run (see the module docstring)."""

    def __init__(self, run_dir: Path, lock: FileLock):
        self.run_dir, self.lock = run_dir, lock

    def finish(self, status: str) -> None:
        """Record how the run ended ("finished", "failed", "interrupted") and let the directory go."""
        owner = read_owner(self.run_dir)
        write_json(self.run_dir / OWNER, {**owner, "status": status, "ended": _now()})
        self.lock.release()


def claim(cfg: Config, plan: Plan) -> tuple[Config, RunLock]:
    """Create (atomically) and lock the planned run directory, apply the plan, record the config."""
    run_dir = plan.run_dir
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=plan.numbered is None)
            break
        except FileExistsError:  # another start took this number in the meantime: the next one
            run_dir = plan.numbered()
    created = not _holds_anything(run_dir)
    lock = FileLock(run_dir / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _in_use(run_dir) from None
    try:
        if not plan.in_place:
            if err := _refusal(run_dir):  # checked again now that the directory is ours
                raise err
            _move_aside(run_dir)
        (run_dir / ENDED).unlink(missing_ok=True)  # a new start: how an earlier one ended no longer binds
        for path in plan.discard:
            path.unlink(missing_ok=True)
        for path in plan.set_aside:  # out of the rotation's count, kept for a look
            path.rename(path.with_name(path.name + ".corrupt"))
        if plan.fork_of is not None and plan.fork_of != run_dir:
            _carry_metrics(plan.fork_of, run_dir, plan.start_step)
        write_json(run_dir / OWNER, {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                                      "status": "running", "command": " ".join(sys.argv),
                                      "resumed_from": str(plan.ckpt_path) if plan.ckpt_path else None})
    except BaseException:
        lock.release()
        if created and not _holds_anything(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # a refused start leaves nothing behind
        raise
    cfg = cfg.replace(f"run.dir={json.dumps(str(run_dir))}")
    plan.run_dir = run_dir
    return cfg, RunLock(run_dir, lock)


def notes(plan: Plan) -> list[str]:
    return [n.replace("{run_dir}", str(plan.run_dir)) for n in plan.notes]


def record_config(run_dir: Path, cfg: Config) -> Path:
    """config.json, written once; a run with other settings adds config-2.json, config-3.json, ..."""
    run_dir = Path(run_dir)
    existing = sorted(run_dir.glob("config*.json"), key=_config_number)
    now = cfg.to_dict()
    if existing:
        latest = existing[-1]
        try:
            if json.loads(latest.read_text()) == json.loads(json.dumps(now)):
                return latest
        except ValueError:
            pass
    path = run_dir / ("config.json" if not existing else f"config-{_config_number(existing[-1]) + 1}.json")
    write_json(path, now)
    return path


def _config_number(path: Path) -> int:
    stem = path.stem
    return 1 if stem == "config" else int(stem.split("-")[1]) if stem.split("-")[-1].isdigit() else 0


def _move_aside(run_dir: Path) -> None:
    """A start that ended before its first checkpoint: keep its files under attempts/NNN/."""
    leftovers = [p for p in run_dir.iterdir() if p.name not in _BOOKKEEPING]
    if not leftovers:
        return
    attempts = run_dir / "attempts"
    i = 1
    while (attempts / f"{i:03d}").exists():
        i += 1
    dest = attempts / f"{i:03d}"
    dest.mkdir(parents=True)
    for p in leftovers + ([run_dir / OWNER] if (run_dir / OWNER).exists() else []):
        p.rename(dest / p.name)
    print(f"paratrain: {run_dir} held a start that ended before its first checkpoint; its files are kept in "
          f"{dest}", file=sys.stderr)


def _carry_metrics(src: Path, dst: Path, step: int) -> None:
    """A fork's history: the source run's step and eval records up to the checkpoint's step."""
    from paratrain.metrics import records_through

    for path in sorted((src / "metrics").glob("rank*.jsonl")):
        (dst / "metrics").mkdir(exist_ok=True)
        (dst / "metrics" / path.name).write_text(records_through(path, step))


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
