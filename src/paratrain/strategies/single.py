"""One process, no communication: the oracle every parallel strategy is tested against."""
from __future__ import annotations

from paratrain.config import Config, ConfigError
from paratrain.strategies.base import Strategy
from paratrain.topology import ParallelDims


class Single(Strategy):
    name = "single"

    @classmethod
    def parallel_dims(cls, cfg: Config, world_size: int) -> ParallelDims:
        if world_size != 1:
            raise ConfigError(f"strategy.name = 'single': runs on 1 process, not {world_size}; use --nproc 1")
        return ParallelDims()
