"""Hogwild!: lock-free asynchronous SGD on shared memory (Recht, Re, Wright and Niu,
"Hogwild!: A Lock-Free Approach to Parallelizing Stochastic Gradient Descent", NeurIPS 2011).

Several processes on one machine update one copy of the parameters, in shared memory, with no
locks and no communication: each takes its own batch, computes its gradient against whatever
the parameters hold at that moment, and adds its SGD update in place. An update that races with
another may be partly overwritten; the paper shows that when updates are sparse or small these
collisions cost little, and the processes' steps add up as if taken one after another.

The processes are started by torchrun (`paratrain run`), not forked, so nothing is inherited:
rank 0 writes the initial parameters, flat fp32, to a file under /dev/shm, every rank maps it
with `torch.from_file(shared=True)` and makes each parameter a view into that mapping. The file
is unlinked as soon as every rank has mapped it: the mapping lives on until the processes exit,
and a crashed run leaves nothing behind in /dev/shm.

Hogwild is defined for SGD: other optimizers are refused. SGD's momentum, if set, is each
process's own velocity (an extension; the paper's update is plain SGD). Gradients stay per
process, and the logged training loss is this rank's own (averaging it would be communication).
The model's fp32 buffers (BatchNorm's running statistics) live in the same mapping, updated in
place by every process's forward; integer buffers (BatchNorm's batch count) stay per process.
Every rank sees the same parameters and statistics, so rank 0's checkpoint is the whole state.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from paratrain.comm import flatten, unflatten
from paratrain.config import ConfigError
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.strategies.base import Strategy


def shared_path(run_dir: str) -> Path:
    """A name unique to this job and run: several trainings may share a job (tests)."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    job = os.environ.get("TORCHELASTIC_RUN_ID", "job")
    run = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return root / f"paratrain-hogwild-{job}-{run}.f32"


def share_tensors(params: list[torch.Tensor], path: Path, is_writer: bool, barrier) -> torch.Tensor:
    """Make `params` (parameters and fp32 buffers) views into one flat fp32 tensor mapped from
    `path`, shared by every rank."""
    numel = sum(p.numel() for p in params)
    if is_writer:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(flatten(params).numpy().tobytes())
        os.replace(tmp, path)  # nobody maps a half-written file
    barrier()
    flat = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    barrier()  # every rank has mapped it: the name is no longer needed
    if is_writer:
        path.unlink()
    for p, view in zip(params, unflatten(flat, params)):  # the same Parameter objects (the optimizer's)
        p.data = view  # now backed by shared memory
    return flat


class Hogwild(Strategy):
    """Every rank its own batches and its own gradients; one copy of the parameters for all."""

    name = "hogwild"
    lockstep = False  # replicas update alone: own loss, own decision on non-finite updates

    def __init__(self, cfg, topo, model, loss_fn):
        if topo.device.type != "cpu" or any(p.dtype != torch.float32 for p in model.parameters()):
            raise ConfigError(f"strategy.name = 'hogwild': needs fp32 parameters on the CPU "
                              f"(run.device resolved to '{topo.device.type}')")
        super().__init__(cfg, topo, model, loss_fn)
        params = list(self.model.parameters())  # tied parameters once
        # fp32 buffers (BatchNorm's running statistics) shared too: every process's forward updates
        # the one copy in place, lock-free, as the parameters are updated.
        buffers = [b for b in self.model.buffers() if b.dtype == torch.float32]
        self.shared = share_tensors(params + buffers, shared_path(cfg.run.dir), topo.is_main, self._barrier)
        self.optimizer = build_optimizer(cfg.optimizer, params)

    def _barrier(self) -> None:
        if self.topo.world_size > 1:
            dist.barrier(group=self.topo.group("dp"))

    def evaluate(self, batches: list[Batch]) -> list[float]:
        self._barrier()  # evaluate a still snapshot: every rank has finished its step
        return super().evaluate(batches)

    def load_state_dict(self, state: dict) -> None:
        # One writer, then wait: a rank that loaded late would erase another's first steps.
        if self.topo.is_main:
            super().load_state_dict(state)
        self._barrier()
