"""Typed, frozen configuration tree, loaded from TOML and `--set section.key=value`.

Every value is checked once, before any worker starts (`load_config` + `validate`). A bad value
raises `ConfigError` whose message is one line naming the key, the bad value and what is
allowed; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """Bad user input (config, CLI, data, checkpoint): one line, exit code 2."""


def _check(pred, allowed: str):
    """Field metadata: a predicate on the value and the words that say what is allowed."""
    return {"check": (pred, allowed)}


POSITIVE = _check(lambda v: v > 0, "a number > 0")
AT_LEAST_1 = _check(lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE = _check(lambda v: v >= 0, "a number >= 0")
FRACTION = _check(lambda v: 0 <= v < 1, "a number in [0, 1)")
OPEN_FRACTION = _check(lambda v: 0 < v < 1, "a number in (0, 1)")
A_STEP = _check(lambda v: v == -1 or v >= 1, "a step number >= 1 (steps count from 1), or -1 for never")
IMPORT_PATH = _check(lambda v: v == "" or _is_import_path(v), "'package.module:function' or empty")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _is_import_path(value: str) -> bool:
    module, _, attr = value.partition(":")
    return bool(module and attr) and all(p.isidentifier() for p in module.split(".") + attr.split("."))


@dataclass(frozen=True)
class ModelConfig:
    # Built-in models, or "custom": `factory` names a function returning an nn.Module.
    name: Literal["gpt", "mlp", "custom"] = "gpt"
    factory: str = field(default="", metadata=IMPORT_PATH)  # model.name = "custom": "pkg.mod:fn" -> nn.Module
    options: dict = field(default_factory=dict)  # keyword arguments for `factory`
    loss: str = field(default="", metadata=IMPORT_PATH)  # "pkg.mod:fn(output, target) -> scalar"
    # GPT (character level, nanoGPT-style)
    n_layer: int = field(default=4, metadata=AT_LEAST_1)  # GPT: transformer blocks
    n_head: int = field(default=4, metadata=AT_LEAST_1)  # GPT: attention heads per block
    d_model: int = field(default=128, metadata=AT_LEAST_1)  # GPT: width (divisible by n_head)
    block_size: int = field(default=64, metadata=AT_LEAST_1)  # GPT: context length in characters
    dropout: float = field(default=0.0, metadata=FRACTION)  # GPT: dropout probability
    # MLP (10 -> hidden -> 1 regression)
    hidden: int = field(default=20, metadata=AT_LEAST_1)  # MLP: hidden width (10 -> hidden -> 1 regression)
    # BatchNorm layers normalise with the whole data-parallel batch's statistics (SyncBatchNorm) instead
    # of each rank's share: ddp, zero1-3 and hybrid's dp axis then train what `single` trains.
    sync_batchnorm: bool = False


@dataclass(frozen=True)
class DataConfig:
    # pydoc: CPython's pydoc topics (shipped with Python); text: any UTF-8 file at `path`;
    # synthetic: regression data for the MLP; custom: `factory(split, config)` -> Dataset.
    name: Literal["pydoc", "text", "synthetic", "custom"] = "pydoc"
    path: str = ""  # data.name = "text": the UTF-8 file
    factory: str = field(default="", metadata=IMPORT_PATH)  # data.name = "custom": "pkg.mod:fn(split, config)"
    num_samples: int = field(default=4096, metadata=AT_LEAST_1)  # synthetic: how many samples
    eval_fraction: float = field(default=0.1, metadata=OPEN_FRACTION)  # share held out for evaluation
    seed: int = 0  # the data's own seed (the split, synthetic samples)


@dataclass(frozen=True)
class DDPConfig:
    bucket_mb: float = field(default=25.0, metadata=POSITIVE)  # DDP's gradient bucket size (MiB)
    gradient_as_bucket_view: bool = True  # gradients are views into DDP's buckets (saves a copy)


@dataclass(frozen=True)
class ZeroConfig:
    # FSDP2 MixedPrecisionPolicy for zero2 / zero3: parameters and gradients in this dtype,
    # fp32 master weights and optimizer state.
    mixed_precision: Literal["off", "bf16"] = "off"  # zero2 / zero3 compute dtype (fp16 would need loss scaling)


@dataclass(frozen=True)
class PipelineConfig:
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv"] = "1f1b"  # torch's schedule
    microbatches: int = field(default=4, metadata=AT_LEAST_1)  # per data-parallel rank and step
    virtual_stages: int = field(default=1, metadata=AT_LEAST_1)  # stages per rank (interleaved: >= 2)
    split: Literal["params", "time"] = "params"  # balance stages by parameter count or measured time
    split_points: tuple[int, ...] = ()  # explicit: index of the first block of every stage but the first


@dataclass(frozen=True)
class TensorConfig:
    sequence_parallel: bool = False  # shard activations along the sequence in norms and dropout


@dataclass(frozen=True)
class LocalSGDConfig:
    sync_every: int = field(default=8, metadata=AT_LEAST_1)  # H: local steps between synchronisations
    # DiLoCo's outer optimizer, applied to the averaged pseudo-gradient (start - local parameters)
    outer_lr: float = field(default=0.7, metadata=POSITIVE)
    # DiLoCo: the outer SGD's momentum. 0.5, not the paper's 0.9 (chosen for H = 500 on large models):
    # at H = 8, 0.9 made the MLP's eval loss rise to 2.3x its best; 0.5 was stable on the GPT, the MLP
    # and transformers' GPT-2 (benchmarks/diloco_defaults.py)
    outer_momentum: float = field(default=0.5, metadata=FRACTION)
    outer_nesterov: bool = True  # DiLoCo: Nesterov momentum in the outer SGD
    # Stragglers (DropCompute): "auto" bounds each round of H steps by time, H x the fastest rank's
    # median step time x (1 + deadline_slack); a rank behind it drops its remaining inner steps.
    # "off": every rank computes every step, and the round lasts as long as its slowest rank.
    deadline: Literal["off", "auto"] = "off"
    deadline_slack: float = field(default=0.1, metadata=NON_NEGATIVE)  # deadline = "auto": the margin


@dataclass(frozen=True)
class GossipConfig:
    graph: Literal["ring", "exponential"] = "ring"  # whom each rank averages with
    # With strategy.compression.codec (CHOCO-SGD): step size gamma towards the neighbours' public copies.
    consensus_step: float = field(default=0.5, metadata=_check(lambda v: 0 < v <= 1, "a number in (0, 1]"))


@dataclass(frozen=True)
class ParameterServerConfig:
    servers: int = field(default=1, metadata=AT_LEAST_1)  # the last ranks serve, the rest train (rank 0 trains)
    mode: Literal["bsp", "asp", "ssp"] = "ssp"  # synchronous, asynchronous, or stale-synchronous (bounded)
    staleness: int = field(default=2, metadata=NON_NEGATIVE)  # SSP: how far a worker may run ahead
    # SSP: instead of a faster worker waiting for a straggler, the straggler's late steps are
    # dropped (not computed) and gradients staler than the bound discarded (parameter_server.py)
    drop_behind: bool = False


@dataclass(frozen=True)
class CompressionConfig:
    # What ddp sends per gradient bucket, local_sgd / diloco per delta, gossip per message (CHOCO-SGD)
    # and the parameter server per push and pull (paratrain.compression).
    codec: Literal["none", "fp16", "bf16", "powersgd", "topk", "randomk", "sign", "int8"] = "none"
    # topk, randomk: the share of the elements sent
    ratio: float = field(default=0.01, metadata=_check(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    rank: int = field(default=4, metadata=AT_LEAST_1)  # powersgd: rank of the low-rank approximation
    error_feedback: bool = True  # carry what compression dropped into the next step


@dataclass(frozen=True)
class StrategyConfig:
    # "auto": the planner's fastest synchronous plan for the process count on the calibrated machine
    name: Literal["single", "ddp", "zero1", "zero2", "zero3", "model_parallel", "pipeline", "tensor",
                  "hybrid", "local_sgd", "diloco", "gossip", "hogwild", "parameter_server", "auto"] = "ddp"
    # Degrees for `hybrid` (dp = 0: whatever the world size leaves after pp x tp).
    dp: int = field(default=0, metadata=NON_NEGATIVE)  # hybrid: data-parallel degree (0: the rest)
    pp: int = field(default=1, metadata=AT_LEAST_1)  # hybrid: pipeline stages
    tp: int = field(default=1, metadata=AT_LEAST_1)  # hybrid: tensor-parallel degree
    dp_mode: Literal["replicate", "shard"] = "replicate"  # hybrid's dp axis: DDP-like or ZeRO-3
    ddp: DDPConfig = field(default_factory=DDPConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tensor: TensorConfig = field(default_factory=TensorConfig)
    local_sgd: LocalSGDConfig = field(default_factory=LocalSGDConfig)  # local_sgd and diloco
    gossip: GossipConfig = field(default_factory=GossipConfig)
    ps: ParameterServerConfig = field(default_factory=ParameterServerConfig)
    # ddp (gradients), local_sgd and diloco (deltas at each sync), gossip (CHOCO-SGD messages), ps (push, pull)
    compression: CompressionConfig = field(default_factory=CompressionConfig)


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "adamw"  # torch.optim's
    lr: float = field(default=1e-3, metadata=POSITIVE)  # peak learning rate
    momentum: float = field(default=0.0, metadata=FRACTION)  # sgd's momentum
    nesterov: bool = False  # sgd: Nesterov momentum
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)  # decoupled for adamw, L2 otherwise
    # adam / adamw: the moments' decay rates
    betas: tuple[float, float] = field(default=(0.9, 0.95),
                                       metadata=_check(lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"))
    eps: float = field(default=1e-8, metadata=POSITIVE)  # adam / adamw: added to the denominator
    schedule: Literal["constant", "cosine"] = "constant"  # the learning rate after warm-up
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)  # linear warm-up from 0 to lr
    # cosine: the final learning rate, as a fraction of lr
    min_lr_ratio: float = field(default=0.1, metadata=_check(lambda v: 0 <= v <= 1, "a number in [0, 1]"))
    grad_clip: float = field(default=0.0, metadata=NON_NEGATIVE)  # max global gradient norm; 0 = off


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = field(default=300, metadata=AT_LEAST_1)  # optimizer steps in all
    global_batch_size: int = field(default=32, metadata=AT_LEAST_1)  # samples per optimizer step
    grad_accum_steps: int = field(default=1, metadata=AT_LEAST_1)  # micro-batches per step and rank
    seed: int = 1234  # initial weights, dropout and the order of batches
    eval_every: int = field(default=100, metadata=NON_NEGATIVE)  # evaluate every N steps; 0 = only at the end
    # held-out batches per evaluation; "all": every whole global batch of the held-out split (a last
    # partial batch is left out, as in training)
    eval_batches: int | Literal["all"] = field(
        default=4, metadata=_check(lambda v: v == "all" or v >= 1, 'an integer >= 1 or "all"'))
    # Metrics on the held-out batches beside the loss: "accuracy", "perplexity", or "pkg.mod:fn(output,
    # target)" returning the batch's mean (evaluation.py)
    eval_metrics: tuple[str, ...] = field(default=(), metadata=_check(
        lambda v: all(n in ("accuracy", "perplexity") or _is_import_path(n) for n in v),
        '"accuracy", "perplexity" or \'package.module:function\' names'))
    log_every: int = field(default=10, metadata=AT_LEAST_1)  # console progress every this many steps
    # A NaN or Inf loss or gradient on any rank: "stop" the job before the update (non-zero exit,
    # naming the step and rank), or "skip" the update on every rank and count it (nonfinite.py).
    on_nonfinite: Literal["stop", "skip"] = "stop"


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True  # write checkpoints (the final one at least)
    every: int = field(default=0, metadata=NON_NEGATIVE)  # checkpoint every N steps; 0 = only at the end
    keep: int = field(default=2, metadata=AT_LEAST_1)  # the newest this many are kept


@dataclass(frozen=True)
class RunConfig:
    dir: str = ""  # empty: runs/<name>-NNN, the next free number
    name: str = "run"  # names runs/<name>-NNN
    nproc: int = field(default=1, metadata=AT_LEAST_1)  # local worker processes
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # auto: cuda where available (gloo on CPU, NCCL on CUDA)
    threads_per_rank: int = field(default=1, metadata=AT_LEAST_1)  # torch threads per process on CPU
    # Process-group timeout; below a second even a healthy step's collectives time out.
    timeout_s: float = field(default=300.0, metadata=_check(lambda v: v >= 1, "a number of seconds >= 1"))
    # Restarts of the whole group after a worker fails (torch's elastic agent): each continues from the
    # newest checkpoint that verifies. 0: a failure ends the run.
    max_restarts: int = field(default=3, metadata=NON_NEGATIVE)
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # auto: a bar at a terminal, else lines
    # Each rank also writes its scalars (losses, lr, throughput, bytes, the step's time split) for
    # TensorBoard, with torch's SummaryWriter, to <run dir>/tensorboard/rank<R> (needs `tensorboard`).
    tensorboard: bool = False


@dataclass(frozen=True)
class FaultsConfig:
    """Injected at one rank, for tests, benchmarks and demos of the asynchronous strategies."""
    rank: int = -1  # the faulty rank; -1: none
    slowdown: float = field(default=1.0, metadata=_check(lambda v: v >= 1, "a number >= 1"))  # its compute takes x this
    delay_s: float = field(default=0.0, metadata=NON_NEGATIVE)  # it waits this much more per step
    # Before this step (steps count from 1; -1: never) the rank gets SIGKILL from itself: a crash, as an
    # out-of-memory kill or a lost machine is (exit -9, no clean-up).
    kill_at_step: int = field(default=-1, metadata=A_STEP)
    # Before this step, SIGSTOP from itself: frozen, alive, silent (a hung driver, a stalled host).
    hang_at_step: int = field(default=-1, metadata=A_STEP)
    # Before this step, it exits with code 0 without a word to its peers: a worker that quits, not a crash.
    leave_at_step: int = field(default=-1, metadata=A_STEP)
    # The rank's training loss is NaN at this step (steps count from 1; -1: never). Under a pipeline only the
    # last stage computes a loss: a fault on an earlier stage injects nothing.
    nan_at_step: int = field(default=-1, metadata=A_STEP)


@dataclass(frozen=True)
class FaultToleranceConfig:
    """Per-step fault tolerance of data parallelism through torchft (strategies/data_parallel/ft.py):
    the processes form replica groups, each its own torchrun job; a lost group is restarted by its
    own agent and recovers the current weights from a peer while the others train on."""
    # How many replica groups (torchtitan's fault_tolerance.group_size); 0: off.
    replica_groups: int = field(default=0, metadata=_check(lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2"))
    min_replicas: int = field(default=1, metadata=AT_LEAST_1)  # a step commits only with this many groups in it
    # The Lighthouse (torchft's quorum server), http://host:port; empty: `paratrain run` starts one on 127.0.0.1.
    lighthouse: str = ""

    @property
    def groups(self) -> int:
        """How many replica groups the processes form: 1 without fault tolerance."""
        return max(1, self.replica_groups)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, *assignments: str) -> "Config":
        """A copy with `section.key=value` assignments applied and validated."""
        return from_dict(_apply_sets(self.to_dict(), assignments))


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """TOML (or the JSON a launcher wrote) plus `--set` overrides -> a checked `Config`."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            text = path.read_text()
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            kind = path.suffix.lstrip(".").upper() or "TOML"
            raise ConfigError(f"config file '{path}' is not valid {kind}: {e}") from None
    return from_dict(_apply_sets(raw, overrides))


