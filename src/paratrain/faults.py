"""Injected stragglers and failures: slow a rank by a factor, add a delay, make its loss NaN, or
kill it at a step.

Configured under `[faults]` and applied by the trainer around each step, whatever the strategy,
so that tests and benchmarks can show what each strategy does with a slow or lost worker.
A killed rank leaves abruptly (`os._exit`, no clean-up, no goodbye to its peers), as a machine
that loses power would; its exit code is 0 so that the launcher does not stop the others,
which is for the strategy to survive or not.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from paratrain.config import FaultsConfig


class FaultInjector:
    def __init__(self, cfg: FaultsConfig, rank: int):
        self.active = cfg.rank == rank
        self.cfg = cfg

    step = -1  # the step being taken, set by before_step

    def before_step(self, step: int) -> None:
        self.step = step
        if self.active and step == self.cfg.kill_at_step:
            print(f"paratrain: faults: rank {self.cfg.rank} killed before step {step}", file=sys.stderr, flush=True)
            os._exit(0)

    def wrap_loss(self, loss_fn):
        """The loss, NaN on the faulty rank at `nan_at_step`: a divergence at a chosen place. The
        training loss only (evaluation after that step runs without grad and stays finite)."""
        if not self.active or self.cfg.nan_at_step < 0:
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
