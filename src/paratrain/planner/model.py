"""What one sample costs each block of a model: FLOPs, memory traffic, saved activations, parameters.

A model is a run of blocks (the GPT's layers, an `nn.Sequential`'s children; any other model is
one block), with the pieces before the first block (embeddings) and after the last (norm, head,
loss). Per block and per sample it takes:
- `flops`: forward FLOPs of its matrix products and attention (backward: twice that);
- `traffic`: bytes its other operations read and write (norms, activations, softmax, dropout,
  residual adds): these are bound by memory bandwidth, not by the matrix units;
- `saved`: bytes of activations autograd keeps for backward, each storage once (a view saved
  beside its base adds nothing; none, selective or full recomputation shrink them), and
  `boundary`: its output (what a pipeline stage sends on);
- `kinds`: the elements of operators a CPU core spends arithmetic on (GeLU, layer norm, softmax,
  attention's scores), which a calibrated CPU times per element;
- `params` and their tensors, and under tensor parallelism the bytes of its all-reduces.

Two ways in. `profile_module` counts them under `FakeTensorMode` (or on the meta device), so no
weight is allocated and a 1T-parameter model profiles on a laptop: torch's `FlopCounterMode` for
the FLOPs, autograd's `saved_tensors_hooks` for what backward keeps, and a dispatch mode for every
other operation's input and output bytes and its count. `transformer` writes them in closed form
for a GPT described only by its sizes (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models": per layer 24sh^2 + 4s^2h forward FLOPs and sbh(34 + 5as/h) bytes of
16-bit activations, 34sbh with selective recomputation, 2sbh with full).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Block:
    """One block, per sample, in the model's compute dtype."""
    params: int
    flops: float  # forward FLOPs (matrix products, attention)
    traffic: float  # bytes read and written by the other forward operations
    saved: float  # activation bytes kept for backward without recomputation
    saved_selective: float  # ... with selective recomputation (attention's s x s tensors recomputed)
    boundary: float  # the block's output (pipeline p2p; all full recomputation keeps)
    attn_flops: float = 0.0  # of `flops`, attention's (recomputed under selective recomputation)
    attn_traffic: float = 0.0  # of `traffic`, the attention core's (scores, softmax, dropout; recomputed too)
    tp_bytes: float = 0.0  # per forward, bytes each tensor-parallel all-reduce moves (2 per layer)
    tp_split: float = 1.0  # share of flops and traffic split by tensor parallelism (the rest replicated)
    # The weight matmuls (tokens x k) @ (k x n), for the wave quantization of GPU matmuls (cost.py):
    # (n, k, which of n / k tensor parallelism splits); tokens = seq x micro-batch.
    gemms: tuple = ()
    ops: float = 0.0  # operators its forward dispatches (each costs the framework's fixed overhead; cost.py)
    # Operators whose cost on a CPU core is their arithmetic (exponentials, erf, normalisation), not
    # the bytes they move: ((kind, elements, bytes), ...) per sample, timed by kind where the device
    # was calibrated (cost.py); their bytes are part of `traffic` too, which a GPU preset uses.
    kinds: tuple = ()
    tensors: int = 0  # parameter tensors (an eager optimizer pays a fixed cost per tensor; cost.py)


@dataclass(frozen=True)
class ModelProfile:
    name: str
    blocks: tuple[Block, ...]
    first: Block  # before the first block (embeddings); rides with the first stage
    last: Block  # after the last block (norm, head, loss); rides with the last stage
    bytes_per_value: int = 4  # the dtype the traffic and activations were counted in
    heads: int = 0  # attention heads (tensor parallelism must divide them; 0: not splittable)
    seq: int = 1  # tokens per sample
    hidden: int = 0

    @property
    def params(self) -> int:
        return self.first.params + self.last.params + sum(b.params for b in self.blocks)

    @property
    def flops(self) -> float:
        """Forward FLOPs of one sample through the whole model."""
        return self.first.flops + self.last.flops + sum(b.flops for b in self.blocks)

    def in_dtype(self, bytes_per_value: int) -> "ModelProfile":
        """The same model with activations and traffic in another dtype (bf16 mixed precision: 2)."""
        if bytes_per_value == self.bytes_per_value:
            return self
        f = bytes_per_value / self.bytes_per_value

        def scale(b: Block) -> Block:
            return replace(b, traffic=b.traffic * f, saved=b.saved * f, saved_selective=b.saved_selective * f,
                           boundary=b.boundary * f, tp_bytes=b.tp_bytes * f,
                           kinds=tuple((k, e, nbytes * f) for k, e, nbytes in b.kinds))

        return replace(self, blocks=tuple(map(scale, self.blocks)), first=scale(self.first), last=scale(self.last),
                       bytes_per_value=bytes_per_value)


