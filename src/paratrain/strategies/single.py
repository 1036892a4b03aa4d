"""One process, no communication: the oracle every parallel strategy is tested against."""
from __future__ import annotations

from paratrain.optim import build_optimizer
from paratrain.strategies.base import Strategy


class Single(Strategy):
    name = "single"

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
