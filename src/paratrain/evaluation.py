"""Evaluation metrics beside the held-out loss: `training.eval_metrics` (built-ins by name, or
"package.module:function"), or functions given to the Python API (`train(cfg, metrics=...)`).

A metric is `fn(output, target) -> scalar tensor`, the mean over the batch, like the loss. Every
strategy evaluates one vector per held-out batch, [loss, metric, ...], and averages it as it
averaged the loss alone (over batches, then over its data-parallel ranks or replicas); so a
metric is the mean over the held-out batches of its per-batch value. A metric with `after`
is transformed once averaged: perplexity is exp(mean cross-entropy), not the mean of per-batch
perplexities. Where the output is a DTensor (tensor parallelism), a metric sees the full tensor;
where it is an object with `.logits` (a transformers ModelOutput), the logits.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paratrain.config import ConfigError
from paratrain.imports import import_callable


@dataclass(frozen=True)
class Metric:
    fn: Callable  # (output, target) -> scalar tensor, the batch's mean
    after: Callable[[float], float] | None = None  # applied to the average


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of the predictions (argmax over the last dimension) equal to the target."""
    return (output.argmax(-1) == target).float().mean()


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))


BUILT_IN = {"accuracy": Metric(accuracy), "perplexity": Metric(cross_entropy, after=math.exp)}


def build_metrics(names, given: dict[str, Callable] | None = None) -> dict[str, Metric]:
    """{name: Metric} from config names (built-ins or import paths) and the API's functions."""
    out = {}
    for name in names:
        if name in BUILT_IN:
            out[name] = BUILT_IN[name]
        else:
            out[name.rpartition(":")[2]] = Metric(import_callable(name, "training.eval_metrics"))
    for name, fn in (given or {}).items():
        if not callable(fn):
            raise ConfigError(f"metrics[{name!r}]: not a function of (output, target)")
        out[name] = Metric(fn)
    return out


def values(loss_fn: Callable, metrics: dict[str, Metric], output, target) -> torch.Tensor:
    """[loss, metric, ...] of one batch, one float vector."""
    loss = loss_fn(output, target).detach().float().reshape(())
    if not metrics:
        return loss.reshape(1)
    full = output.logits if hasattr(output, "logits") else output  # transformers' ModelOutput
    full = full.full_tensor() if hasattr(full, "full_tensor") else full
    return torch.stack([loss, *(m.fn(full, target).detach().float().reshape(()).to(loss.device)
                                for m in metrics.values())])


def named(metrics: dict[str, Metric], averaged: list[float]) -> dict[str, float]:
    """{"eval_loss": ..., "eval_<metric>": ...} from an averaged vector."""
    out = {"eval_loss": averaged[0]}
    for (name, m), v in zip(metrics.items(), averaged[1:]):
        out[f"eval_{name}"] = m.after(v) if m.after else v
    return out
