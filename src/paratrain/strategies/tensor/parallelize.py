"""Tensor parallelism: Megatron-LM's split of each transformer block over ranks, through DTensor.

Megatron-LM (Shoeybi et al. 2019): in every block the first linear layers (attention q/k/v, MLP
up) are split by output columns and the second ones (attention proj, MLP down) by input rows,
so each rank holds 1/tp of the heads and of the MLP width, and a block costs one all-reduce of
the activations per sub-layer forward ("g") and one backward ("f"). The token embedding is split
over the vocabulary (each rank looks up the rows it holds, an all-reduce sums them), and so is
the head: its logits stay sharded over the vocabulary and cross-entropy is computed on the shards
(`loss_parallel`), so the batch x sequence x vocabulary logits are never gathered.

Sequence parallelism (Korthikanti et al. 2022): the LayerNorms, residual adds and dropouts
between the linear layers run on a 1/tp slice of the sequence instead of on replicated
activations; each all-reduce becomes a reduce-scatter into the sequence shards plus an
all-gather out of them: the same bytes on a ring, 1/tp of the activation memory there.

`parallelize_gpt` follows torchtitan's `apply_tp` (models/llama3/parallelize.py) and leaves the
model code plain; the tensor strategy (tensor.py) applies it to the whole model, the hybrid
strategy to each pipeline stage.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from paratrain.comm import ring_allgather_bytes, ring_allreduce_bytes, ring_reduce_scatter_bytes


class ReplicateParallel(ParallelStyle):
    """Parameters as Replicate DTensors, computed on identical inputs (torchtitan's NoParallel).

    Then every parameter is a DTensor on the tp mesh: grad clipping and the optimizer's foreach
    kernels refuse lists that mix DTensors with plain tensors.
    """

    def __init__(self, output_layout=Replicate()):
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        def to_dtensors(mod, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

        def to_local(mod, output, mesh):
            return output.redistribute(placements=[self.output_layout]).to_local()

        return distribute_module(module, mesh, input_fn=to_dtensors, output_fn=to_local)


def parallelize_gpt(model: nn.Module, tp_mesh, sequence_parallel: bool) -> nn.Module:
    """Shard a GPT (or a pipeline stage of one: absent pieces are None) over `tp_mesh`, in place.

    Between blocks the residual stream is a plain local tensor: replicated, or with sequence
    parallelism this rank's slice of the sequence (dim 1). Inside a sub-layer it is a DTensor.
    """
    # Where the residual stream lives between sub-layers: replicated, or sharded along the sequence.
    between = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    if model.tok_emb is not None:
        # Vocabulary-parallel embedding: rows split over ranks, the partial lookups summed
        # (all-reduce), or summed straight into sequence shards (reduce-scatter).
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.pos_emb is not None:
        # pos_emb stays replicated; with sequence parallelism each rank adds the positions of
        # its slice (dim 0 of the T x d output), and backward all-gathers their gradient.
        plan["pos_emb"] = ReplicateParallel(output_layout=Shard(0) if sequence_parallel else Replicate())
    if model.norm is not None:
        plan["norm"] = SequenceParallel() if sequence_parallel else ReplicateParallel()
    if model.head is not None:
        # Logits stay sharded over the vocabulary (a DTensor) for the vocabulary-parallel loss.
        plan["head"] = ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    for block in model.layers.values():
        block_plan = {
            # The sub-layer input as one Replicate DTensor shared by q, k and v (by up): their
            # input gradients add up as one Partial DTensor, reduced once (Megatron's "f"),
            # instead of one all-reduce per projection. With sequence parallelism: all-gather.
            "attn": PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
            "attn.q": ColwiseParallel(),  # local heads out; attention runs on them unchanged
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=between),  # "g": all-reduce / reduce-scatter
            "mlp": PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
            "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel(output_layouts=between),
        }
        norm = SequenceParallel if sequence_parallel else ReplicateParallel
        block_plan |= {"ln1": norm(), "ln2": norm()}
        parallelize_module(block, tp_mesh, block_plan)
    if sequence_parallel:
        for param in (p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()):
            param.register_post_accumulate_grad_hook(_reduce_partial_grad)
    return model


def _reduce_partial_grad(param: nn.Parameter) -> None:
    """Sum a sequence-parallel norm's gradient over the sequence shards once, after backward.

    The weights are replicated, but each rank's gradient covers only its slice of the sequence
    (a Partial DTensor). Left so, every optimizer kernel that reads it all-reduces it again
    (measured: 3 all-reduces per norm weight per AdamW step instead of 1).
    """
    grad = param.grad
    if any(p.is_partial() for p in grad.placements):
        param.grad = grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])


def step_collectives(model: nn.Module, batch_shape: tuple[int, int], num_micro: int,
                     sequence_parallel: bool) -> list[tuple[str, int]]:
    """(collective, bytes of its full tensor) for what TP sends in one training step.

    Computed from the shapes at the step, not measured at the call: DTensor issues these inside
    forward and backward. Per micro-batch of B x T tokens, with A = B T d_model activation bytes:
    plain TP all-reduces A 4 times per block (attention and MLP, forward "g" and backward "f"),
    once for the embedding's partial lookups and once for the head's input gradient; sequence
    parallelism turns each of those into an all-gather plus a reduce-scatter of A, all-gathers
    the position-embedding gradient and all-reduces each norm parameter's gradient once (see
    `_reduce_partial_grad`). The vocabulary-parallel loss all-reduces 3 numbers per token (max,
    sum of exponentials, target logit). Not counted: grad clipping's scalar all-reduces and the
    one-time broadcast of `share_rng_state`.
    """
    (B, T), elt = batch_shape, next(model.parameters()).element_size()
    B //= num_micro
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    d_model = model.tok_emb.embedding_dim if model.tok_emb is not None else norms[0].normalized_shape[0]
    act = B * T * d_model * elt
    exchanges = 4 * len(model.layers) + (model.tok_emb is not None) + (model.head is not None)
    if sequence_parallel:
        ops = [("all_gather", act), ("reduce_scatter", act)] * exchanges
        ops += [("all_reduce", p.numel() * elt) for m in norms for p in m.parameters()]
        if model.tok_emb is not None:
            ops.append(("all_gather", T * d_model * elt))
    else:
        ops = [("all_reduce", act)] * exchanges
    if model.head is not None:
        ops += [("all_reduce", B * T * elt)] * 3
    return ops * num_micro


def ring_bytes(op: str, nbytes: int, n: int) -> int:
    """Bytes one rank sends for `op` on a ring (comm.py's formulas)."""
    return {"all_reduce": ring_allreduce_bytes, "all_gather": ring_allgather_bytes,
            "reduce_scatter": ring_reduce_scatter_bytes}[op](nbytes, n)


def replicated_loss(loss_fn):
    """The loss as a plain tensor. Under loss_parallel it is a Replicate DTensor (the same value on
    every rank); the base step and `evaluate` add losses up in plain tensors and call .item()."""
    def loss(output, target):
        value = loss_fn(output, target)
        return value.full_tensor() if isinstance(value, DTensor) else value
    return loss


def share_rng_state(group, device: torch.device) -> None:
    """Every rank of `group` continues with the random generator state of the group's first rank."""
    cuda = device.type == "cuda"
    state = (torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()).to(device)
    dist.broadcast(state, src=dist.get_global_rank(group, 0), group=group)
    if cuda:
        torch.cuda.set_rng_state(state.cpu(), device)
    else:
        torch.set_rng_state(state.cpu())


class DropoutRng:
    """The same dropout masks on every tp rank, where the activations they act on are replicated.

    Plain TP keeps the activations between sub-layers replicated, so a dropout there must draw
    the same mask on every tp rank or the replicas drift apart. The trainer seeds each rank
    differently after the strategy is built (right for sequence parallelism, whose dropouts all
    act on shards), so the first step hands tp rank 0's generator state to the others. Attention
    dropout on the local heads then repeats across head groups; Megatron forks a per-rank stream there.
    """

    def __init__(self, cfg, topo):
        self.group, self.device = topo.group("tp"), topo.device
        self.pending = topo.size("tp") > 1 and cfg.model.dropout > 0 and not cfg.strategy.tensor.sequence_parallel

    def share_once(self) -> None:
        """At the first step (a broadcast, not counted: it is set-up), then never again."""
        if self.pending:
            self.pending = False
            share_rng_state(self.group, self.device)
