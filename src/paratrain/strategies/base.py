"""The strategy interface: how a parallel technique plugs into the trainer.

A strategy owns what one rank holds of the model, its optimizer and the communication of a
training step. The trainer gives it this rank's share of a global batch (the topology's dp
axis says which share) and gets `StepStats` back; it never knows which strategy runs.

Every member below is used by the trainer, the checkpointer or most strategies:

    name, lockstep, checkpoints_on_stop    what the trainer needs to know of the strategy
    __init__(cfg, topo, model, loss_fn)    builds everything, in the constructor (no template calls)
    model, optimizer                       what this rank computes with and steps (and .meter, the bytes)
    module                                 the plain model: what a checkpoint and the API return
    begin_step(step) -> step               before each step: the step it is (a recovering replica's quorum moves it on)
    train_step(batch) -> StepStats         one optimizer step
    evaluate(batches) -> float             held-out loss, averaged over the members
    set_lr(lr)                             the schedule's rate for the next step
    paused()                               around evaluation and checkpoints: not training time
    agree_to_stop(signum) -> signum        after each step: do all ranks stop here?
    agree_on_members() -> group            who is still in the job (a collective); callers pass it on
    close(run_dir) -> group                after the last step; returns the ranks that finished
    state_dict(group), load_state_dict     checkpoints: full tensors keyed by parameter name
    holds_unique_state                     whether this rank's state_dict goes into the checkpoint

Which kind of strategy overrides what:
- every strategy: `__init__` (wrap the model, build the optimizer); the plain local step
  (`local_step`, below) serves as `train_step` for single, local SGD, DiLoCo, gossip, Hogwild;
- data parallel (ddp, zero1-3) and tensor parallel: `train_step`, to pass `local_step` the context
  that accumulates without communicating (DDP's `no_sync`) or computes the loss on shards;
  zero1 (and pipelines) `state_dict` / `load_state_dict`, whose state torch's helpers cannot read;
  torchft replica groups (ddp, local SGD, DiLoCo: data_parallel/ft.py, local_sgd/ft.py)
  `begin_step`, where the step's quorum forms and a restarted group loads a healthy peer's state
  and step;
- strategies that own their schedule (pipelines, parameter-server workers): `train_step`,
  `evaluate`, and `close` (the pipeline timeline; the servers' final barrier);
- replicas that update alone (local SGD, DiLoCo, gossip, Hogwild, parameter-server workers):
  `lockstep = False`: a step's logged loss is this rank's own and each decides alone on a
  non-finite update; local SGD, gossip and the parameter server also `agree_to_stop` and
  `agree_on_members` in their own way (at synchronisations; over the survivors, replicas.py;
  at server 0), and local SGD's deadline pauses its clock in `paused`.
Ranks that serve instead of train (parameter servers) never reach the trainer: the layout names
them (`layout.ServerDims`) and the launcher runs the strategy's server there (`SERVERS`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn

from paratrain.comm import CommMeter
from paratrain.config import Config
from paratrain.data import Batch
from paratrain.evaluation import build_metrics, values
from paratrain.metrics import StepStats
from paratrain.nonfinite import check_update
from paratrain.topology import Topology

__all__ = ["StepStats", "Strategy", "full_state", "load_full_state", "local_eval", "local_part", "local_step",
           "state_bytes", "to_cpu"]


class Strategy:
    name: ClassVar[str]
    # Ranks take every step together: the logged loss is the mean over the global batch, and one
    # all-reduce a step lets them agree on a non-finite update. False: replicas that update alone.
    lockstep: ClassVar[bool] = True
    checkpoints_on_stop: ClassVar[bool] = True  # False where a signal cannot gather a checkpoint
    # Built with `example=`, this rank's inputs of one batch: a pipeline traces a model that has
    # no stage forward of its own on it (pipeline/split.py).
    traces_model: ClassVar[bool] = False

    model: nn.Module  # what this rank computes with (wrapped: DDP, FSDP, stages)
    optimizer: torch.optim.Optimizer | None  # None where this rank never steps (parameter-server workers)

    def __init__(self, cfg: Config, topo: Topology, model: nn.Module, loss_fn: Callable):
        """The model on this rank's device; each subclass then wraps it and builds `optimizer` over
        what it wrapped (build_optimizer(cfg.optimizer, params) in the plain case)."""
        self.cfg, self.topo, self.loss_fn = cfg, topo, loss_fn
        self.meter = CommMeter()
        self.metrics = build_metrics(cfg.training.eval_metrics)  # the trainer adds the API's
        self.model = model.to(topo.device)
        self.optimizer = None

    @property
    def module(self) -> nn.Module:
        """The plain model (what a checkpoint stores and the API returns)."""
        return self.model

    @property
    def holds_unique_state(self) -> bool:
        """One rank per pipeline stage contributes to a checkpoint (dp and tp copies are equal once full)."""
        return self.topo.axis_rank("dp") == 0 and self.topo.axis_rank("tp") == 0

    def data_shard(self) -> tuple[int, int]:
        """(which, of how many): this rank's slice of each global batch now. Strategies that go on
        without a lost replica split the batch over the survivors."""
        return self.topo.data_shard()

    def begin_step(self, step: int) -> int:
        """Before each step: the step this rank takes now, `step` itself unless the strategy's
        members agree on another (a replica group that rejoined and loaded a peer's state)."""
        return step

    def train_step(self, batch: Batch) -> StepStats:
        return local_step(self, batch)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> list[float]:
        """[loss, metric, ...] over the held-out batches, averaged over the members (evaluation.py)."""
        return self.meter.means(local_eval(self, batches), self.topo.group("dp"))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @contextmanager
    def paused(self):
        """Around what the trainer does between steps (evaluation, checkpoints)."""
        yield

    def agree_to_stop(self, signum: int) -> int:
        """After each step: this rank's pending signal (0: none) -> the one every rank stops on now
        (0: go on). Here one all-reduce over the world, since every rank takes every step together."""
        if self.topo.world_size == 1:
            return signum
        flag = torch.tensor([float(signum)], device=self.topo.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # not metered: no training traffic
        return int(flag.item())

    def agree_on_members(self):
        """The process group of the ranks still in the job (None: all of them), agreed on by them;
        the checkpointer gathers over it. Strategies that survive a lost rank return the survivors'."""
        return None

    def close(self, run_dir) -> object:
        """After the last step: write what this strategy alone records (collective on all ranks);
        returns the group of the ranks that finished (None: all), for the summary's gather."""
        return self.agree_on_members()

    # -- checkpoints: full (unsharded) tensors keyed by parameter name, so that a checkpoint
    # written under one layout loads under any other (torch.distributed.checkpoint.state_dict).
    def state_dict(self, group=None) -> dict:
        """What this rank holds, unsharded; a collective where parameters are sharded. `group`:
        the members `agree_on_members` returned for this checkpoint."""
        return full_state(self.module, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        load_full_state(self.module, self.optimizer, state)


# ---------------------------------------------------------------------------- shared steps


def local_step(s: Strategy, batch: Batch, accumulate: Callable = nullcontext,
               loss_context: Callable = nullcontext, commit: Callable[[], bool] = lambda: True) -> StepStats:
    """Forward and backward over the step's micro-batches, then one optimizer step.

    `accumulate()`: the context for every micro-batch but the last, whose gradients are summed
    without communicating (DDP's and FSDP's no_sync). `loss_context()`: around forward, loss and
    backward (tensor parallel: the loss on vocabulary shards). The logged loss is the mean over
    the dp group where the ranks step together (`lockstep`), else this rank's own. `commit()`:
    whether the update may be applied (torchft: every member of the step's quorum reduced its
    gradients); asked at every step, since it is a vote of all the members.
    """
    micro = batch.split(s.cfg.training.grad_accum_steps)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=s.topo.device)
    for i, mb in enumerate(micro):
        with accumulate() if i < len(micro) - 1 else nullcontext(), loss_context():
            loss = s.loss_fn(s.model(mb.inputs), mb.targets) / len(micro)
            loss.backward()
        loss_sum += loss.detach()
    t1 = time.perf_counter()
    if s.cfg.optimizer.grad_clip:
        nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.optimizer.grad_clip)
    finite = check_update(s, loss_sum, s.model.parameters())
    committed = commit()
    if finite and committed:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    loss = s.meter.mean(loss_sum, s.topo.group("dp")) if s.lockstep else loss_sum.item()
    nbytes, comm_s = s.meter.take()
    return StepStats(loss, batch.num_samples, batch.num_tokens, compute_s=t1 - t0, comm_s=comm_s,
                     optim_s=t2 - t1, bytes_sent=nbytes,
                     extra=({} if finite else {"nonfinite": True}) | ({} if committed else {"committed": False}))


@torch.no_grad()
def local_eval(s: Strategy, batches: list[Batch], loss_context: Callable = nullcontext) -> torch.Tensor:
    """This rank's mean [loss, metric, ...] over `batches` (its held-out shard), on its own model."""
    s.model.eval()
    with loss_context():
        total = sum(values(s.loss_fn, s.metrics, s.module(b.inputs), b.targets) for b in batches) / len(batches)
    s.model.train()
    return total.detach().float()


def state_bytes(s: Strategy) -> dict:
    """Bytes of parameters, gradients and optimizer state this rank holds: local shards only.

    Counts the parameters the optimizer updates (DTensors by their local shard), their
    gradients where present (the step sets them to None, so measure between backward and
    step to see them), and the optimizer's tensors (ZeroRedundancyOptimizer: this rank's share).
    Compare with ZeRO's per-rank model states for fp32 Adam: ddp 16P, ZeRO-1 4P + 4P + 8P/N,
    ZeRO-2 and ZeRO-3 16P/N here (FSDP2 shards the parameters at both stages).
    """
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    # a pipeline's one optimizer per local stage; ZeroRedundancyOptimizer: this rank's own optimizer
    optimizers = [getattr(o, "optim", o) for o in getattr(s.optimizer, "optimizers", [s.optimizer])]
    optim = [t for o in optimizers for st in o.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {"params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": _local_bytes(optim)}


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model", "optimizer"}: full tensors keyed by parameter name, on the CPU.

    torch's `get_state_dict` where parameters are sharded (DTensors: FSDP2, tensor parallel);
    for plain parameters the same format read from the module and the optimizer directly, which
    spares a worker the import of torch.distributed.checkpoint (0.6 s of start-up, measured).
    """
    model = module.state_dict()
    # Sharded anywhere (FSDP2 may hold some parameters unsharded between steps): torch's helper.
    if any(_is_dtensor(t) for t in (*module.parameters(), *model.values())):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))
    else:
        name_of = {id(p): n for n, p in module.named_parameters()}
        # state_dict()'s index order: the groups' parameters in turn
        optim = named_optimizer_state(optimizer, [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]])
    return {"model": to_cpu(model), "optimizer": to_cpu(optim)}


def named_optimizer_state(optimizer: torch.optim.Optimizer | None, names: list[str]) -> dict:
    """torch's index-keyed optimizer state -> keyed by parameter name (`names`, in index order), the
    form checkpoints hold and torch's get_state_dict gives."""
    if optimizer is None:
        return {"state": {}, "param_groups": []}
    sd = optimizer.state_dict()
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load the entries of a full, name-keyed state that `module` holds (any layout wrote it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    mine = set(module.state_dict())
    model = {k: v for k, v in state["model"].items() if k in mine}
    optim = _select_optim(state["optimizer"], mine)
    if not any(torch.is_tensor(v) and v.dim() for s in optim["state"].values() for v in s.values()):
        # Stateless optimizer (plain SGD): torch's loader cannot place it on a device; nothing to load.
        set_model_state_dict(module, model, options=StateDictOptions(full_state_dict=True))
        return
    set_state_dict(module, optimizer, model_state_dict=model, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))


def _is_dtensor(t) -> bool:
    # By its method, not isinstance: importing DTensor costs every process 0.5 s of start-up.
    return hasattr(t, "to_local")


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (FSDP2, tensor parallelism), a plain
    tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard; a plain tensor whole)."""
    return sum(t.numel() * t.element_size() for t in map(local_part, tensors))


def to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def _select_optim(optim: dict, names: set) -> dict:
    groups = [{**g, "params": [p for p in g["params"] if p in names]} for g in optim["param_groups"]]
    return {"state": {k: v for k, v in optim["state"].items() if k in names}, "param_groups": groups}
