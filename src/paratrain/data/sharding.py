"""Deterministic global batches, sliced per data-parallel rank.

Epoch e visits a permutation of the dataset seeded by (seed, e). Step s takes global batch
s mod steps_per_epoch of that permutation, and data-parallel rank r takes its r-th contiguous
slice (`reshard`: the survivors of a lost replica split the batch among themselves). So every
sample is seen once per epoch across ranks, a one-process run with the same
global batch sees exactly the union of the ranks' slices, and the data position is a pure
function of the step: resuming needs nothing but the step number.
"""
from __future__ import annotations

import torch

from paratrain.config import ConfigError
from paratrain.data.batch import Batch


class ShardedBatches:
    def __init__(self, dataset, global_batch_size: int, dp_rank: int, dp_size: int, seed: int, split: str = "train"):
        if len(dataset) < global_batch_size:
            raise ConfigError(
                f"training.global_batch_size = {global_batch_size}: the {split} split holds only "
                f"{len(dataset)} samples; use a batch of at most {len(dataset)} or more data")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = len(dataset) // global_batch_size  # the last partial batch is dropped
        self._epoch, self._perm = -1, None
        self.reshard(dp_rank, dp_size)

    def reshard(self, dp_rank: int, dp_size: int) -> None:
        """Take slice `dp_rank` of `dp_size` from here on (the survivors of a lost replica share its
        part; with sizes that do not divide the batch, the slices differ by one sample)."""
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch_size = self._offset(dp_rank + 1) - self._offset(dp_rank)

    def _offset(self, rank: int) -> int:
        return rank * self.global_batch_size // self.dp_size

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.dataset), generator=g)
        start = i * self.global_batch_size + self._offset(self.dp_rank)
        return self._perm[start:start + self.local_batch_size]

    def batch(self, step: int) -> Batch:
        return self.dataset.get(self.indices(step))

    def position(self, step: int) -> dict:
        epoch, i = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": i, "steps_per_epoch": self.steps_per_epoch}
