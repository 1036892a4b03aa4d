"""Injected faults at one rank and step: real ones, as a cluster has them.

- `kill_at_step`: the rank sends itself SIGKILL, a crash as an out-of-memory kill or a segfault
  is: no clean-up, exit status -9, and torch's agent sees a failed worker.
- `hang_at_step`: SIGSTOP to itself: alive, holding its sockets, silent; its peers wait on it
  until their timeout (and the watchdog, watchdog.py, says who they waited for).
- `leave_at_step`: exits with code 0 without a word to its peers: a worker that quits, which
  torch's agent does not count as a failure.
- `nan_at_step`, `slowdown`, `delay_s`: a divergence and a straggler.

Steps count from 1: `kill_at_step = 5` acts before the fifth step, after four are done. A fault
happens once: a group that torch's agent restarted (TORCHELASTIC_RESTART_COUNT > 0) does
not repeat it, as a transient fault would not recur. Configured under `[faults]` and applied by the
trainer around each step, whatever the strategy; what survives a fault is for the strategy and
the launcher to show.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch

from paratrain.config import FaultsConfig
from paratrain.restarts import attempt


class FaultInjector:
    def __init__(self, cfg: FaultsConfig, rank: int):
        self.active = cfg.rank == rank
        self.cfg = cfg

    step = 0  # the step being taken (counted from 1), set by before_step

    def before_step(self, step: int) -> None:
        self.step = step
        if not self.active or attempt() > 0:
            return
        c = self.cfg
        for at, what, act in ((c.kill_at_step, "SIGKILL", lambda: os.kill(os.getpid(), signal.SIGKILL)),
                              (c.hang_at_step, "SIGSTOP", lambda: os.kill(os.getpid(), signal.SIGSTOP)),
                              (c.leave_at_step, "exit 0", lambda: os._exit(0))):
            if step == at:
                print(f"paratrain: faults: rank {c.rank} pid {os.getpid()} {what} before step {step} "
                      f"at {time.time():.3f}", file=sys.stderr, flush=True)
                act()

    def wrap_loss(self, loss_fn):
        """The loss, NaN on the faulty rank at `nan_at_step`: a divergence at a chosen place. The
        training loss only (evaluation after that step runs without grad and stays finite)."""
        if not self.active or self.cfg.nan_at_step < 0 or attempt() > 0:
            return loss_fn

        def loss(output, target):
            value = loss_fn(output, target)
            nan = self.step == self.cfg.nan_at_step and torch.is_grad_enabled()
            return value * float("nan") if nan else value
        return loss

    def after_step(self, compute_s: float) -> float:
        """Sleep as a slower machine would have; returns the seconds added."""
        if not self.active:
            return 0.0
        extra = (self.cfg.slowdown - 1) * compute_s + self.cfg.delay_s
        if extra > 0:
            time.sleep(extra)
        return extra
