"""Data parallelism that loses and regains replicas without stopping: per-step fault tolerance
through torchft (github.com/pytorch/torchft, the PyTorch project's fault-tolerance library: a
quorum of replica groups per step, live recovery of a restarted group from a healthy peer).

The processes form replica groups (`fault_tolerance.replica_groups`), each its own torchrun job
and failure domain (replica_groups.py starts them). torchft's Lighthouse forms a quorum of the
groups alive at each step; a `Manager` per group averages the gradients over that quorum through a
process group it rebuilds whenever the quorum changes, and commits the step only if every
member's all-reduce succeeded (`should_commit`). A killed group is restarted by its own agent; at
its first quorum it is behind, and the Manager loads a healthy peer's model and optimizer state
over HTTP (`_live_state`) and hands it the quorum's step (`begin_step`), so it rejoins where the
others are. The others never stop: while a group is missing they average over fewer replicas
and split the whole global batch among themselves (`QuorumStep.data_shard`; torchft's own sampler
leaves the missing group's share out).

Each ddp replica group is one process, as in torchft's own DDP example: torchft's DDP averages
across groups only, and a group of several processes would need its own all-reduce inside
first. The DDP wrapper is torch's, as torchft builds it (a dummy group soaks up DDP's start-up
broadcast; buckets are never rebuilt, which would make a recovering replica's differ); the
comm hook is ours, to count bytes and time as every strategy does. `QuorumStep` (the quorum
before a step, the vote after it) is shared with the hybrid mesh, whose groups are pp x tp
meshes of several processes (hybrid.FaultTolerantHybrid).
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.

import hashlib
import json
import logging
import os
import re
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from paratrain import messages
from paratrain.comm import CommMeter, counted, ring_allreduce_bytes
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.restarts import attempt
from paratrain.strategies.base import StepStats, Strategy, full_state, load_full_state, local_part, local_step
from paratrain.topology import LIGHTHOUSE_ENV


def torchft_manager(cfg, topo, state_dict, load_state_dict):
    """This replica group's torchft Manager: quorum and recovery before each step's work (not
    overlapped with it), so the step it is at is known; `state_dict()` is what a recovering group
    loads from this one (`load_state_dict`), over torchft's HTTP transport."""
    from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

    # torchft logs each failed collective with its traceback, and each recovery as a warning;
    # paratrain says both in one line.
    logging.getLogger("torchft").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # torch's, on a recovery
    ft, timeout = cfg.fault_tolerance, timedelta(seconds=cfg.run.timeout_s)
    pg = ProcessGroupNCCL(timeout=timeout) if topo.device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
    local = os.environ.get(LIGHTHOUSE_ENV, "").startswith("http://127.0.0.1:")
    return Manager(
        pg=pg, min_replica_size=ft.min_replicas, load_state_dict=load_state_dict, state_dict=state_dict,
        replica_id=f"paratrain_{topo.replica}",
        # A quorum may wait for the Lighthouse to give up on a silent group (its heartbeat timeout,
        # at most run.timeout_s), then for the stragglers' join window: more than one timeout.
        timeout=timeout, quorum_timeout=2 * timeout + timedelta(seconds=10), connect_timeout=timeout,
        use_async_quorum=False,
        init_sync=False,  # every group starts from the same seed, bit for bit
        **({"hostname": "127.0.0.1"} if local else {}),  # a one-machine run: peers on the loopback only
    )


