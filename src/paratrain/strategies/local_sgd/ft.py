"""Local SGD and DiLoCo as torchft replica groups: a lost replica is left out of the next
synchronisation, and a restarted one rejoins with the current weights.

Each replica is a replica group of one process, its own torchrun job (replica_groups.py). The
inner steps touch no network. Before every step each replica joins
that step's quorum of the replicas alive (torchft's Lighthouse; a message to it, no data); at a
synchronisation the collectives of `LocalSGD._sync` run over the quorum through the group's
Manager (`QuorumReplicas`), and the averaged parameters are applied only if the quorum commits.
A restarted replica, behind the others, loads a healthy replica's state at the first quorum it
joins (its parameters, DiLoCo's anchor and outer momentum, inner optimizer, the step count) and
goes on from their step (`begin_step`). Evaluation is each replica's own, on its shard.
"""
from __future__ import annotations

import sys

import torch
from torch.distributed import ReduceOp

from paratrain.comm import ring_allgather_bytes, ring_allreduce_bytes
from paratrain.strategies.base import local_eval
from paratrain.strategies.data_parallel.ft import (
    count_from,
    say_recovered,
    shut_down,
    torchft_manager,
    write_replica_record,
)
from paratrain.strategies.local_sgd.local_sgd import DiLoCo, LocalSGD


class QuorumReplicas:
    """What `Replicas` (replicas.py) offers local SGD, over a synchronisation's torchft quorum."""

    def __init__(self, manager, meter, replica: int, replicas: int):
        self.manager, self.meter, self.replica, self.count = manager, meter, replica, replicas
        self.ranks, self.group, self.generation, self.recovery_s = [replica], None, 0, 0.0

    def start(self) -> None:
        """Join this synchronisation's quorum (a recovering replica loads a healthy one's state here)."""
        self.manager.start_quorum()
        members = max(1, self.manager.num_participants())
        if members != len(self.ranks) and self.generation:  # the quorum changed: say so, once
            print(f"paratrain: replica group {self.replica}: {members} of {self.count} replica groups in the quorum "
                  f"(was {len(self.ranks)})", file=sys.stderr, flush=True)
        self.ranks, self.generation = list(range(members)), self.generation + 1

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        self.manager.allreduce(out).wait()  # the average over the quorum (a lost member: no commit)
        self.meter.add(ring_allreduce_bytes(out.numel() * out.element_size(), len(self.ranks)), 0.0)
        return out

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The quorum's rows: one all-reduce of a table in which each replica fills its own row."""
        table = torch.zeros(self.count, values.numel() + 1, dtype=values.dtype, device=values.device)
        table[self.replica, :-1], table[self.replica, -1] = values, 1.0
        self.manager.allreduce(table, reduce_op=ReduceOp.SUM).wait()
        self.meter.add(ring_allgather_bytes(table.numel() * table.element_size(), len(self.ranks)), 0.0)
        rows = table[table[:, -1] > 0, :-1]
        return rows if len(rows) else values.unsqueeze(0).clone()

    def gather_to_first(self, obj) -> dict:
        return {0: obj}  # each replica group is its own world of one; group 0 writes the checkpoints

    def shard(self) -> tuple[int, int] | None:
        """While replicas are missing from the quorum, the ones in it split each global batch."""
        rank = self.manager.participating_rank()
        return None if rank is None or len(self.ranks) >= self.count else (rank, len(self.ranks))


class _QuorumSync:
    """The replica-group parts of FaultTolerantLocalSGD and FaultTolerantDiLoCo."""

    def _join_replica_groups(self) -> None:
        self.manager = torchft_manager(self.cfg, self.topo, lambda: self.state_dict(),
                                       lambda state: self.load_state_dict(state))
        self.replicas = QuorumReplicas(self.manager, self.meter, self.topo.replica, self.topo.replicas)
        self.first_step = True

    def begin_step(self, step: int) -> int:
        """A quorum before every step, though data moves only at synchronisations: so that every
        replica meets the others at every step boundary, and one behind (restarted) loads a
        healthy one's state at the first boundary it reaches, mid-round included. (A quorum at
        synchronisations only, as torchft's own LocalSGD forms them, split 3 DiLoCo replicas for
        good, measured: the first to arrive formed a quorum alone, and torchft's Lighthouse then
        reissues quorums of the previous members at once.) A restored replica's Manager counts
        the synchronisations before its checkpoint's step."""
        if self.first_step:
            count_from(self.manager, self.cfg, self.topo, step // self.sync_every)  # its commits: syncs
            self.first_step = False
        self.replicas.start()
        if self.steps_done > step:
            say_recovered(self.topo, step, self.steps_done)
        return max(step, self.steps_done)

    def _sync(self, stats) -> None:
        params = [p.detach().clone() for p in self.module.parameters()]
        anchor = [a.clone() for a in self.anchor] if self.anchor is not None else None
        super()._sync(stats)
        if not self.manager.should_commit():  # a member was lost mid-way: keep this replica as it was
            with torch.no_grad():
                for p, old in zip(self.module.parameters(), params):
                    p.copy_(old)
                for a, old in zip(self.anchor or [], anchor or []):
                    a.copy_(old)
            stats.extra["committed"] = False

    @torch.no_grad()
    def evaluate(self, batches) -> list[float]:
        return local_eval(self, batches).tolist()  # this replica's own, on its shard: no data moves outside syncs

    def agree_on_members(self):
        return None  # each replica group's world is its own process

    def close(self, run_dir) -> object:
        write_replica_record(run_dir, self.topo, self.module, self.steps_done)
        shut_down(self.manager)
        return None


class FaultTolerantLocalSGD(_QuorumSync, LocalSGD):
    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        self._join_replica_groups()


class FaultTolerantDiLoCo(_QuorumSync, DiLoCo):
    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        self._join_replica_groups()
