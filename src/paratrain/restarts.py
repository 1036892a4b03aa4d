"""Restarts by torch's elastic agent (`run.max_restarts`, torchrun's `--max-restarts`).

When a worker fails (a crash, a kill, a peer that timed out on a hung one), torch's agent stops
the whole group and starts it again with TORCHELASTIC_RESTART_COUNT one higher. A restarted worker
continues from the newest checkpoint of the same run directory that verifies, or from step 0 if
there is none, without `--resume` (launcher.train); training is deterministic from a checkpoint,
so the final parameters equal an uninterrupted run's. On several nodes the other nodes' agents
restart their workers for a membership change with the count unchanged, so a directory only this
job writes to is looked at on every start (launcher.train), not only where the count says so.

A deliberate end is not a failure to retry: a stop on SIGTERM or Ctrl-C at a step boundary
(exit 128 + N) and a non-finite step under `on_nonfinite = "stop"` (exit 3) record `ended.json`
in the run directory, and a restarted worker that finds it exits with the same code at once,
before importing torch, so that the agent's remaining restarts cost a second each, not a start-up.
A new start (`claim`) removes it. Written here: torch's agent restarts on any non-zero exit.

No torch import here: the CLI asks `previous_end` before anything heavy is loaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

ENDED = "ended.json"
# Set by `paratrain run` for its workers: the run directory, already owned and settled by the launcher.
OWNED_ENV = "PARATRAIN_RUN_OWNED"


def attempt() -> int:
    """0 for a worker started, 1, 2, ... for one restarted by torch's agent."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def job_dir(run_name: str) -> Path:
    """The run directory of a torchrun job without `run.dir`: the same on every rank, node and restart."""
    return Path("runs") / f"{run_name}-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}"


def record_end(run_dir: str | Path, exit_code: int, why: str) -> None:
    """This attempt ended on purpose with `exit_code`: a restart must not train on."""
    path = Path(run_dir) / ENDED
    tmp = path.with_name(f".{ENDED}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"exit_code": exit_code, "why": why}))
    os.replace(tmp, path)


class JobFinished(Exception):
    """A worker restarted into a running job (apart.py) found it finished meanwhile: nothing to
    do; it exits 0."""


def worker_run_dir(cfg_run_dir: str, run_name: str) -> Path:
    """The run directory a worker of this job writes to: the launcher's, the configured one, or the
    one derived from the torchrun job."""
    return Path(os.environ.get(OWNED_ENV) or cfg_run_dir or job_dir(run_name))


def previous_end(run_dir: str | Path) -> int | None:
    """The exit code a restarted worker takes over from a deliberate end (None: train on)."""
    if attempt() == 0 or not run_dir:
        return None
    try:
        return int(json.loads((Path(run_dir) / ENDED).read_text())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
