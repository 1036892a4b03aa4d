"""Reference models (plain torch) and the loss that goes with each; user models by import path."""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
import torch.nn.functional as F

from paratrain.config import Config, ConfigError
from paratrain.imports import call_user, import_callable
from paratrain.models.gpt import GPT, cross_entropy
from paratrain.models.mlp import mlp

__all__ = ["GPT", "mlp", "build_model", "build_loss"]


def build_model(cfg: Config, vocab_size: int = 0) -> nn.Module:
    m = cfg.model
    if m.name == "gpt":
        return GPT(vocab_size, m.n_layer, m.n_head, m.d_model, m.block_size, m.dropout)
    if m.name == "mlp":
        return mlp(hidden=m.hidden)
    model = call_user(import_callable(m.factory, "model.factory"), "model.factory", m.factory, **m.options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory = '{m.factory}': returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_loss(cfg: Config) -> Callable:
    if cfg.model.loss:
        return import_callable(cfg.model.loss, "model.loss")
    if cfg.model.name == "gpt":
        return cross_entropy
    if cfg.model.name == "mlp":
        return F.mse_loss
    raise ConfigError("model.loss: required when model.name = 'custom' (e.g. 'torch.nn.functional:mse_loss')")
