"""Heartbeats, and who a failed collective was waiting for: rank, pid, host, step, activity.

Each training rank runs a `Heartbeat` thread that rewrites `heartbeats/rank<R>.json` in the run
directory once a second: pid, host, the step and what the loop is doing there ("train_step",
"evaluate", "checkpoint"), and since when. A rank that is stopped (SIGSTOP, a hung driver, a
frozen host) or dead stops writing; one stuck in its own code keeps writing with an old `since`.

When a rank's collective fails (a peer's socket closed, gloo's `run.timeout_s` ran out), `report`
reads the other ranks' heartbeats and prints one line per rank that went silent or died:
"rank 1 (pid 4242 on host h1) stopped at step 37 in train_step; last heartbeat 21 s ago (process
stopped)". Where ranks step together (`Strategy.lockstep`) a stopped rank on this host is then
sent SIGKILL: torch's agent would otherwise wait its whole shutdown grace for a process that
cannot run its SIGTERM handler, before it restarts the group (restarts.py) or ends the job. The
launcher reads the same files to say at which step a failed worker was (launcher.py).

Files, not the rendezvous or process-group store: that store lives in one rank's process, which
may be the hung one, and the files outlast the workers for the launcher's message. Written here:
gloo says only "Timed out waiting 20000ms" and names no peer, and torch's Flight Recorder traces
collectives, not training steps.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

INTERVAL_S = 1.0  # a heartbeat at least this often
POLL_S = 0.1  # and at most this late after the step or activity changed, off the training thread
SILENT_S = 5.0  # no heartbeat for this long: the rank is stopped or gone (5 missed beats)
SETTLE_S = 2.0  # after a failed collective, how long `report` waits for a lost peer to look lost


class PeerLost(RuntimeError):
    """A collective failed because a peer died or hung; `report` has said which (one line each)."""


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "heartbeats" / f"rank{rank}.json"


class Heartbeat:
    """This rank's heartbeat file, rewritten every INTERVAL_S by a daemon thread."""

    def __init__(self, run_dir: Path, rank: int):
        self.path, self.rank = heartbeat_path(run_dir, rank), rank
        self.step, self.doing, self.since = 0, "starting", time.time()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="paratrain-heartbeat", daemon=True)

    def start(self, world_size: int) -> "Heartbeat":
        """Beat where there are peers to tell (a one-process run writes nothing)."""
        if world_size > 1:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write()
            self._thread.start()
        return self

    def at(self, step: int, doing: str) -> None:
        """What the training loop does now (called by the main thread; plain attribute writes)."""
        if (step, doing) != (self.step, self.doing):
            self.step, self.doing, self.since = step, doing, time.time()

    def close(self, doing: str) -> None:
        """The last word: "finished", "failed" or "stopped"."""
        if self._thread.is_alive():
            self._done.set()
            self._thread.join()
            self.doing = doing
            self._write()

    def _beat(self) -> None:
        written, last = (self.step, self.doing), time.monotonic()
        while not self._done.wait(POLL_S):
            now = (self.step, self.doing)
            if now != written or time.monotonic() - last >= INTERVAL_S:
                self._write()
                written, last = now, time.monotonic()

    def _write(self) -> None:
        beat = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "step": self.step,
                "doing": self.doing, "since": self.since, "time": time.time()}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, self.path)
        except OSError:  # a full or vanished disk: the run's own writes will say so
            pass


@dataclass
class Peer:
    """Another rank as its heartbeat and, on this host, /proc describe it."""
    rank: int
    pid: int
    host: str
    step: int
    doing: str
    silent_s: float  # since its last heartbeat
    state: str  # "running", "stopped" (SIGSTOP), "gone" (no such process), "remote" (another host)

    @property
    def unhealthy(self) -> bool:
        if self.doing in ("finished", "stopped"):  # left at the end, or on a signal, as it should
            return False
        return self.state in ("stopped", "gone") or (self.silent_s > SILENT_S and self.doing not in ENDED)

    def describe(self) -> str:
        where = f"rank {self.rank} (pid {self.pid} on host {self.host})"
        if self.doing in ENDED:  # it said goodbye: an error of its own, or a stop
            return f"{where} {self.doing} at step {self.step}"
        verb = "died" if self.state == "gone" else "stopped"
        state = {"stopped": " (process stopped)", "gone": " (process gone)"}.get(self.state, "")
        return (f"{where} {verb} at step {self.step} in {self.doing}; last heartbeat {self.silent_s:.0f} s ago"
                f"{state}")


