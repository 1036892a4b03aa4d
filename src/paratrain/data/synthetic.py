"""Synthetic regression for the MLP: y = sin(x . w) + noise, x in R^10, seeded."""
from __future__ import annotations

import torch

from paratrain.data.batch import Batch

IN_FEATURES = 10


class TensorDataset:
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets
        self.tokens_per_sample = 0

    def __len__(self) -> int:
        return len(self.inputs)

    def get(self, indices: torch.Tensor) -> Batch:
        return Batch(self.inputs[indices], self.targets[indices])


def regression_splits(num_samples: int, eval_fraction: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, 1, generator=g) / IN_FEATURES**0.5
    y = torch.sin(2 * x @ w) + 0.05 * torch.randn(num_samples, 1, generator=g)
    cut = int(num_samples * (1 - eval_fraction))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
