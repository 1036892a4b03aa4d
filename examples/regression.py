"""A user's own model, loss and dataset, plain torch, for `configs/custom.toml` and the Python API.

    paratrain run configs/custom.toml --nproc 2           # by import path, from the config
    python examples/regression.py                          # through the Python API, one process
"""
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset


def build_model(width: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.GELU(), nn.Linear(width, 1))


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.smooth_l1_loss(output, target)


def dataset(split: str, cfg) -> TensorDataset:
    """Any map-style Dataset of (input, target) pairs works; `split` is 'train' or 'eval'."""
    g = torch.Generator().manual_seed(cfg.data.seed + (split == "eval"))
    x = torch.randn(2048 if split == "train" else 256, 8, generator=g)
    return TensorDataset(x, x.pow(2).sum(1, keepdim=True).sqrt())


if __name__ == "__main__":
    import paratrain
    from paratrain.data import Datasets, MapDataset

    cfg = paratrain.load_config("configs/custom.toml", ["strategy.name=single", "run.nproc=1"])
    data = Datasets(MapDataset(dataset("train", cfg)), MapDataset(dataset("eval", cfg)))
    result = paratrain.train(cfg, model=build_model(), loss_fn=loss, datasets=data)
    print(f"eval loss {result.summary['eval_loss']:.4f}; trained model: {type(result.model).__name__}")