def wait_for_every_group(run_dir, topo, timeout_s: float) -> None:
    """On a fresh start, before the first quorum: every replica group's Manager is up (a file per
    group in the run directory). Otherwise the first group to get here forms a quorum alone while
    the others still start, and trains on alone (torchft's Lighthouse waits only for groups it has
    heard from; measured: DiLoCo's first replica trained half the run alone)."""
    start = re.sub(r"[^A-Za-z0-9]+", "_", os.environ.get(LIGHTHOUSE_ENV, "")).strip("_")  # this start's own
    ready = Path(run_dir) / "replica_groups" / start
    ready.mkdir(parents=True, exist_ok=True)
    (ready / f"ready{topo.replica}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(ready.glob("ready*"))) < topo.replicas and time.monotonic() < deadline:
        time.sleep(0.05)


def count_from(manager, cfg, topo, commits: int) -> None:
    """Before this group's first step: its Manager counts `commits` steps committed (restored from a
    checkpoint, or none), and on a fresh start it waits for every group's (wait_for_every_group)."""
    manager.load_state_dict({"step": commits, "batches_committed": commits * topo.replicas})
    if attempt() == 0:
        wait_for_every_group(cfg.run.dir, topo, cfg.run.timeout_s)


def say_recovered(topo, step: int, now: int) -> None:
    """The one line of a group that was behind and has loaded a healthy group's state (said by its
    first process)."""
    if topo.group_rank == 0:
        print(f"paratrain: replica group {topo.replica}: at step {step}, the others at {now}: loaded a healthy "
              "group's state, going on from there", file=sys.stderr, flush=True)


def write_replica_record(run_dir, topo, module: nn.Module, step: int) -> None:
    """`metrics/replica_group<G>.json`: what this group ended with (its step, restarts and a digest
    of its parameters, every process's part of them, which every group that finished together
    shares). Collective over the group's processes."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = local_part(t)  # a tensor-parallel shard: this process's part
        digest.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if topo.world_size > 1:  # the group's parts, in rank order
        parts = messages.gather(digest.hexdigest(), dst=0)
        digest = hashlib.sha256("".join(parts).encode()) if parts is not None else digest
    if topo.group_rank == 0:
        path = Path(run_dir) / "metrics" / f"replica_group{topo.replica}.json"
        path.write_text(json.dumps({"replica_group": topo.replica, "step": step, "restarts": attempt(),
                                    "params_sha256": digest.hexdigest()}))


def shut_down(manager) -> None:
    """After the last step: the Manager's servers and threads, then its process group, ended while
    Python still runs, not left to the interpreter's exit (where a hybrid group's process was
    sometimes aborted from C++ after its last line of Python, "terminate called without an active
    exception": 1 run in 5 to 7 before, 1 in 12 after this, measured; cli.py's worker then leaves
    without the teardown: 0 in 12)."""
    manager.shutdown(wait=True)
    manager._pg.shutdown()  # torchft's ProcessGroup: drops the gloo/NCCL group it wraps


class _HookState:
    def __init__(self, manager, meter: CommMeter):
        self.manager, self.meter = manager, meter


def ft_allreduce_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The bucket averaged over this step's quorum (torchft's Manager.allreduce): a member lost
    mid-step makes it a no-op, and the step is then not committed."""
    t0 = time.perf_counter()
    buf = bucket.buffer()
    # Waited for here, as torchft's own hook does: its result is the average, or (a member lost
    # mid-step) what was left in the buffer, and then the step is not committed.
    state.manager.allreduce(buf).wait()
    done = torch.futures.Future()
    done.set_result(buf)
    nbytes = ring_allreduce_bytes(buf.numel() * buf.element_size(), max(1, state.manager.num_participants()))
    return counted(state.meter, nbytes, t0, done)


class QuorumStep:
    """A step that is one torchft quorum's: formed before the step's work, voted on after it. The
    replica-group parts that ddp and the hybrid mesh share (`self.manager`: torchft_manager)."""

    first_step = True

    def begin_step(self, step: int) -> int:
        """The quorum of this step: who is in it, and (a group behind the others: just restarted)
        the healthy peer's state loaded here. A group restored from a checkpoint starts its Manager
        at that step, so that a whole job restarted together continues there. A step that was not
        committed leaves the Manager's count where it was: the trainer takes that step again."""
        if self.first_step:
            count_from(self.manager, self.cfg, self.topo, step)
            self.first_step = False
        self.manager.start_quorum()
        now = self.manager.current_step()
        if now > step:  # behind: restarted, or cut off for a while
            say_recovered(self.topo, step, now)
        return now

    def data_shard(self) -> tuple[int, int]:
        """After the step's quorum: while groups are missing, the groups in it split the whole
        global batch among themselves, so the missing ones' share is still trained on (torchft's
        own sampler leaves it out); with every group present, the usual layout."""
        rank, n = self.manager.participating_rank(), self.manager.num_participants()
        if rank is None or not 0 < n < self.topo.replicas:
            return super().data_shard()
        dp_rank, dp_size = self.topo.axis_rank("dp"), self.topo.size("dp")  # hybrid's groups: dp 1
        return rank * dp_size + dp_rank, n * dp_size

    def voted(self, stats: StepStats) -> StepStats:
        """The step's record with the groups it averaged over; a step not committed said in one line."""
        stats.extra["replicas"] = self.manager.num_participants()
        if "committed" in stats.extra and self.topo.group_rank == 0:
            error = self.manager.errored()
            why = str(error.original_exception).partition("\n")[0] if error else "another group's vote"
            print(f"paratrain: replica group {self.topo.replica}: step {self.manager.current_step() + 1} not committed "
                  f"({why}); taking it again with the groups still alive", file=sys.stderr, flush=True)
        return stats


class FaultTolerantDDP(QuorumStep, Strategy):
    name = "ddp"

    def __init__(self, cfg, topo, model, loss_fn):
        super().__init__(cfg, topo, model, loss_fn)
        from torchft.process_group import ProcessGroupDummy

        self.manager = torchft_manager(cfg, topo, self._live_state, self._load_live)
        self.model = DistributedDataParallel(self.model, process_group=ProcessGroupDummy(0, 1),
                                             find_unused_parameters=True)
        self.model.register_comm_hook(_HookState(self.manager, self.meter), ft_allreduce_hook)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())

    def train_step(self, batch: Batch) -> StepStats:
        return self.voted(local_step(self, batch, accumulate=self.model.no_sync, commit=self.manager.should_commit))

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def close(self, run_dir) -> object:
        write_replica_record(run_dir, self.topo, self.module, self.manager.current_step())
        shut_down(self.manager)
        return None

    # What a recovering group loads from a healthy one (torchft's HTTP transport, while the
    # Manager allows it: between a commit and the next step's optimizer update).
    def _live_state(self) -> dict:
        return full_state(self.module, self.optimizer)

    def _load_live(self, state: dict) -> None:
        load_full_state(self.module, self.optimizer, state)
