"""The small MLP of the classic data-parallel example: 10 -> hidden -> 1 regression."""
from __future__ import annotations

import torch.nn as nn


def mlp(in_features: int = 10, hidden: int = 20, out_features: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
