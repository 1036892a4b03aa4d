"""Datasets (built-in corpora, synthetic regression, user factories) and per-rank sharding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from paratrain.config import Config, ConfigError
from paratrain.data.batch import Batch
from paratrain.data.sharding import ShardedBatches
from paratrain.imports import call_user, import_callable

__all__ = ["Batch", "ShardedBatches", "Datasets", "as_datasets", "build_datasets", "MapDataset"]


@dataclass
class Datasets:
    train: object  # anything with __len__ and get(indices) -> Batch
    eval: object
    vocab_size: int = 0  # for language models


class MapDataset:
    """Adapts a map-style torch Dataset of (input, target) pairs to `get(indices) -> Batch`."""

    def __init__(self, dataset, tokens_per_sample: int = 0):
        self.dataset = dataset
        self.tokens_per_sample = tokens_per_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, indices: torch.Tensor) -> Batch:
        from torch.utils.data import default_collate

        x, y = default_collate([self.dataset[int(i)] for i in indices])
        return Batch(x, y, self.tokens_per_sample)


def _adapt(ds, where: str):
    if hasattr(ds, "get") and hasattr(ds, "__len__"):
        return ds
    if hasattr(ds, "__getitem__") and hasattr(ds, "__len__"):
        return MapDataset(ds)
    raise ConfigError(f"{where}: returned {type(ds).__name__}; expected a map-style Dataset of (input, target) pairs")


def as_datasets(given) -> Datasets:
    """The Python API's `datasets`: a Datasets, or a (train, held-out) pair of map-style datasets of
    (input, target) pairs, as torch's TensorDataset is."""
    if isinstance(given, Datasets):
        return given
    try:
        train, held_out = given
    except (TypeError, ValueError):
        raise ConfigError(f"datasets: {type(given).__name__}; expected (train, eval) map-style datasets of "
                          "(input, target) pairs, or a paratrain.data.Datasets") from None
    return Datasets(_adapt(train, "datasets[0] (train)"), _adapt(held_out, "datasets[1] (eval)"))


def build_datasets(cfg: Config) -> Datasets:
    d = cfg.data
    if d.name in ("pydoc", "text"):
        from paratrain.data.text import char_splits, pydoc_corpus, read_corpus

        text = pydoc_corpus() if d.name == "pydoc" else read_corpus(d.path)
        train, held_out, vocab = char_splits(text, cfg.model.block_size, d.eval_fraction)
        return Datasets(train, held_out, len(vocab))
    if d.name == "synthetic":
        from paratrain.data.synthetic import regression_splits

        return Datasets(*regression_splits(d.num_samples, d.eval_fraction, d.seed))
    factory = import_callable(d.factory, "data.factory")
    return Datasets(*(_adapt(call_user(factory, "data.factory", d.factory, split, cfg), f"data.factory('{split}')")
                      for split in ("train", "eval")))