# ---------------------------------------------------------------------------- closed form


def transformer(layers: int, hidden: int, heads: int, vocab: int, seq: int, ffn: int | None = None,
                bytes_per_value: int = 2, name: str = "") -> ModelProfile:
    """A GPT (pre-norm, GeLU MLP, learned positions, tied or untied head) from its sizes alone.

    Counts per sample (b = 1), in the notation of Korthikanti et al. 2022 (s sequence, h hidden,
    a heads, v vocabulary), with bytes for `bytes_per_value`-byte activations (their 16-bit
    figures scaled) and 1-byte dropout masks as in the paper:
    - FLOPs: 24sh^2 + 4s^2h per layer (QKV 6sh^2, scores and values 4s^2h, projection 2sh^2,
      MLP 16sh^2), 2shv for the logits;
    - saved: sh(34 + 5as/h) per layer; selective recomputation keeps 34sh; full keeps the input;
    - traffic of the other operations (each reads its input and writes its output once; a
      fused kernel counted once): layer norms 2 x 4sh, the attention core over the a x s x s
      scores 13as^2, bias-dropout-add twice 7sh each, GeLU over 4h 16sh (16-bit bytes);
    - tensor parallelism: 2 all-reduces of sh values per layer forward (and 2 backward).
    """
    s, h, a, v = seq, hidden, heads, vocab
    ffn = ffn or 4 * h
    bpv = bytes_per_value / 2  # the paper's figures are for 16-bit values
    params = 4 * h * h + 2 * h * ffn + 4 * h  # QKV + projection, MLP, two layer norms
    attn_flops = 4 * s * s * h
    flops = 2 * s * h * (4 * h) + 2 * s * h * ffn * 2 + attn_flops
    # The attention core over a x s x s scores, split by tensor parallelism: written by QK^T and read
    # by the product with V (2 + 2: these batched products of head_dim-deep operands are bound by
    # memory, not by the matrix units), softmax (2 + 2), dropout (2 + 2 + its 1-byte mask); GeLU over
    # the 4h-wide MLP reads and writes 16sh. Layer norms (2 x 4sh) and two bias-dropout-adds (2 x 7sh)
    # are replicated unless sequence parallel.
    attn_traffic = 13 * a * s * s
    split_traffic = attn_traffic + 4 * s * ffn
    whole_traffic = (8 + 14) * s * h  # norms, bias-dropout-adds: replicated (unless sequence parallel)
    traffic = (split_traffic + whole_traffic) * bpv
    saved = s * h * (34 + 5 * a * s / h) * bpv
    layer = Block(params=params, flops=flops, traffic=traffic, saved=saved, saved_selective=34 * s * h * bpv,
                  boundary=2 * s * h * bpv, attn_flops=attn_flops, attn_traffic=attn_traffic * bpv,
                  tp_bytes=2 * s * h * bpv, gemms=((3 * h, h, "n"), (h, h, "k"), (ffn, h, "n"), (h, ffn, "k")),
                  tp_split=split_traffic / (split_traffic + whole_traffic), tensors=12)
    first = Block(params=v * h + s * h, flops=0.0, traffic=(2 + 1) * s * h * bpv, saved=s * h * bpv,
                  saved_selective=s * h * bpv, boundary=2 * s * h * bpv, tensors=2)
    # final norm, logits (2shv FLOPs), cross entropy over fp32 logits (4sv bytes, read and written)
    last = Block(params=v * h + 2 * h, flops=2 * s * h * v, gemms=((v, h, "n"),),
                 traffic=(4 * s * h + 3 * 4 * s * v) * bpv,
                 saved=(2 * s * h + 4 * s * v) * bpv, saved_selective=(2 * s * h + 4 * s * v) * bpv,
                 boundary=4.0, tp_split=1.0, tensors=3)
    return ModelProfile(name or f"transformer L{layers} h{h} a{a} v{v} s{s}", (layer,) * layers, first, last,
                        bytes_per_value, heads=a, seq=s, hidden=h)


