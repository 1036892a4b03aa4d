"""The parameter server's push and pull through a codec, with error feedback both ways.

`strategy.compression.codec` (paratrain.compression.codecs: fp16, bf16, int8, topk, randomk,
sign) on both links of every worker and server shard; the algorithm around it is in
parameter_server.py. Bidirectional compression with error compensation, as in DoubleSqueeze
(Tang et al., "DoubleSqueeze: Parallel Stochastic Gradient Descent with Double-Pass
Error-Compensated Compression", ICML 2019), here with the downlink sending model differences:

- Push (uplink): each worker compresses its gradient for each server shard with error feedback
  (Seide et al. 2014; Stich et al., NeurIPS 2018): a residual per worker and shard carries what
  compression dropped into the next push (`strategy.compression.error_feedback`).
- Pull (downlink): the server sends the compressed difference between its current parameters and
  the copy this worker holds, a copy the server keeps as the worker reconstructs it (`sent`).
  Both sides add the same decoded payload to the same fp32 copy, so they stay equal bit for bit,
  and whatever a payload dropped is still in the next difference: error feedback on the stream of
  updates, with no residual of its own (it is always on, whatever `error_feedback` says).

A payload's size is fixed by the codec and the shard's size (topk / randomk: k = ceil(ratio x
numel) values and int32 indices; int8: a byte per element and an fp32 scale; sign: a bit per
element and an fp32 scale; fp16 / bf16: 2 bytes per element), so the receiver posts a buffer of
exactly that size before the message comes (gloo aborts the process on a size mismatch); it
travels as one uint8 buffer (`codecs.pack`). With no codec the flat tensors go as they are,
in the parameters' dtype (`codec is None`: the plain path, the reference).

Costs: a worker holds an fp32 copy of the model and a residual of each shard; a server holds one
fp32 copy of its shard per worker. Checkpoints keep all of them and the codecs' random generators
(int8, randomk), so a resumed run continues exactly (parameter_server.py saves them).
"""
from __future__ import annotations

import torch

from paratrain.compression.codecs import Codec, CodecState, make_codec, pack, unpack
from paratrain.config import CompressionConfig

# Generator seeds: distinct per (worker, server shard) on each link (push: CodecState's own stride).
_PULL_STRIDE = 2_000_029


def _codecs(cfg: CompressionConfig) -> tuple[Codec | None, Codec | None]:
    """The push codec (error feedback as configured) and the pull codec (implicit: none of its own)."""
    if cfg.codec == "none":
        return None, None
    return make_codec(cfg.codec, cfg.ratio, cfg.error_feedback), make_codec(cfg.codec, cfg.ratio, False)


class Link:
    """One shard on the wire in one direction: a flat tensor as it is, or a codec's packed payload."""

    def __init__(self, codec: Codec | None, numel: int, dtype: torch.dtype):
        self.codec, self.numel, self.dtype = codec, numel, dtype
        # The payload's tensors for this size (their shapes and dtypes): how to unpack a buffer.
        self.like = codec.encode(torch.zeros(numel), CodecState()) if codec is not None else None

    def empty(self) -> torch.Tensor:
        """A buffer of exactly the message's size, to receive into."""
        if self.codec is None:
            return torch.empty(self.numel, dtype=self.dtype)
        return torch.empty(Codec.payload_bytes(self.like), dtype=torch.uint8)

    def encode(self, flat: torch.Tensor, state: CodecState) -> torch.Tensor:
        return flat if self.codec is None else pack(self.codec.compress(flat, state))

    def decode(self, buf: torch.Tensor) -> torch.Tensor:
        """The flat values a buffer carries: the buffer itself, or the codec's fp32 reconstruction."""
        return buf if self.codec is None else self.codec.decompress(unpack(buf, self.like), (self.numel,))


class WorkerLinks:
    """A worker's side: per server shard, the push residual and the replica the pulls rebuild."""

    def __init__(self, cfg: CompressionConfig, rank: int, shard_numels: list[int], dtype: torch.dtype):
        push, pull = _codecs(cfg)
        self.compressed = push is not None
        self.push = [Link(push if n else None, n, dtype) for n in shard_numels]  # an idle server: nothing to code
        self.pull = [Link(pull if n else None, n, dtype) for n in shard_numels]
        self.states = [CodecState.seeded(rank + 1, s)
                       for s in range(len(shard_numels))]
        self.replicas: list[torch.Tensor | None] = [None] * len(shard_numels)  # fp32, made at the first pull

    def encode_push(self, s: int, grad: torch.Tensor) -> torch.Tensor:
        return self.push[s].encode(grad, self.states[s])

    def reply_buffer(self, s: int) -> torch.Tensor:
        return self.pull[s].empty()

    def apply_pull(self, s: int, buf: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """The shard's new flat values: the reply itself, or this worker's copy plus the decoded difference."""
        if not self.compressed:
            return buf
        if self.replicas[s] is None:  # the values the server's copy started from (see ServerLinks.start)
            self.replicas[s] = torch.cat([p.detach().reshape(-1).float() for p in params])
        self.replicas[s] += self.pull[s].decode(buf)
        return self.replicas[s]

    def state(self) -> list[dict]:
        return [st.to_dict() for st in self.states]

    def load(self, push: list[dict] | None, replicas: list[torch.Tensor | None]) -> None:
        """A checkpoint's residuals (None: start from zero) and the copies the servers kept of ours."""
        for st, saved in zip(self.states, push or [None] * len(self.states)):
            if saved is not None:
                st.load(saved)
        self.replicas = [None if r is None else r.clone().float() for r in replicas]


class ServerLinks:
    """A server's side: the push decoder, and per worker the copy it sent and the pull's generator."""

    def __init__(self, cfg: CompressionConfig, index: int, numel: int, dtype: torch.dtype, num_workers: int):
        push, pull = _codecs(cfg)
        self.compressed = push is not None and numel > 0  # an idle server (more servers than tensors): nothing
        self.push, self.pull = (Link(c if self.compressed else None, numel, dtype) for c in (push, pull))
        self.states = [CodecState.seeded(index + 1, w, stride=_PULL_STRIDE)
                       for w in range(num_workers)]
        self.sent: list[torch.Tensor | None] = [None] * num_workers

    def start(self, params: list[torch.Tensor]) -> None:
        """Before the first message: every worker holds these values (unless a checkpoint said otherwise)."""
        if self.compressed:
            flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            self.sent = [flat.clone() if s is None else s for s in self.sent]

    def decode_push(self, buf: torch.Tensor) -> torch.Tensor:
        return self.push.decode(buf).to(self.push.dtype)

    def encode_pull(self, worker: int, flat: torch.Tensor) -> torch.Tensor:
        """What to send `worker` so that it holds `flat` (exactly, or up to the codec's loss)."""
        if not self.compressed:
            return flat
        buf = self.pull.encode(flat.float() - self.sent[worker], self.states[worker])
        # Decoded from the very bytes the worker gets: the two copies cannot drift apart.
        self.sent[worker] += self.pull.decode(buf)
        return buf

    def state(self) -> dict:
        return {w: {"sent": self.sent[w], **st.to_dict()} for w, st in enumerate(self.states)}

    def load(self, saved: dict) -> None:
        for w, st in enumerate(self.states):
            if w in saved:
                st.load(saved[w])
                self.sent[w] = saved[w]["sent"].clone().float()
