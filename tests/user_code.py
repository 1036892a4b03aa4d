"""A user's own model, loss and dataset, named by import path in test configs."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def build_model(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def dataset(split: str, cfg) -> TensorDataset:
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.randn(256 if split == "train" else 64, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def bn_model(width: int = 4) -> nn.Module:
    """A small conv net with BatchNorm (2-d and 1-d): its buffers are running statistics."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 36, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def bn_dataset(split: str, cfg) -> TensorDataset:
    """6 x 6 one-channel images, offset and scaled so that normalising matters; 3 classes."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.randn(512 if split == "train" else 128, 1, 6, 6, generator=g) * 2.0 + 1.5
    return TensorDataset(x, (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long() + (x[:, 0, 0, 0] > 1.5).long())


def resnet18(num_classes: int = 3) -> nn.Module:
    """torchvision's ResNet-18 (BatchNorm after every convolution), built from its code, no weights
    downloaded (importable here through tests/shims/sitecustomize.py)."""
    from torchvision.models import resnet18 as build

    return build(num_classes=num_classes)


def image_dataset(split: str, cfg) -> TensorDataset:
    """3 x 9 x 9 images, 3 classes by where the bright square is."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 256 if split == "train" else 64
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 9, 9, generator=g) * 0.5
    for i, c in enumerate(y.tolist()):
        x[i, :, 3 * c:3 * c + 3, 3 * c:3 * c + 3] += 2.0
    return TensorDataset(x, y)


def top_logit(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A metric by import path: the mean of the largest logit."""
    return output.max(-1).values.mean()