# ---------------------------------------------------------------------------- measured on meta


@dataclass
class _Tally:
    flops: float = 0.0
    traffic: float = 0.0
    saved: float = 0.0
    attn_flops: float = 0.0
    ops: int = 0
    kinds: dict = field(default_factory=dict)  # kind -> [elements, bytes]
    seen: set = field(default_factory=set)


def profile_module(model: nn.Module, sample: torch.Tensor, loss_fn: Callable | None = None, target=None,
                   blocks: list[nn.Module] | None = None, name: str = "", fake=None) -> ModelProfile:
    """Count `model` on one sample (`sample`: a batch of 1) without computing anything: under
    `fake` (a FakeTensorMode the model was built in: the CPU's own kernels are chosen, so attention
    saves what its fused kernel saves), or else on the meta device. `blocks` are the modules a
    pipeline cuts between (default: the GPT's layers, an nn.Sequential's children, else the whole
    model as one block)."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from paratrain.strategies.layout import blocks_of

    if fake is None and any(p.device.type != "meta" for p in model.parameters()):
        model = model.to("meta")
    blocks = blocks if blocks is not None else _blocks(model, blocks_of)
    tallies = [_Tally() for _ in range(len(blocks) + 2)]  # first, blocks..., last
    where = [0]  # index into tallies of the code running now
    outputs: dict[int, float] = {}
    params = {id(p) for p in model.parameters()}

    def enter(i):
        return lambda module, args: where.__setitem__(0, i)

    def leave(i):
        def hook(module, args, out):
            outputs[i] = _nbytes(out)
            where[0] = len(blocks) + 1  # after the last block: the model's end until another block starts
        return hook

    handles = []
    for i, b in enumerate(blocks, start=1):
        handles += [b.register_forward_pre_hook(enter(i)), b.register_forward_hook(leave(i))]

    # The CPU's fused attention (chosen under a fake CPU mode) has no formula of torch's own; it does
    # what every scaled-dot-product attention does.
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_attention: _attention_flops})
    counted = set(counter.flop_registry)

    class Traffic(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            packet = func._overloadpacket
            tally = tallies[where[0]]
            if not _free(packet) or packet in counted:
                tally.ops += 1
            name = str(packet).split(".")[-1]
            if name in ATTENTION:  # the scores its softmax exponentiates: batch x heads x queries x keys
                q, k = args[0], args[1]
                tally.kinds.setdefault("attention", [0.0, 0.0])[0] += q.numel() / q.shape[-1] * k.shape[-2]
            if packet in counted or _free(packet):
                return out
            if name.endswith("embedding"):  # reads the rows it gathers, not the whole table
                tally.traffic += 2 * _nbytes(out)
                return out
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            tally.traffic += nbytes
            if name in KINDS:
                kind = tally.kinds.setdefault(KINDS[name], [0.0, 0.0])
                kind[0] += args[0].numel()
                kind[1] += nbytes
            return out

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(base) not in params and not (base.is_leaf and base.requires_grad):
            tally = tallies[where[0]]
            # Each storage once, as memory.py measures it: a view saved beside its base (attention's
            # heads of a projection's output) holds no bytes of its own.
            storage = t.untyped_storage()
            if storage._cdata not in tally.seen:
                tally.seen.add(storage._cdata)
                tally.saved += storage.nbytes()
        return t

    inputs = (lambda t: fake.from_tensor(t)) if fake is not None else (lambda t: t.to("meta"))
    x = inputs(sample)
    try:
        with fake if fake is not None else contextlib.nullcontext(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter, Traffic():
            out = model(x)
            if loss_fn is not None and target is not None:
                loss_fn(out, inputs(target))
    finally:
        for h in handles:
            h.remove()
    by_module = counter.get_flop_counts()  # keyed "<root class>.<fqn>"
    root = type(model).__name__
    names = {m: f"{root}.{n}" if n else root for n, m in model.named_modules()}
    total = sum(by_module.get("Global", {}).values())
    block_flops = []
    for b in blocks:
        counts = by_module.get(names.get(b, ""), {})
        block_flops.append((sum(counts.values()), sum(v for k, v in counts.items() if _is_attention(k))))
    for tally, (f, a) in zip(tallies[1:-1], block_flops):
        tally.flops, tally.attn_flops = f, a
    rest = total - sum(f for f, _ in block_flops)
    tallies[-1].flops = rest  # outside the blocks (embeddings are lookups: no FLOPs; the head is)
    in_bytes = sample.numel() * sample.element_size()
    made = []
    for i, t in enumerate(tallies):
        p = (sum(q.numel() for q in blocks[i - 1].parameters()) if 0 < i <= len(blocks) else 0)
        boundary = outputs.get(i, in_bytes)
        n_tensors = len(list(blocks[i - 1].parameters())) if 0 < i <= len(blocks) else 0
        made.append(Block(params=p, flops=t.flops, traffic=t.traffic, saved=t.saved,
                          saved_selective=t.saved, boundary=boundary, attn_flops=t.attn_flops, ops=t.ops,
                          kinds=tuple((k, e, b) for k, (e, b) in sorted(t.kinds.items())), tensors=n_tensors))
    inside = sum(b.params for b in made)
    outside = sum(p.numel() for p in model.parameters()) - inside
    first = replace(made[0], params=_first_params(model, blocks, outside))
    outside_tensors = len(list(model.parameters())) - sum(b.tensors for b in made)
    first = replace(first, tensors=_first_params(model, blocks, outside, count=True))
    last = replace(made[-1], params=outside - first.params, tensors=outside_tensors - first.tensors)
    dtype_bytes = next((p.element_size() for p in model.parameters()), 4)
    heads = 0
    if hasattr(model, "layers") and blocks and hasattr(blocks[0], "attn"):  # the built-in GPT: tensor-splittable
        heads = blocks[0].attn.q.out_features // blocks[0].attn.head_dim
    return ModelProfile(name or type(model).__name__, tuple(made[1:-1]), first, last, dtype_bytes, heads=heads,
                        seq=sample.shape[1] if sample.dim() > 1 else 1)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _is_attention(op) -> bool:
    return "attention" in str(op) or str(op).endswith("bmm")


def _blocks(model: nn.Module, blocks_of) -> list[nn.Module]:
    try:
        return list(blocks_of(model))
    except (TypeError, AttributeError, ValueError):
        return [model]


def _first_params(model: nn.Module, blocks, outside: int, count: bool = False) -> int:
    """Parameters before the first block: the GPT's embeddings (an nn.Sequential has none); with
    `count`, how many tensors they are."""
    if isinstance(model, nn.Sequential) or blocks == [model]:
        return 0
    return sum(1 if count else p.numel() for n, m in model.named_children() if n in ("tok_emb", "pos_emb")
               for p in m.parameters())


def _nbytes(out) -> float:
    return float(sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(out)
                     if isinstance(t, torch.Tensor)))


# Operators timed by kind on a calibrated CPU (calibrate.py measures each kind's seconds per element,
# forward and backward): aten's name -> kind. Attention's kind counts its scores (ATTENTION).
KINDS = {"gelu": "gelu", "silu": "silu", "tanh": "tanh", "sigmoid": "sigmoid", "native_layer_norm": "layer_norm",
         "_log_softmax": "softmax", "_softmax": "softmax"}
ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}

_FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "reshape", "unsqueeze", "squeeze",
         "slice", "select", "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "arange",
         "empty", "zeros", "ones", "full", "lift_fresh", "new_empty", "empty_like",
         "zeros_like", "ones_like", "scalar_tensor", "is_same_size"}


def _free(packet) -> bool:
    """Operations that move no data (views, allocations): not counted as traffic."""
    name = str(packet)
    return name.split(".")[-1] in _FREE or name.startswith(("aten::sym", "prim", "aten.sym"))
