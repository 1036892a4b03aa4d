"""Stopping on SIGTERM or Ctrl-C at a step boundary, with a checkpoint: what a cluster scheduler
asks of a job before preemption (SLURM sends SIGTERM, then SIGKILL after a grace period).

The first SIGTERM or SIGINT only sets a flag. After each step the ranks agree on it
(`Strategy.agree_to_stop`: one all-reduce of the signal number where ranks step together, the
next synchronisation for local SGD and DiLoCo), so that a signal sent to one worker alone stops
every rank at the same step; each writes its part of a checkpoint there, and the process exits
with 128 + the signal number. A second Ctrl-C does not wait: KeyboardInterrupt, at once. A
second SIGTERM changes nothing: under SLURM every process of the job step gets the scheduler's
signal, and torchrun's agent passes its own on too.

torch's elastic agent (`paratrain run`, torchrun) forwards a signal it receives to every worker
once and waits for them; the launcher kills them at a second one. Written here: torch offers no
step-boundary stop of its own.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Training stopped on a signal at a step boundary (checkpoint: the file written there, or None)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = f"checkpoint saved: {checkpoint}" if checkpoint else "no checkpoint written (checkpoints off)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The signal handlers of one training process; `signum` is 0 until a signal arrives."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # A second signal after a Ctrl-C stops now (`paratrain run` passes a second Ctrl-C on to
        # its workers as SIGTERM). A repeated SIGTERM does not: a scheduler signals every process
        # of a job step (SLURM's --signal and scancel reach the workers directly) and torchrun's
        # agent passes its own on, so a worker gets the one request twice within a moment.
        if self.signum and signal.SIGINT in (self.signum, signum):
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
