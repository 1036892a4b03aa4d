"""Synchronised batch normalisation (`model.sync_batchnorm = true`): BatchNorm's statistics taken
over the whole data-parallel batch instead of each rank's share of it (Ioffe & Szegedy, 2015;
synchronised across devices as in MegDet, Peng et al., 2018, and torch's `nn.SyncBatchNorm`).

With plain BatchNorm each rank normalises with the mean and variance of its own part of the
batch, so ddp on N ranks does not train the model `single` trains on the same global batch.
Synchronised, every rank normalises with the statistics of the global batch; forward and backward
then equal one process's on that batch (up to the order of float sums).

On an accelerator torch's `nn.SyncBatchNorm` runs (`convert_sync_batchnorm`). It refuses CPU
tensors ("expected input tensor to be on GPU"), the kernels it calls (`torch.batch_norm_stats`)
have no CPU implementation, and DDP refuses it in a CPU module; so on CPU the layer is written
here: the per-channel count, sum and sum of squared deviations, each summed over the group with a
differentiable all-reduce (its backward all-reduces the gradient, as torch's SyncBatchNorm
backward does), two all-reduces a layer: the mean first, then the deviations from it (the
one-pass E[x^2] - E[x]^2 loses digits).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the gradient: each rank's loss depends on
    every rank's input through the statistics. (torch.distributed.nn.functional.all_reduce does
    this too, and is deprecated.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SumOverGroup.apply(grad.contiguous(), ctx.group), None


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverGroup.apply(x, group)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over a process group's whole batch, on CPU (torch's SyncBatchNorm on accelerators).
    Not a subclass of nn.SyncBatchNorm: DDP refuses those on CPU modules."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or dist.group.WORLD
        if not self.training or dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1, *[1] * (x.dim() - 2)]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        total = all_reduce(torch.cat([x.sum(dims), count]), group)
        n = total[-1]
        mean = total[:-1] / n
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims), group) / n
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                # as F.batch_norm: the running variance is the unbiased one
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        return y


def convert(module: nn.Module, group, device: torch.device) -> nn.Module:
    """Every BatchNorm*d in `module` synchronised over `group`, weights and running statistics kept
    (the same state_dict keys): torch's SyncBatchNorm on an accelerator, the one above on CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert(child, group, device))
    return module


def synced(cfg, topo, model: nn.Module) -> nn.Module:
    """`model.sync_batchnorm = true`: the model (or a pipeline stage of it) with its BatchNorm layers
    synchronised over the topology's dp axis; otherwise, or on one dp rank, the model as it is.
    Called by ddp and zero1 (ddp.py), zero2/zero3 (zero.py) and hybrid's stages (hybrid.py), before
    they wrap the model; config.py refuses it for the strategies whose replicas train apart."""
    if not cfg.model.sync_batchnorm or topo.size("dp") == 1:
        return model
    return convert(model, topo.group("dp"), topo.device)


__all__ = ["SyncBatchNorm", "convert", "synced"]