def _apply_sets(raw: dict, assignments: typing.Iterable[str]) -> dict:
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in assignments:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set '{item}': expected section.key=value")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{p}' is a value, not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return raw


def _parse_value(text: str) -> Any:
    try:  # TOML literals: 3, 0.5, true, "s", [1, 2]; anything else is a bare string
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"did you mean '{prefix}{near[0]}'? " if near else ""
            raise ConfigError(f"{prefix}{key}: unknown key; {hint}allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        kwargs[name] = _convert(hints[name], raw[name], key)
        if "check" in f.metadata:
            pred, allowed = f.metadata["check"]
            if not pred(kwargs[name]):
                raise ConfigError(f"{key} = {raw[name]!r}: must be {allowed}")
    return cls(**kwargs)


# Types whose TOML value is taken as it is, once its kind is right (bool is an int in Python: not here).
_PLAIN = {bool: ("true or false", lambda v: isinstance(v, bool)),
          int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str)), dict: ("a table", lambda v: isinstance(v, dict))}


def _convert(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):  # int | Literal["all"]: the first that takes it
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, key)
            except ConfigError as e:
                errors.append(str(e).split(": must be ", 1)[-1])
        raise ConfigError(f"{key} = {value!r}: must be {' or '.join(errors)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(map(str, choices))}")
        return value
    if tp in _PLAIN:
        what, ok = _PLAIN[tp]
        if not ok(value):
            raise ConfigError(f"{key} = {value!r}: must be {what}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r}: must be a finite number")
        return float(value)
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: must be a list")
        return tuple(_convert(typing.get_args(tp)[0], v, key) for v in value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} = {value!r}: must be a list of {len(args)} numbers")
        return tuple(_convert(a, v, key) for a, v in zip(args, value))
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this file, not user input


