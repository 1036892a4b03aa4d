"""Every check of the user's input that would otherwise fail in N workers at once, run by the
launcher (`paratrain run`, `paratrain.launch`) before any worker starts: the config against the
process count (strategies/layout.py), the device, optional packages, the user's code imported,
the data built and big enough for a batch, the model built on the meta device and cut into its
pipeline stages (traced where it must be: pipeline/split.py), one forward and loss of a held-out
batch there, and the checkpoint to resume from. Each failure is one line (a ConfigError: exit
code 2).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from paratrain.checkpoint import check_compatible, read_checkpoint
from paratrain.config import Config, ConfigError
from paratrain.data import Datasets, ShardedBatches, build_datasets
from paratrain.imports import import_callable


def preflight(cfg: Config, world_size: int, ckpt_path: Path | None, ckpt: dict | None = None) -> None:
    """Every check of the user's input that would otherwise fail in N workers at once."""
    import torch

    from paratrain.models import build_loss, build_model
    from paratrain.strategies.layout import check_model_split, group_world, layout

    dims = layout(cfg, group_world(cfg, world_size))  # every rule that names a strategy or needs the process count
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda': no CUDA device is visible; use 'cpu' or 'auto'")
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard = true: torch's SummaryWriter needs the tensorboard package; "
                          "pip install 'paratrain[tensorboard]' (or tensorboard), or set it false")
    for key in ("model.factory", "model.loss", "data.factory"):  # user code must import
        section, name = key.split(".")
        if path := getattr(getattr(cfg, section), name):
            import_callable(path, key)
    datasets = build_datasets(cfg)
    for split, data in (("train", datasets.train), ("eval", datasets.eval)):  # enough samples for a batch
        ShardedBatches(data, cfg.training.global_batch_size, 0, dims.dp * cfg.fault_tolerance.groups,
                       cfg.training.seed, split)
    with torch.device("meta"):  # shapes only, no memory
        model = build_model(cfg, datasets.vocab_size)
    if dims.pp > 1:
        check_model_split(cfg, model, dims.pp, dims.dp)
        from paratrain.strategies.pipeline.split import check_traceable

        check_traceable(cfg, model, datasets, dims.pp, dims.dp * cfg.fault_tolerance.groups)
    if cfg.model.name == "custom" or cfg.data.name == "custom" or cfg.model.loss:
        # User code: its shapes are checked here. The built-in models, data and losses fit each other
        # by construction (config.validate pairs them), and a meta forward costs the launcher 1.1 s
        # of start-up before any worker starts (its decompositions import torch._dynamo, measured).
        _check_one_step(cfg, model, build_loss(cfg), datasets)
    if ckpt_path is not None:
        check_compatible(ckpt if ckpt is not None else read_checkpoint(ckpt_path), cfg, ckpt_path, model)


def _check_one_step(cfg: Config, model: nn.Module, loss_fn: Callable, datasets: Datasets) -> None:
    """Forward and loss of one held-out batch on the meta device (shapes only, no memory): a shape
    or loss error is one line here instead of a traceback in every worker."""
    import torch

    from paratrain.imports import describe

    m = cfg.model
    what = f"model.factory = '{m.factory}'" if m.name == "custom" else f"model.name = '{m.name}'"
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{what}: the model has no trainable parameters")
    batch = datasets.eval.get(torch.arange(min(2, len(datasets.eval))))
    try:
        output = model(batch.inputs.to("meta"))
    except Exception as e:  # noqa: BLE001 - user code
        if _meta_cannot(e):
            return
        raise ConfigError(f"{what}: forward on one batch of the data fails: {describe(e)}") from None
    loss_key = f"model.loss = '{cfg.model.loss}'" if cfg.model.loss else what
    try:
        loss = loss_fn(output, batch.targets.to("meta"))
    except Exception as e:  # noqa: BLE001 - user code
        if _meta_cannot(e):
            return
        raise ConfigError(f"{loss_key}: the loss of the model's output and the data's targets fails: "
                          f"{describe(e)}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(f"{loss_key}: must return a scalar tensor, returned {shape}")


def _meta_cannot(e: Exception) -> bool:
    """An op the meta device cannot run (data-dependent, .item()): the check says nothing then."""
    text = str(e)
    return isinstance(e, NotImplementedError) or "meta" in text or "data-dependent" in text