ENDED = ("finished", "failed", "stopped")  # a heartbeat's last word: the rank left on its own


def read_peer(path: Path, now: float | None = None) -> Peer | None:
    """The rank as its heartbeat file says; its step from its metrics where those are newer (the
    heartbeat is up to POLL_S late, the metrics line of each step is flushed as it is written)."""
    try:
        b = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    now = time.time() if now is None else now
    local = b["host"] == socket.gethostname()
    step, doing = b["step"], b["doing"]
    recorded = _last_step(path.parent.parent / "metrics" / f"rank{b['rank']}.jsonl")
    # Steps the heartbeat had not caught up with: a record of step N is written as step N ends, after
    # the heartbeat said "train_step" at N and before it says what follows at N.
    behind = recorded > step or (recorded == step and doing == "train_step")
    if behind and recorded > 0 and doing not in ENDED:
        step, doing = recorded + 1, "train_step"  # past its last step record: in the next step
    return Peer(b["rank"], b["pid"], b["host"], step, doing, now - b["time"],
                process_state(b["pid"]) if local else "remote")


def _last_step(metrics: Path) -> int:
    """The last step a metrics file records (0: none; steps count from 1)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "step":
            return int(rec["step"])
    return 0


def process_state(pid: int) -> str:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return {"T": "stopped", "t": "stopped", "Z": "gone", "X": "gone"}.get(state, "running")


def describe_exit(run_dir: Path, rank: int, pid: int, exitcode: int) -> str:
    """A worker that has exited, for the launcher's line: its signal or code, and where it was."""
    how = f"killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exit code {exitcode}"
    beat = read_peer(heartbeat_path(run_dir, rank))
    at = f" at step {beat.step} in {beat.doing}" if beat and beat.doing not in ENDED else ""
    return f"rank {rank} (pid {pid}) {how}{at}"


def is_lost(run_dir: Path, rank: int) -> bool:
    """The rank's heartbeat says it is dead, stopped or silent: no one need wait for it."""
    peer = read_peer(heartbeat_path(run_dir, rank))
    return peer is not None and peer.unhealthy


def peers(run_dir: Path, me: int) -> list[Peer]:
    found = (read_peer(p) for p in sorted((Path(run_dir) / "heartbeats").glob("rank*.json")))
    return [p for p in found if p is not None and p.rank != me]


def report(run_dir: Path, me: int, end_stopped: bool) -> list[Peer]:
    """After a failed collective: one line per unhealthy peer on stderr; SIGKILL to a stopped one on
    this host when `end_stopped` (ranks that step together cannot go on without it)."""
    # A killed peer's sockets close before the kernel marks it dead (do_exit closes its files before
    # the zombie state), so its collective fails here while /proc may still say "running": give
    # the peers' states a moment to settle (measured: under load the gap reached past one poll).
    deadline = time.monotonic() + SETTLE_S
    while not (bad := [p for p in peers(run_dir, me) if p.unhealthy]) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for p in bad:
        ended = "; ended it with SIGKILL so that the group can stop or restart" if end_stopped and end(p) else ""
        print(f"paratrain: rank {me}: {p.describe()}{ended}", file=sys.stderr, flush=True)
    return bad


def end_if_stopped(run_dir: Path, rank: int) -> bool:
    """SIGKILL the rank if it is stopped on this host (a hang its peers have given up on): its
    connections then close, and whatever still waits on them fails at once. Ended?"""
    peer = read_peer(heartbeat_path(run_dir, rank))
    return peer is not None and end(peer)


def end(peer: Peer) -> bool:
    if peer.state != "stopped" or not _is_paratrain(peer.pid):
        return False
    try:
        os.kill(peer.pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _is_paratrain(pid: int) -> bool:
    try:
        return b"paratrain" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
