"""Decentralized SGD by gossip: D-PSGD (Lian et al., "Can Decentralized Algorithms Outperform
Centralized Algorithms?", NeurIPS 2017), with SGP's one-peer exponential graph (Assran et al.,
"Stochastic Gradient Push for Distributed Deep Learning", ICML 2019).

There is no all-reduce and no global model. Each rank holds its own replica, takes a local
optimizer step on its data shard, then averages its parameters with its neighbours' only:

    ring:         x_i <- (x_{i-1} + x_i + x_{i+1}) / 3     (2 ranks: (x_0 + x_1) / 2)
    exponential:  at step t rank i sends to i + 2^k and receives from i - 2^k (mod n),
                  k = t mod ceil(log2 n), and x_i <- (x_i + x_{i-2^k}) / 2: one message a step.

Both mixing matrices are doubly stochastic, so the replicas' average moves exactly as if the
average of their local updates had been applied to it, while the spread between replicas
contracts geometrically; on n = 2^m ranks the exponential graph averages exactly in m steps.
(This is "adapt then combine": the local step first, then mixing; D-PSGD's box mixes the old
iterate and adds the gradient taken there, which differs in the order only.)

Each step records `neighbour_distance`: the L2 distance between this rank's parameters (after
its local step, before mixing) and the mean of the replicas it received. The distance to the
global mean would need an all-reduce of the whole model; the neighbours' is free, and it stays
at zero on every step only when all replicas agree (the graph, over its rounds, is connected).

With `strategy.compression.codec` set, the messages are compressed and the mixing is CHOCO-SGD's
(choco.py: public copies of the neighbours, compressed corrections to them, a consensus step of
`strategy.gossip.consensus_step`); ring graph only; PowerSGD is not taken (a DDP gradient hook).
`neighbour_distance` is then measured to the neighbours' public copies. Without a codec nothing
of that runs: the mixing above, exactly.

A step's logged `loss` is this rank's own batch's: gossip has no collective in which to average
it, and adding one (an all-reduce every step) would make every step a barrier over all ranks.
(The stop flag is one: a one-element all-reduce after each step, so that every rank stops at the
same step, and it is what finds a lost rank at the same step boundary on every survivor.)
Only parameters are gossiped (buffers stay local). Evaluation, a collective anyway, averages each
rank's own replica's loss on its shard of the held-out batches. Checkpoints store rank 0's
replica; resuming restarts every replica from it (and CHOCO's public copies from zero), so a
resumed run is not bit-identical to an uninterrupted one (the replicas' disagreement is reset to
zero, the exponential graph's rounds start again from 1).

A lost neighbour is routed around. The graph is drawn over the live ranks (`Replicas`,
replicas.py, shared with local SGD), so it closes over a gap. A rank whose neighbour's message
fails (a dead peer's connection closes at once; a hung one's after `run.timeout_s`) mixes with
the messages it did get, then agrees on the survivors with the others through the rendezvous
store; the ranks that were not its neighbours find the loss at the same step's stop flag (its
group was aborted). Every survivor therefore changes graph at the same step boundary, and the
next step's neighbours agree on who they are: no message is ever sent to a rank that does not
expect it. The survivors split each global batch among themselves from then on (`data_shard`); rank 0, which writes the
checkpoints, must stay up. With CHOCO every rank's public copies restart from zero after the
change (a new neighbour's copy of this rank would have missed its earlier messages).
"""
from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist

from paratrain import watchdog
from paratrain.comm import flatten, unflatten
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.strategies.base import StepStats, Strategy, local_eval, local_step
from paratrain.strategies.gossip.choco import ChocoGossip
from paratrain.strategies.replicas import Replicas


def num_hops(n: int) -> int:
    """Distinct exponential-graph distances 1, 2, 4, ... < n (SGP's peers)."""
    return max(1, (n - 1).bit_length())


def gossip_peers(rank: int, n: int, graph: str, step: int) -> tuple[list[int], list[int]]:
    """(ranks this rank sends to, ranks it receives from) at `step`, in dp-group ranks."""
    if n == 1:
        return [], []
    if graph == "ring":
        if n == 2:  # both neighbours are the same rank: one message, not two copies of it
            return [1 - rank], [1 - rank]
        neighbours = [(rank - 1) % n, (rank + 1) % n]
        return neighbours, neighbours
    hop = 2 ** (step % num_hops(n))
    return [(rank + hop) % n], [(rank - hop) % n]


