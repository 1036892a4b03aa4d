"""Time of one collective under the alpha-beta model (Hockney): steps x alpha + bytes on the wire / beta.

Ring algorithms, as NCCL and gloo run them for large messages (Thakur, Rabenseifner and Gropp,
"Optimization of Collective Communication Operations in MPICH", 2005): an all-reduce of S bytes
over n devices is a reduce-scatter then an all-gather, 2(n-1) steps moving 2(n-1)/n S bytes per
device; reduce-scatter and all-gather are n-1 steps and (n-1)/n S each. A point-to-point send is
one step of S bytes; a broadcast a tree of them. `link` is the slowest link the group crosses (Cluster.link).
"""
from __future__ import annotations

from paratrain.planner.hardware import Link


def all_reduce(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    alpha, beta = link.ab("all_reduce")
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / beta


def reduce_scatter(nbytes: float, n: int, link: Link, collective: str = "reduce_scatter") -> float:
    """`nbytes`: the whole (unsharded) tensor."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    alpha, beta = link.ab(collective)
    return (n - 1) * alpha + (n - 1) / n * nbytes / beta


def all_gather(nbytes: float, n: int, link: Link) -> float:
    """The same steps and bytes as a reduce-scatter, the other way round."""
    return reduce_scatter(nbytes, n, link, "all_gather")


def broadcast(nbytes: float, n: int, link: Link) -> float:
    """From one device to the others: a binomial tree, ceil(log2 n) steps of the whole message."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    alpha, beta = link.ab("broadcast")
    return (n - 1).bit_length() * (alpha + nbytes / beta)


def p2p(nbytes: float, link: Link) -> float:
    if nbytes <= 0:
        return 0.0
    alpha, beta = link.ab("p2p")
    return alpha + nbytes / beta


def wire_bytes_all_reduce(nbytes: float, n: int) -> float:
    """Bytes each device sends in a ring all-reduce (what paratrain's step records count)."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes
