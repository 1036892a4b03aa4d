"""Optimizers and the learning-rate schedule (a pure function of the step: nothing to checkpoint)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from paratrain.config import OptimizerConfig


def optimizer_spec(cfg: OptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer class and its keyword arguments, for wrappers that build it themselves (ZeRO-1)."""
    if cfg.name == "sgd":
        return torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                     weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_spec(cfg)
    return cls(params, **kwargs)


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then constant or cosine decay to `min_lr_ratio * lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
