"""Gradient / delta compression codecs with error feedback, behind one interface.

A codec turns a flat fp32 tensor into a *payload* (a list of tensors: what goes on the wire)
and back. Codecs:

- `fp16`, `bf16`: cast (bf16 is our own: torch's bf16 DDP hook is CUDA-only).
- `topk`: the k = ceil(ratio * numel) largest magnitudes with their int32 indices (Stich et al.,
  "Sparsified SGD with Memory", NeurIPS 2018; Lin et al., "Deep Gradient Compression", ICLR 2018).
- `randomk`: k uniformly random coordinates, unscaled (with error feedback, as in Stich et al.).
- `sign`: scaled sign, 1 bit per element packed 8 to a byte plus one fp32 scale mean|x|
  (Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019).
- `int8`: QSGD-style stochastic quantization to 127 levels of max|x| (Alistarh et al., "QSGD",
  NeurIPS 2017): one fp32 scale plus an int8 per element; unbiased, |error| < scale / 127.
- PowerSGD (Vogels et al., NeurIPS 2019) is not here: DDP uses torch's own hook (see ddp_hooks).

Design: codecs are stateless; per-tensor state (`CodecState`: the error-feedback residual and a
random generator) is owned by the caller, one per tensor or DDP bucket, and passed to
`compress`, which reads and updates it. Error feedback (Seide et al. 2014; Stich et al. 2018):
x = input + residual; payload = encode(x); residual = x - decode(payload). Hence after every
step sum(inputs) - sum(decoded) = residual exactly (up to fp rounding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


SEED_STRIDE = 1_000_003  # a prime: streams of different ranks never share a seed


@dataclass
class CodecState:
    """What one tensor's compression remembers between steps (owned by the caller)."""
    residual: torch.Tensor | None = None  # error feedback: what was not sent yet
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @classmethod
    def seeded(cls, stream: int, index: int = 0, stride: int = SEED_STRIDE) -> "CodecState":
        """A state with random draws of its own (int8's rounding, random-k's picks), the same on
        every run: seed stride x stream + index, for a stream (a rank) and a tensor or peer in it."""
        return cls(generator=torch.Generator().manual_seed(stride * stream + index))

    def to_dict(self) -> dict:
        """What a checkpoint keeps: the residual and the generator's state."""
        return {"residual": self.residual, "generator": self.generator.get_state()}

    def load(self, saved: dict, device: torch.device | str = "cpu") -> None:
        self.residual = None if saved["residual"] is None else saved["residual"].to(device)
        self.generator.set_state(saved["generator"])


class Codec:
    """Flat fp32 tensor -> payload (list of tensors) -> tensor. Subclasses define encode/decode."""
    name = "none"
    # "allreduce": payloads of all ranks can be summed element-wise (fp16, bf16); "gather": they
    # must be gathered and decoded one by one (sparse, packed or individually scaled payloads).
    collective = "gather"

    def __init__(self, error_feedback: bool = True):
        self.error_feedback = error_feedback

    def compress(self, tensor: torch.Tensor, state: CodecState) -> list[torch.Tensor]:
        x = tensor.detach().reshape(-1).float()
        if self.error_feedback and state.residual is not None and state.residual.shape == x.shape:
            x = x + state.residual
        payload = self.encode(x, state)
        if self.error_feedback:
            state.residual = x - self.decompress(payload, x.shape)
        return payload

    def decompress(self, payload: list[torch.Tensor], shape) -> torch.Tensor:
        return self.decode(payload, math.prod(shape)).reshape(shape)

    @staticmethod
    def payload_bytes(payload: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in payload)

    def encode(self, x: torch.Tensor, state: CodecState) -> list[torch.Tensor]:
        raise NotImplementedError

    def decode(self, payload: list[torch.Tensor], numel: int) -> torch.Tensor:
        raise NotImplementedError


class Cast(Codec):
    """fp16 / bf16: half the bytes; relative error <= 2^-11 (fp16, in range) or 2^-8 (bf16)."""
    collective = "allreduce"

    def __init__(self, dtype: torch.dtype, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.dtype, self.name = dtype, {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

    def encode(self, x, state):
        return [x.to(self.dtype)]

    def decode(self, payload, numel):
        return payload[0].float()


class TopK(Codec):
    """The k largest |x| and their int32 indices: 8 k bytes."""
    name = "topk"

    def __init__(self, ratio: float, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.ratio = ratio

    def k(self, numel: int) -> int:
        return max(1, min(numel, math.ceil(self.ratio * numel)))

    def select(self, x: torch.Tensor, state: CodecState) -> torch.Tensor:
        return torch.topk(x.abs(), self.k(x.numel()), sorted=False).indices

    def encode(self, x, state):
        idx = self.select(x, state)
        return [x[idx], idx.to(torch.int32)]

    def decode(self, payload, numel):
        values, idx = payload
        return torch.zeros(numel, dtype=torch.float32).index_put_((idx.long(),), values.float())


class RandomK(TopK):
    """k coordinates drawn uniformly without replacement from the state's generator: 8 k bytes."""
    name = "randomk"

    def select(self, x, state):
        return torch.randperm(x.numel(), generator=state.generator)[: self.k(x.numel())]


class Sign(Codec):
    """scale * sign(x), scale = mean|x|: ceil(numel / 8) bytes of packed bits + a 4-byte scale."""
    name = "sign"

    def encode(self, x, state):
        bits = (x >= 0).to(torch.uint8)
        pad = (-bits.numel()) % 8
        bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
        packed = (bits * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)
        return [x.abs().mean().reshape(1), packed]

    def decode(self, payload, numel):
        scale, packed = payload
        bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS).ne(0).reshape(-1)[:numel]
        return (bits.float() * 2 - 1) * scale.float()


class Int8(Codec):
    """QSGD with s = 127 levels: q = sign(x) floor(127 |x| / max|x| + u), u ~ U[0, 1)."""
    name = "int8"
    LEVELS = 127

    def encode(self, x, state):
        scale = x.abs().max().reshape(1)
        if scale.item() == 0:
            return [scale, torch.zeros(x.numel(), dtype=torch.int8)]
        u = torch.rand(x.shape, generator=state.generator)
        q = torch.floor(x.abs() / scale * self.LEVELS + u).clamp_(max=self.LEVELS) * x.sign()
        return [scale, q.to(torch.int8)]

    def decode(self, payload, numel):
        scale, q = payload
        return q.float() * (scale.float() / self.LEVELS)


def make_codec(name: str, ratio: float = 0.01, error_feedback: bool = True) -> Codec:
    """A codec by its config name (`strategy.compression.codec`); not "none" or "powersgd"."""
    if name in ("fp16", "bf16"):
        return Cast(torch.float16 if name == "fp16" else torch.bfloat16, error_feedback)
    if name in ("topk", "randomk"):
        return (TopK if name == "topk" else RandomK)(ratio, error_feedback)
    if name == "sign":
        return Sign(error_feedback)
    if name == "int8":
        return Int8(error_feedback)
    raise ValueError(f"no codec {name!r}")  # config validation lets none through


def pack(payload: list[torch.Tensor]) -> torch.Tensor:
    """The payload as one uint8 buffer, for a single all_gather."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in payload])


def unpack(buf: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of `pack`, with the dtypes and sizes of `like` (every rank's payload has them)."""
    out, offset = [], 0
    for t in like:
        nbytes = t.numel() * t.element_size()
        out.append(buf[offset:offset + nbytes].clone().view(t.dtype).reshape(t.shape))
        offset += nbytes
    return out