def exchange(flat: torch.Tensor, group, send_to: list[int], recv_from: list[int]) -> tuple[dict, set[int]]:
    """Send `flat` to every peer in `send_to`, receive one vector from each in `recv_from` (global
    ranks); returns ({peer: vector received}, the peers whose message failed: lost).

    Every rank gossips a vector of the same length and dtype (the same model, fp32; or a packed
    CHOCO message, whose size depends only on the model and the codec), so the receive buffers
    are exactly the size of the messages: gloo needs no size header here. Each message is waited
    for on its own, all of them before returning, so that a failure names its peer and the live
    neighbours get this rank's messages whatever happened to the others.
    """
    received = {p: torch.empty_like(flat) for p in recv_from}
    works, failed = [], set()
    for peer, op, tensor in [*((p, dist.irecv, buf) for p, buf in received.items()),
                             *((p, dist.isend, flat) for p in send_to)]:
        try:
            works.append((peer, op(tensor, peer, group=group)))
        except RuntimeError:  # the connection is closed already
            failed.add(peer)
    for peer, work in works:
        try:
            work.wait()
        except RuntimeError:  # gloo: "Connection closed by peer", or the group's timeout
            failed.add(peer)
    return {p: buf for p, buf in received.items() if p not in failed}, failed


class Gossip(Strategy):
    name = "gossip"
    lockstep = False  # replicas update alone: own loss, own decision on non-finite updates

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        c = cfg.strategy.compression
        self.choco = (ChocoGossip(c.codec, c.ratio, cfg.strategy.gossip.consensus_step, topo.rank)
                      if c.codec != "none" else None)
        self.gossip_round = 0  # picks the exponential graph's peer; the same count on every rank
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.replicas = Replicas(topo.group("dp"), self.meter, cfg.run.timeout_s,
                                 functools.partial(watchdog.is_lost, cfg.run.dir), topo.device)
        self.generation = 0  # the replicas' membership the public copies were built in (CHOCO)

    def train_step(self, batch: Batch) -> StepStats:
        stats = local_step(self, batch)  # the local step on this rank's shard (no gradient all-reduce)
        distance = self.mix()
        nbytes, comm_s = self.meter.take()
        stats.bytes_sent += nbytes
        stats.comm_s += comm_s
        stats.wait_s += self.replicas.recovery_s  # agreeing on survivors after a loss
        self.replicas.recovery_s = 0.0
        stats.extra["neighbour_distance"] = distance
        return stats

    def data_shard(self) -> tuple[int, int]:
        return self.replicas.shard() or super().data_shard()  # after a loss: split over the survivors

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> list[float]:
        return self.replicas.mean(local_eval(self, batches).reshape(-1)).tolist()

    def agree_to_stop(self, signum: int) -> int:
        return int(self.replicas.max(signum))  # over the survivors: a loss found here is agreed on here

    def agree_on_members(self):
        return self.replicas.agree()

    @torch.no_grad()
    def mix(self) -> float:
        """Average this replica with the neighbours' (uniform weights; compressed: CHOCO's consensus
        step); returns the distance to them. The graph is over the live ranks; a neighbour lost
        here is left out of this step's mixing, and the survivors agree on a new graph."""
        ranks, me = self.replicas.ranks, self.topo.rank
        send_to, recv_from = gossip_peers(ranks.index(me), len(ranks), self.cfg.strategy.gossip.graph,
                                          self.gossip_round)
        send_to, recv_from = [ranks[i] for i in send_to], [ranks[i] for i in recv_from]
        self.gossip_round += 1
        if not recv_from:
            return 0.0
        if self.choco is not None and self.generation != self.replicas.generation:
            self.choco.reset()  # new neighbours: copies they never tracked (every rank resets at this step)
            self.generation = self.replicas.generation
        params = list(self.model.parameters())
        # One flat fp32 vector: one message per peer, whatever the number of tensors.
        flat = flatten(p.float() for p in params)
        message = flat if self.choco is None else self.choco.message(flat)  # CHOCO: the same size on every rank
        t0 = time.perf_counter()
        received, lost = exchange(message, self.replicas.group, send_to, recv_from)
        sent = len(set(send_to) - lost)
        self.meter.add(sent * message.numel() * message.element_size(), time.perf_counter() - t0,
                       uncompressed=sent * flat.numel() * flat.element_size())
        if lost:
            self.replicas.shrink(RuntimeError(f"lost gossip neighbour(s) {sorted(lost)}"))
        if not received:
            return 0.0
        if self.choco is not None:
            mixed, distance = self.choco.mix(flat, received)
        else:
            neighbours = torch.stack(list(received.values())).sum(0)
            distance = (flat - neighbours / len(received)).norm().item()
            mixed = (flat + neighbours) / (1 + len(received))
        for p, value in zip(params, unflatten(mixed, params)):  # in place: the optimizer's state stays attached
            p.copy_(value)
        return distance
