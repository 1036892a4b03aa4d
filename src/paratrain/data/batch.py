"""A batch of inputs and targets, split into micro-batches for gradient accumulation."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    tokens_per_sample: int = 0  # > 0 for language data: throughput is reported in tokens/s

    @property
    def num_samples(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.tokens_per_sample

    def split(self, parts: int) -> list["Batch"]:
        """`parts` equal micro-batches (the caller checked divisibility)."""
        return [Batch(x, y, self.tokens_per_sample)
                for x, y in zip(self.inputs.chunk(parts), self.targets.chunk(parts))]

    def to(self, device: torch.device) -> "Batch":
        if self.inputs.device == device:
            return self
        return Batch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                     self.tokens_per_sample)
