"""Compressed gossip: CHOCO-SGD (Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization
and Gossip Algorithms with Compressed Communication", ICML 2019).

Compressing plain gossip's messages does not converge to consensus: each message's compression
error is mixed into the replicas and never corrected. CHOCO-Gossip keeps on every node public
copies x_hat of itself and of its neighbours, which every holder updates by the same messages,
so they stay identical everywhere; a node sends only a compressed correction of its own copy:

    q_i      = C(x_i - x_hat_i)                          what the public copy lacks, compressed
    send q_i to the neighbours, receive each neighbour's q_j
    x_hat_j += q_j   for j = i and each neighbour        every copy moves by what was sent
    x_i     += gamma * sum_j w_ij (x_hat_j - x_hat_i)    consensus step towards the neighbours' copies

after the local optimizer step (CHOCO-SGD), with gossip's mixing weights w_ij = 1 / (1 + degree).
What C dropped stays in x_i - x_hat_i and goes out in later messages, so the codec's own error
feedback is not used (it would send the same error twice). The copies start at zero, as in the
paper. A node stores one copy per neighbour (two on a ring) besides its own, rather than only
their sum (which would save memory): each copy then takes exactly the additions its owner's own
copy takes, bit for bit, so the average of the replicas stays put to fp32 rounding of one step
instead of drifting as the rounding of a separate sum accumulates (measured: 1e-4 after 400
rounds on a ring of 4, against 1e-6). With
an exact codec and gamma = 1 this is plain gossip: x_hat = x after every step, and x_i becomes
the neighbourhood average.

The neighbours must be the same at every step (the ring), or a copy would miss the messages
sent while its holder was not a neighbour. gamma (`strategy.gossip.consensus_step`) must shrink
as compression grows (the paper tunes it per codec and model).

This class is the local arithmetic, no communication; gossip.py sends the messages.
"""
from __future__ import annotations

import torch

from paratrain.compression.codecs import CodecState, make_codec, pack, unpack


class ChocoGossip:
    def __init__(self, codec: str, ratio: float, consensus_step: float, rank: int):
        self.codec = make_codec(codec, ratio, error_feedback=False)  # CHOCO's x - x_hat is the error feedback
        self.gamma = consensus_step
        self.state = CodecState.seeded(rank)  # int8 / random-k draws
        self.x_hat: torch.Tensor | None = None  # this node's public copy
        self.copies: dict[int, torch.Tensor] = {}  # the neighbours' public copies, by rank
        self._like: list[torch.Tensor] = []  # a payload's dtypes and sizes: every node's are the same

    def reset(self) -> None:
        """Every copy back to zero, as at the start: the neighbours changed (a lost rank routed
        around, gossip.py), and a new neighbour's copy would have missed its earlier messages."""
        self.x_hat, self.copies = None, {}

    def message(self, x: torch.Tensor) -> torch.Tensor:
        """q_i = C(x_i - x_hat_i), packed into one uint8 buffer; this node's copy moves by it."""
        if self.x_hat is None:
            self.x_hat = torch.zeros_like(x)
        payload = self.codec.compress(x - self.x_hat, self.state)
        self.x_hat += self.codec.decompress(payload, x.shape)
        self._like = payload
        return pack(payload)

    def mix(self, x: torch.Tensor, received: dict[int, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """The neighbours' messages ({rank: packed q}) applied to their copies, then the consensus
        step; returns the new x_i and its distance from the mean of the neighbours' copies."""
        for peer, buf in received.items():
            copy = self.copies.setdefault(peer, torch.zeros_like(x))
            copy += self.codec.decompress(unpack(buf, self._like), x.shape)
        neighbours = torch.stack([self.copies[peer] for peer in received]).sum(0)
        degree = len(received)
        distance = (x - neighbours / degree).norm().item()
        step = self.gamma / (1 + degree) * (neighbours - degree * self.x_hat)
        return x + step, distance