# ---------------------------------------------------------------------------- cross-field checks


def validate(cfg: Config) -> None:
    """Checks that span several keys and know no strategy (strategies.layout has those, and the
    ones that need the process count)."""
    m, d, t = cfg.model, cfg.data, cfg.training
    if not _PLAIN_NAME.fullmatch(cfg.run.name):  # it names a directory under runs/
        raise ConfigError(f"run.name = {cfg.run.name!r}: must be a plain name (letters, digits, '-', '_', '.'; "
                          "not starting with '.'); use run.dir for a path")
    if m.name == "gpt" and m.d_model % m.n_head:
        raise ConfigError(f"model.d_model = {m.d_model}: must be divisible by model.n_head = {m.n_head}")
    if m.name == "custom" and not m.factory:
        raise ConfigError("model.factory: required when model.name = 'custom' (e.g. 'mypkg.models:build')")
    if m.name == "custom" and not m.loss:
        raise ConfigError("model.loss: required when model.name = 'custom' (e.g. 'torch.nn.functional:mse_loss')")
    if m.name == "mlp" and d.name in ("pydoc", "text"):
        raise ConfigError(f"data.name = '{d.name}': model.name = 'mlp' takes data.name = 'synthetic' or 'custom'")
    if m.name == "gpt" and d.name == "synthetic":
        raise ConfigError("data.name = 'synthetic': model.name = 'gpt' takes data.name = 'pydoc', 'text' or 'custom'")
    if d.name == "text":
        if not d.path:
            raise ConfigError("data.path: required when data.name = 'text'")
        if not Path(d.path).is_file():
            raise ConfigError(f"data.path = '{d.path}': no such file")
    if d.name == "custom" and not d.factory:
        raise ConfigError("data.factory: required when data.name = 'custom' (e.g. 'mypkg.data:build')")
    if cfg.optimizer.nesterov and not (cfg.optimizer.name == "sgd" and cfg.optimizer.momentum > 0):
        raise ConfigError("optimizer.nesterov = true: needs optimizer.name = 'sgd' and optimizer.momentum > 0")
    if t.global_batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size}: must be divisible by "
            f"training.grad_accum_steps = {t.grad_accum_steps}")
    ft = cfg.fault_tolerance
    if ft.replica_groups and ft.min_replicas > ft.replica_groups:
        raise ConfigError(f"fault_tolerance.min_replicas = {ft.min_replicas}: must be <= "
                          f"fault_tolerance.replica_groups = {ft.replica_groups}")
    if ft.lighthouse and not re.fullmatch(r"https?://[^/:\s]+:\d+/?", ft.lighthouse):
        raise ConfigError(f"fault_tolerance.lighthouse = {ft.lighthouse!r}: must be http://host:port (torchft's "
                          "Lighthouse), or empty to start one on this machine")
    sync_with = ("ddp", "zero1", "zero2", "zero3", "hybrid", "single")
    if m.sync_batchnorm and cfg.strategy.name not in sync_with:
        raise ConfigError(f"model.sync_batchnorm = true: for strategies that step together over a data-parallel "
                          f"group ({', '.join(sync_with)}); strategy.name = {cfg.strategy.name!r} "
                          "trains replicas apart, each on its own statistics")
    if m.sync_batchnorm and ft.replica_groups:
        raise ConfigError("model.sync_batchnorm = true: not with fault_tolerance.replica_groups (a replica "
                          "group's statistics would need the others' at every step, which a lost group stops)")
    if cfg.optimizer.warmup_steps >= t.steps and cfg.optimizer.warmup_steps:
        raise ConfigError(f"optimizer.warmup_steps = {cfg.optimizer.warmup_steps}: "
                          f"must be < training.steps = {t.steps}")
