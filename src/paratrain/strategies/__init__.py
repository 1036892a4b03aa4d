"""Strategies by config name. Adding one: a module with a `Strategy` subclass, listed here."""
from __future__ import annotations

from paratrain.config import ConfigError
from paratrain.strategies.base import StepStats, Strategy
from paratrain.strategies.ddp import DDP
from paratrain.strategies.gossip import Gossip
from paratrain.strategies.hogwild import Hogwild
from paratrain.strategies.hybrid import Hybrid
from paratrain.strategies.local_sgd import DiLoCo, LocalSGD
from paratrain.strategies.parameter_server import ParameterServer
from paratrain.strategies.pipeline import ModelParallel, Pipeline
from paratrain.strategies.single import Single
from paratrain.strategies.tensor import TensorParallel
from paratrain.strategies.zero import Zero1, Zero2, Zero3

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Single, DDP, Zero1, Zero2, Zero3, ModelParallel, Pipeline, TensorParallel, Hybrid,
                              Gossip, Hogwild, LocalSGD, DiLoCo, ParameterServer)}

__all__ = ["STRATEGIES", "StepStats", "Strategy", "get_strategy"]


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name = '{name}': not available; available: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
