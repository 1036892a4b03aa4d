"""The layout check: how a config's strategy places itself on N processes, or why it cannot.

`config.py` checks each value and the rules between values that know no strategy; every rule
that names a strategy or needs the process count lives here, in one place: the degrees each
strategy takes on a world size (`layout`), and the cross-section rules (which strategies take a
codec, hybrid's degrees, the parameter server's limits). The launcher's preflight calls it once,
before any worker starts; each worker calls it again to build its topology.

This module imports no strategy: checking a config must not import FSDP, pipelining or DTensor
(start-up time, and the strategies' own module-level setup). One function per family below.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from paratrain.config import Config, ConfigError, GossipConfig
from paratrain.topology import ParallelDims

# Which strategies send what a codec can compress (PowerSGD: a DDP gradient hook, ddp only).
COMPRESSING = ("ddp", "local_sgd", "diloco", "gossip", "parameter_server")
# Which strategies run as fault-tolerant replica groups (torchft; fault_tolerance.replica_groups).
FAULT_TOLERANT = ("ddp", "local_sgd", "diloco", "hybrid")


@dataclass(frozen=True)
class ServerDims(ParallelDims):
    """The parameter server's layout: dp = the W workers; the S servers are `servers` more ranks
    after them, on no mesh axis.

    Neither ParallelDims(dp=world) (the global batch would have to divide by W + S) nor
    ParallelDims(dp=W) (dp x pp x tp must be the world) fits; this keeps the batch check and the
    topology untouched, and the mesh (torch allows one smaller than the world) makes the workers'
    dp group with every rank taking part, as new_group requires."""
    servers: int = 0

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp + self.servers

    def trains(self, rank: int) -> bool:
        return rank < self.dp * self.pp * self.tp


def layout(cfg: Config, world_size: int) -> ParallelDims:
    """The parallel degrees of `cfg`'s strategy on `world_size` processes; ConfigError (one line
    naming the key, what is wrong and what is allowed) if it cannot run there."""
    s, t = cfg.strategy, cfg.training
    if s.name == "auto":
        raise ConfigError("strategy.name = 'auto': chosen by 'paratrain run' (the planner); under torchrun name a "
                          "strategy, e.g. the first of 'paratrain plan CONFIG --runnable'")
    if s.name not in _LAYOUTS:
        raise ConfigError(f"strategy.name = '{s.name}': not available; available: {', '.join(_LAYOUTS)}")
    _check_sections(cfg)
    groups = cfg.fault_tolerance.groups
    if cfg.faults.rank >= world_size * groups:
        raise ConfigError(f"faults.rank = {cfg.faults.rank}: there are only ranks 0..{world_size * groups - 1}")
    # torchft averages across groups only (data_parallel/ft.py): ddp's and local SGD's groups are one
    # process each; hybrid's dp axis is the groups, each one pp x tp mesh.
    per_group = s.pp * s.tp if s.name == "hybrid" else 1
    if groups > 1 and world_size != per_group:
        what = f"one pp x tp mesh of {per_group} processes" if s.name == "hybrid" else "one process"
        n = groups * per_group
        raise ConfigError(f"fault_tolerance.replica_groups = {groups}: each replica group of {s.name} is {what}; "
                          f"start {n} processes (--nproc {n}), not {world_size * groups}")
    if groups > 1 and s.name == "hybrid" and (s.dp > 1 or s.dp_mode != "replicate"):
        raise ConfigError(f"strategy.dp = {s.dp}, strategy.dp_mode = '{s.dp_mode}': with "
                          "fault_tolerance.replica_groups the replica groups are hybrid's dp axis (replicated); "
                          "leave strategy.dp = 0 and dp_mode = 'replicate'")
    dims = _LAYOUTS[s.name](cfg, world_size)
    dims.check(world_size)
    per_rank = dims.dp * groups * t.grad_accum_steps
    if t.global_batch_size % per_rank:
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size}: must be divisible by data-parallel ranks x "
            f"grad_accum_steps = {dims.dp * groups} x {t.grad_accum_steps}")
    return dims


def group_world(cfg: Config, processes: int) -> int:
    """The processes of one replica group when `processes` form `fault_tolerance.replica_groups`
    of them (all of them without replica groups): the world that `layout` places a strategy on."""
    groups = cfg.fault_tolerance.replica_groups
    if groups and processes % groups:
        raise ConfigError(f"fault_tolerance.replica_groups = {groups}: must divide the number of processes, "
                          f"{processes}")
    return processes // groups if groups else processes


def _check_sections(cfg: Config) -> None:
    """Rules between the strategy and the other sections that hold on any number of processes."""
    s = cfg.strategy
    if s.name != "hybrid":
        degrees = (("dp", s.dp, 0), ("pp", s.pp, 1), ("tp", s.tp, 1), ("dp_mode", s.dp_mode, "replicate"))
        for key, value, default in degrees:
            if value != default:
                raise ConfigError(f"strategy.{key} = {value!r}: only strategy.name = 'hybrid' takes degrees; "
                                  f"'{s.name}' uses every process on its own axis")
    codec = s.compression.codec
    if codec != "none" and s.name not in COMPRESSING:
        raise ConfigError(f"strategy.compression.codec = '{codec}': only strategy.name = "
                          f"{', '.join(repr(n) for n in COMPRESSING)} compresses; '{s.name}' takes 'none'")
    if codec == "powersgd" and s.name != "ddp":
        raise ConfigError(f"strategy.compression.codec = 'powersgd': {s.name} takes fp16, bf16, topk, randomk, sign "
                          "or int8 (PowerSGD is a DDP hook)")
    groups = cfg.fault_tolerance.replica_groups
    if groups and s.name not in FAULT_TOLERANT:
        raise ConfigError(f"fault_tolerance.replica_groups = {groups}: per-step fault tolerance serves strategy.name = "
                          f"{', '.join(repr(n) for n in FAULT_TOLERANT)}; '{s.name}' restarts from its newest "
                          "checkpoint (run.max_restarts) or survives a lost worker on its own")
    majority = groups // 2 + 1
    if groups > 2 and s.name in ("local_sgd", "diloco") and cfg.fault_tolerance.min_replicas < majority:
        # Measured with 3 and min_replicas = 1: one replica kept forming torchft quorums alone (its
        # Lighthouse reissues a quorum of the previous members at once) and trained apart to the
        # end. Two quorums with a majority each cannot both form: they would share a replica.
        raise ConfigError(f"fault_tolerance.min_replicas = {cfg.fault_tolerance.min_replicas}: {s.name} as {groups} "
                          f"replica groups needs a majority, min_replicas >= {majority}; with fewer, torchft's "
                          "quorums can leave a replica training apart (measured)")
    if groups and cfg.strategy.compression.codec != "none":
        raise ConfigError(f"strategy.compression.codec = '{codec}': fault_tolerance.replica_groups averages "
                          "gradients through torchft, uncompressed; use 'none'")
    if cfg.training.on_nonfinite == "skip" and s.name == "parameter_server":
        raise ConfigError("training.on_nonfinite = 'skip': parameter_server takes 'stop' (a worker's push is part "
                          "of the servers' protocol)")


# ---------------------------------------------------------------------------- one per family


def _single(cfg: Config, world_size: int) -> ParallelDims:
    if world_size != 1:
        raise ConfigError(f"strategy.name = 'single': runs on 1 process, not {world_size}; use --nproc 1")
    return ParallelDims()


def _data_parallel(cfg: Config, world_size: int) -> ParallelDims:
    return ParallelDims(dp=world_size)


def pipeline_settings(cfg: Config) -> tuple[str, int, int]:
    """(schedule, stages per rank, micro-batches); `model_parallel` is GPipe with one of each."""
    if cfg.strategy.name == "model_parallel":
        return "gpipe", 1, 1
    p = cfg.strategy.pipeline
    return p.schedule, p.virtual_stages, p.microbatches


MULTI_STAGE = {"interleaved_1f1b", "interleaved_zb", "zbv"}  # schedules that take a list of stages per rank


def check_pipeline(cfg: Config, pp: int, dp: int) -> None:
    """Pipeline constraints that need no model (the model's blocks: pipeline.check_model_split)."""
    p = cfg.strategy.pipeline
    schedule, v, m = pipeline_settings(cfg)
    if schedule in ("gpipe", "1f1b") and v != 1:
        raise ConfigError(f"strategy.pipeline.virtual_stages = {v}: schedule '{schedule}' takes 1 stage per rank; "
                          "use interleaved_1f1b or interleaved_zb for more")
    if schedule in ("interleaved_1f1b", "interleaved_zb") and v < 2:
        raise ConfigError(f"strategy.pipeline.virtual_stages = {v}: schedule '{schedule}' needs >= 2 stages per rank")
    if schedule == "zbv" and v != 2:
        raise ConfigError(f"strategy.pipeline.virtual_stages = {v}: schedule 'zbv' places exactly 2 stages per rank")
    if schedule in MULTI_STAGE and m % max(1, m // pp):
        raise ConfigError(f"strategy.pipeline.microbatches = {m}: schedule '{schedule}' needs a multiple of "
                          f"{max(1, m // pp)} (rounds of {pp} ranks)")
    if schedule == "1f1b" and m < pp:
        raise ConfigError(f"strategy.pipeline.microbatches = {m}: schedule '1f1b' needs at least one per stage "
                          f"({pp}); use more micro-batches or gpipe")
    local = cfg.training.global_batch_size // dp
    if local % m:
        raise ConfigError(f"strategy.pipeline.microbatches = {m}: must divide the per-rank batch "
                          f"{local} (training.global_batch_size / data-parallel ranks)")
    if cfg.training.grad_accum_steps != 1:
        raise ConfigError(f"training.grad_accum_steps = {cfg.training.grad_accum_steps}: pipelines accumulate over "
                          "micro-batches; set strategy.pipeline.microbatches instead")
    if p.split == "time" and cfg.model.name != "gpt":
        raise ConfigError(f"strategy.pipeline.split = 'time': measures the built-in gpt's blocks only; "
                          f"use 'params' or split_points for model.name = '{cfg.model.name}'")
    if cfg.model.name == "gpt" and pp * v > cfg.model.n_layer:
        raise ConfigError(f"model.n_layer = {cfg.model.n_layer}: fewer blocks than pipeline stages "
                          f"({pp} ranks x {v} virtual stages)")
    if p.split_points:
        check_split_points(p.split_points, cfg.model.n_layer if cfg.model.name == "gpt" else 10**9, pp * v)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The run of blocks a pipeline cuts between: the GPT's `layers`, an nn.Sequential's children,
    or another model's block list (`block_list`; its stages are traced, pipeline/split.py)."""
    if isinstance(getattr(model, "layers", None), nn.ModuleDict):
        return list(model.layers.values())
    if isinstance(model, nn.Sequential):
        return list(model)
    if (path := block_list(model)) is not None:
        return list(model.get_submodule(path))
    raise ConfigError(f"model: {type(model).__name__} cannot be split into pipeline stages: it has no run of "
                      "blocks; use the built-in gpt, an nn.Sequential, or a model whose blocks are one "
                      "nn.ModuleList of modules of one type (as transformers models' are)")


def is_traced(model: nn.Module) -> bool:
    """Whether a pipeline traces `model` into stages (pipeline/split.py): neither the GPT, whose
    stages are pruned copies, nor an nn.Sequential, whose stages are runs of its children."""
    return not (isinstance(getattr(model, "layers", None), nn.ModuleDict) or isinstance(model, nn.Sequential))


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of names under which one parameter is registered (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def block_list(model: nn.Module) -> str | None:
    """The name of the model's longest nn.ModuleList of two or more modules of one type (a
    transformers GPT-2's `transformer.h`, a Llama's `model.layers`): its blocks. The outermost where
    two are as long. None: it has none."""
    best, size = None, 1
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > size and len({type(b) for b in m}) == 1:
            best, size = name, len(m)
    return best


def check_split_points(points: tuple[int, ...], num_blocks: int, num_stages: int) -> list[int]:
    if len(points) != num_stages - 1 or list(points) != sorted(set(points)) or \
            (points and (points[0] < 1 or points[-1] >= num_blocks)):
        raise ConfigError(
            f"strategy.pipeline.split_points = {list(points)}: must be {num_stages - 1} increasing block "
            f"indices in 1..{num_blocks - 1} (the first block of every stage but the first)")
    return [0, *points]


def check_model_split(cfg: Config, model, pp: int, dp: int = 1) -> None:
    """The model (on the meta device in preflight) can be cut into pp x v stages: its blocks, any
    explicit split points."""
    v = pipeline_settings(cfg)[1]
    if pp * v == 1:  # one stage: the whole model, whatever it is (split.whole_model)
        return
    if is_traced(model) and dp > 1 and pp > 2 and (tied := tied_parameters(model)):
        # a middle stage without a copy would add a full-size zero to the other stages' dp shards
        raise ConfigError(f"strategy.pp = {pp}: {type(model).__name__} ties {tied[0]}, whose "
                          "copies on its pipeline stages are kept equal across them; with a sharded dp axis "
                          "that needs every pp rank to hold one: use pp = 2, or dp = 1")
    num_blocks = len(blocks_of(model))
    if pp * v > num_blocks:
        raise ConfigError(f"strategy: {pp * v} pipeline stages ({pp} ranks x {v}) for a model of {num_blocks} blocks")
    if cfg.strategy.pipeline.split_points:
        check_split_points(cfg.strategy.pipeline.split_points, num_blocks, pp * v)


def _pipeline(cfg: Config, world_size: int) -> ParallelDims:
    check_pipeline(cfg, pp=world_size, dp=1)
    return ParallelDims(pp=world_size)


def check_tensor_parallel(cfg: Config, tp: int) -> None:
    """The model can be split `tp` ways (tensor and hybrid)."""
    m = cfg.model
    if m.name != "gpt":  # the plan names the GPT's layers; other models have no plan
        raise ConfigError(f"model.name = '{m.name}': tensor parallelism splits the built-in GPT only; "
                          "use model.name = 'gpt' or another strategy")
    if m.n_head % tp:  # whole heads per rank (d_model % n_head == 0 then makes every width divisible)
        raise ConfigError(f"model.n_head = {m.n_head}: must be divisible by the tensor-parallel degree {tp}")
    if cfg.strategy.tensor.sequence_parallel and m.block_size % tp:  # equal sequence shards
        raise ConfigError(f"model.block_size = {m.block_size}: must be divisible by the tensor-parallel "
                          f"degree {tp} when strategy.tensor.sequence_parallel = true")


def _tensor(cfg: Config, world_size: int) -> ParallelDims:
    check_tensor_parallel(cfg, world_size)
    return ParallelDims(tp=world_size)


def _hybrid(cfg: Config, world_size: int) -> ParallelDims:
    s = cfg.strategy
    if world_size % (s.pp * s.tp):
        raise ConfigError(f"strategy.pp x strategy.tp = {s.pp} x {s.tp}: must divide the number of processes, "
                          f"{world_size}")
    dims = ParallelDims(dp=s.dp or world_size // (s.pp * s.tp), pp=s.pp, tp=s.tp)
    dims.check(world_size)
    if dims.tp > 1:
        check_tensor_parallel(cfg, dims.tp)
        if dims.pp > 1 and s.tensor.sequence_parallel:
            raise ConfigError("strategy.tensor.sequence_parallel = true: not with strategy.pp > 1 "
                              "(stages exchange whole-sequence activations)")
    check_pipeline(cfg, pp=dims.pp, dp=dims.dp)
    return dims


def _local_sgd(cfg: Config, world_size: int) -> ParallelDims:
    o = cfg.strategy.local_sgd
    if o.deadline == "auto" and o.sync_every == 1:
        raise ConfigError("strategy.local_sgd.deadline = 'auto': needs strategy.local_sgd.sync_every >= 2 "
                          "(a round of one step has no inner step to drop)")
    if cfg.strategy.name == "diloco" and o.outer_nesterov and o.outer_momentum == 0:
        raise ConfigError("strategy.local_sgd.outer_nesterov = true: needs strategy.local_sgd.outer_momentum > 0")
    return ParallelDims(dp=world_size)


def _gossip(cfg: Config, world_size: int) -> ParallelDims:
    g, codec = cfg.strategy.gossip, cfg.strategy.compression.codec
    if codec != "none" and g.graph != "ring":
        raise ConfigError(f"strategy.gossip.graph = '{g.graph}': compressed gossip (CHOCO-SGD) needs the same "
                          "neighbours at every step; use 'ring' or strategy.compression.codec = 'none'")
    if codec == "none" and g.consensus_step != GossipConfig.consensus_step:
        raise ConfigError(f"strategy.gossip.consensus_step = {g.consensus_step}: used only by compressed gossip; "
                          "set strategy.compression.codec or leave it at its default "
                          f"{GossipConfig.consensus_step}")
    return ParallelDims(dp=world_size)


def _hogwild(cfg: Config, world_size: int) -> ParallelDims:
    if cfg.optimizer.name != "sgd":
        raise ConfigError(f"optimizer.name = '{cfg.optimizer.name}': strategy 'hogwild' is lock-free SGD; "
                          "use optimizer.name = 'sgd'")
    if cfg.run.device == "cuda":
        raise ConfigError("run.device = 'cuda': strategy 'hogwild' shares parameters in CPU memory; use 'cpu'")
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    if local is not None and world is not None and local != world:  # set in workers, not in the launcher
        raise ConfigError(f"strategy.name = 'hogwild': shares memory on one machine; this job spans "
                          f"{world} processes, {local} of them here: run it on one node")
    return ParallelDims(dp=world_size)


def needs_gloo(device: str) -> ConfigError:
    # A server blocks in one receive per worker at once (parameter_server/protocol.Inbox); NCCL runs
    # a communicator's operations in order, so the first pending receive would hold up the others.
    return ConfigError(f"run.device = '{device}': parameter_server runs on gloo (CPU) only; use 'cpu'")


def _parameter_server(cfg: Config, world_size: int) -> ServerDims:
    servers, f, ps = cfg.strategy.ps.servers, cfg.faults, cfg.strategy.ps
    if servers >= world_size:
        raise ConfigError(f"strategy.ps.servers = {servers}: leaves no worker among {world_size} processes; "
                          f"use at most {world_size - 1}")
    workers = world_size - servers
    if cfg.run.device == "cuda":
        raise needs_gloo(cfg.run.device)
    if cfg.optimizer.grad_clip:
        raise ConfigError(f"optimizer.grad_clip = {cfg.optimizer.grad_clip}: parameter_server does not clip "
                          "(each server holds part of the gradient); set 0")
    if f.rank >= workers:
        raise ConfigError(f"faults.rank = {f.rank}: a server (ranks {workers}..{world_size - 1} serve); "
                          f"faults act on training steps: pick a worker, 0..{workers - 1}")
    if f.rank == 0 and max(f.kill_at_step, f.hang_at_step, f.leave_at_step) >= 1:
        raise ConfigError("faults.rank = 0: parameter_server's rank 0 is the chief worker (checkpoints, "
                          "summary) and cannot be lost; fault another worker")
    if ps.drop_behind and ps.mode != "ssp":
        raise ConfigError(f"strategy.ps.drop_behind = true: needs strategy.ps.mode = 'ssp', not '{ps.mode}' "
                          "(BSP waits for every worker by definition, ASP never waits)")
    return ServerDims(dp=workers, servers=servers)


_LAYOUTS: dict[str, Callable[[Config, int], ParallelDims]] = {
    "single": _single, "ddp": _data_parallel, "zero1": _data_parallel, "zero2": _data_parallel,
    "zero3": _data_parallel, "model_parallel": _pipeline, "pipeline": _pipeline, "tensor": _tensor,
    "hybrid": _hybrid, "gossip": _gossip, "hogwild": _hogwild, "local_sgd": _local_sgd, "diloco": _local_sgd,
    "parameter_server": _parameter_server}
