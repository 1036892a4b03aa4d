"""Tensor parallelism as a strategy: every rank holds 1/tp of each layer (Megatron-LM, Shoeybi et
al. 2019; the split itself is in parallelize.py) and computes on the whole batch (dp = 1).

The loss is computed on the vocabulary shards of the logits (`loss_parallel`). With dropout and
plain TP the first step shares tp rank 0's random generator state (`DropoutRng`, parallelize.py).
Bytes are computed from the step's shapes (`step_collectives`): DTensor issues its collectives
inside forward and backward, out of reach of the meter.
"""
from __future__ import annotations

from torch.distributed.tensor.parallel import loss_parallel

from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.strategies.base import StepStats, Strategy, local_eval, local_step
from paratrain.strategies.tensor.parallelize import (
    DropoutRng,
    parallelize_gpt,
    replicated_loss,
    ring_bytes,
    step_collectives,
)


class TensorParallel(Strategy):
    name = "tensor"

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, replicated_loss(loss_fn))
        self.sequence_parallel = cfg.strategy.tensor.sequence_parallel
        self.model = parallelize_gpt(self.model, topo.mesh["tp"], self.sequence_parallel)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.dropout_rng = DropoutRng(cfg, topo)

    def train_step(self, batch: Batch) -> StepStats:
        self.dropout_rng.share_once()
        ops = step_collectives(self.module, tuple(batch.inputs.shape), self.cfg.training.grad_accum_steps,
                               self.sequence_parallel)
        # Bytes only: the time of these collectives is inside forward and backward (compute_s).
        self.meter.add(sum(ring_bytes(op, nbytes, self.topo.size("tp")) for op, nbytes in ops), 0.0)
        return local_step(self, batch, loss_context=loss_parallel)

    def evaluate(self, batches: list[Batch]) -> list[float]:
        return local_eval(self, batches, loss_context=loss_parallel).tolist()  # the same on every tp rank
