"""Strategies by config name, imported on demand: a run imports its own strategy's dependencies
(FSDP, pipelining, DTensor, the parameter-server protocol) and no other's.

Layout: one folder per family, its communication beside it; `base.py` is the interface, and
`layout.py` the rules that place a strategy on N processes. Adding a strategy: a `Strategy`
subclass in its family's folder, its entry here, and its layout rule in layout.py.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from paratrain.config import ConfigError
from paratrain.strategies.layout import layout

if TYPE_CHECKING:
    from paratrain.strategies.base import Strategy

# name -> "module:class"
STRATEGIES: dict[str, str] = {
    "single": "paratrain.strategies.single:Single",
    "ddp": "paratrain.strategies.data_parallel.ddp:DDP",
    "zero1": "paratrain.strategies.data_parallel.zero:Zero1",
    "zero2": "paratrain.strategies.data_parallel.zero:Zero2",
    "zero3": "paratrain.strategies.data_parallel.zero:Zero3",
    "model_parallel": "paratrain.strategies.pipeline.pipeline:ModelParallel",
    "pipeline": "paratrain.strategies.pipeline.pipeline:Pipeline",
    "tensor": "paratrain.strategies.tensor.tensor:TensorParallel",
    "hybrid": "paratrain.strategies.hybrid:Hybrid",
    "gossip": "paratrain.strategies.gossip.gossip:Gossip",
    "hogwild": "paratrain.strategies.hogwild:Hogwild",
    "local_sgd": "paratrain.strategies.local_sgd.local_sgd:LocalSGD",
    "diloco": "paratrain.strategies.local_sgd.local_sgd:DiLoCo",
    "parameter_server": "paratrain.strategies.parameter_server.worker:ParameterServer",
}

# The same strategies as fault-tolerant replica groups (torchft; fault_tolerance.replica_groups > 0).
FAULT_TOLERANT: dict[str, str] = {
    "ddp": "paratrain.strategies.data_parallel.ft:FaultTolerantDDP",
    "local_sgd": "paratrain.strategies.local_sgd.ft:FaultTolerantLocalSGD",
    "diloco": "paratrain.strategies.local_sgd.ft:FaultTolerantDiLoCo",
    "hybrid": "paratrain.strategies.hybrid:FaultTolerantHybrid",
}

# Strategies whose layout has ranks that serve instead of train (ServerDims): name -> "module:function",
# the function run on such a rank in place of the trainer: serve(cfg, topo, run_dir, ckpt, model).
SERVERS: dict[str, str] = {"parameter_server": "paratrain.strategies.parameter_server.server:serve"}

__all__ = ["FAULT_TOLERANT", "SERVERS", "STRATEGIES", "get_server", "get_strategy", "layout"]


def _load(path: str):
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def get_strategy(name: str, replica_groups: bool = False) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name = '{name}': not available; available: {', '.join(STRATEGIES)}")
    return _load((FAULT_TOLERANT if replica_groups else STRATEGIES)[name])


def get_server(name: str):
    return _load(SERVERS[name])
