"""Character-level text corpora: CPython's pydoc topics (built in) or any UTF-8 file.

A sample is one non-overlapping window of `block_size` characters and the same window shifted
by one as the target, so an epoch visits every character once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from paratrain.config import ConfigError
from paratrain.data.batch import Batch


def pydoc_corpus() -> str:
    """~465k characters of Python documentation, shipped with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_corpus(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # a binary or other-encoding file would train on noise
        raise ConfigError(f"data.path = '{path}': not UTF-8 text (byte {e.start}: {e.reason}); "
                          "give a UTF-8 text file") from None


class CharVocab:
    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class CharDataset:
    """Windows of `block_size` characters over an encoded text."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        self.ids = ids
        self.block_size = block_size
        self.tokens_per_sample = block_size

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.block_size)

    def get(self, indices: torch.Tensor) -> Batch:
        starts = indices.unsqueeze(1) * self.block_size + torch.arange(self.block_size + 1)
        windows = self.ids[starts]
        return Batch(windows[:, :-1], windows[:, 1:], self.tokens_per_sample)


def char_splits(text: str, block_size: int, eval_fraction: float):
    """(train, eval, vocab): the last `eval_fraction` of the text is held out."""
    vocab = CharVocab(text)
    ids = vocab.encode(text)
    cut = int(len(ids) * (1 - eval_fraction))
    return CharDataset(ids[:cut], block_size), CharDataset(ids[cut:], block_size), vocab
