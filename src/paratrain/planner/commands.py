"""`paratrain plan` and `paratrain calibrate`, the planner's choice for `strategy.name = "auto"`, and
a run's prediction (its summary's). Device sweeps: sweep.py.

Bad input (a malformed `--transformer`, an unknown device, a device count that is not a positive
integer, a model that fits no plan) is one line and exit code 2, as everywhere in paratrain.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from paratrain.config import Config, ConfigError
from paratrain.planner.hardware import DEVICES, Calibration, Cluster, calibration_path, preset
from paratrain.planner.model import ModelProfile, transformer
from paratrain.planner.plan import Estimate, Plan
from paratrain.planner.search import Search, explain, search

TRANSFORMER_KEYS = ("layers", "hidden", "heads", "vocab", "seq")


def parse_transformer(text: str) -> ModelProfile:
    """`layers=..,hidden=..,heads=..,vocab=..,seq=..` (and optionally ffn=..) -> the closed form."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in (*TRANSFORMER_KEYS, "ffn") or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--transformer {text!r}: each part must be key=positive integer with keys "
                              f"{', '.join(TRANSFORMER_KEYS)} (and optionally ffn); got {part!r}")
        sizes[key] = int(value)
    missing = [k for k in TRANSFORMER_KEYS if k not in sizes]
    if missing:
        raise ConfigError(f"--transformer {text!r}: missing {', '.join(missing)} (give {', '.join(TRANSFORMER_KEYS)})")
    if sizes["hidden"] % sizes["heads"]:
        raise ConfigError(f"--transformer {text!r}: hidden = {sizes['hidden']} must be divisible by heads = "
                          f"{sizes['heads']}")
    return transformer(sizes["layers"], sizes["hidden"], sizes["heads"], sizes["vocab"], sizes["seq"],
                       sizes.get("ffn"))


def profile_config(cfg: Config) -> ModelProfile:
    """The config's model, counted on the meta device on one held-out sample."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from paratrain.data import build_datasets
    from paratrain.models import build_loss, build_model
    from paratrain.planner.model import profile_module, transformer

    datasets = build_datasets(cfg)
    fake = FakeTensorMode()  # CPU kernels chosen as a run chooses them; nothing allocated
    with fake:
        model = build_model(cfg, datasets.vocab_size)
    batch = datasets.eval.get(torch.arange(1))
    profile = profile_module(model, batch.inputs, build_loss(cfg), batch.targets, name=_model_name(cfg), fake=fake)
    if cfg.model.name == "gpt":  # the tensor-parallel split of the built-in GPT, in the closed form's terms
        m = cfg.model
        closed = transformer(m.n_layer, m.d_model, m.n_head, datasets.vocab_size, m.block_size,
                             bytes_per_value=profile.bytes_per_value)
        from dataclasses import replace

        layer = closed.blocks[0]
        blocks = tuple(replace(b, tp_bytes=layer.tp_bytes, tp_split=layer.tp_split, gemms=layer.gemms,
                               attn_traffic=layer.attn_traffic) for b in profile.blocks)
        profile = replace(profile, blocks=blocks, heads=m.n_head, hidden=m.d_model)
    return profile


def _model_name(cfg: Config) -> str:
    m = cfg.model
    if m.name == "gpt":
        return f"GPT {m.n_layer}x{m.d_model}, {m.n_head} heads, {m.block_size} tokens"
    return m.factory if m.name == "custom" else m.name


def load_calibration() -> Calibration:
    path = calibration_path()
    if not path.is_file():
        raise ConfigError(f"--device local: no calibration at {path}; run 'paratrain calibrate' first (about a "
                          "minute), or name a preset: " + ", ".join(sorted(DEVICES)))
    return Calibration.load(path)


def cluster_for(device: str, devices: int, per_node: int | None = None, price: float = 0.0,
                link: str = "loopback") -> Cluster:
    if devices < 1:
        raise ConfigError(f"--devices {devices}: must be an integer >= 1")
    if device == "local":
        cal = load_calibration()
        if link not in cal.links:
            raise ConfigError(f"--link {link!r}: not calibrated; calibrated: {', '.join(cal.links)} (add one with "
                              "'paratrain calibrate --testbed 100mbit')")
        return cal.cluster(devices, link)
    try:
        return preset(device, devices, per_node or 8, price)
    except ValueError as e:
        raise ConfigError(f"--device {device!r}: must be 'local' or one of {', '.join(sorted(DEVICES))}") from e


@dataclass
class Choice:
    """The planner's pick for a run, with its prediction."""
    estimate: Estimate
    reason: str
    considered: int

    @property
    def plan(self) -> Plan:
        return self.estimate.plan


def choose(cfg: Config, nproc: int) -> Choice:
    """`strategy.name = "auto"`: the fastest plan paratrain can run on `nproc` local processes of
    the calibrated machine, synchronous only (the asynchronous families change what is trained)."""
    profile = profile_config(cfg)
    cluster = load_calibration().cluster(nproc)
    found = search(profile, cluster, cfg.training.global_batch_size, runnable=True, asynchronous=False)
    if not found.ranked:
        raise ConfigError(_fits_nothing(found, cluster))
    first, second = found.ranked[0], (found.ranked[1] if len(found.ranked) > 1 else None)
    return Choice(first, explain(first, second), found.considered)


def _fits_nothing(found: Search, cluster: Cluster) -> str:
    return (f"no plan fits: the smallest of {found.considered} needs {found.smallest_bytes / 2**30:.2f} GiB a device "
            f"and the largest device offered ({cluster.device.name}) has {cluster.device.memory_bytes / 2**30:.2f} GiB")


# ---------------------------------------------------------------------------- paratrain plan


def plan_command(args, cfg: Config | None) -> int:
    profile = parse_transformer(args.transformer) if args.transformer else profile_config(cfg)
    batch = args.global_batch or (cfg.training.global_batch_size if cfg else 0)
    if batch < 1:
        raise ConfigError("--global-batch: give the samples per optimizer step (an integer >= 1)")
    if not args.slowdown >= 1:
        raise ConfigError(f"--slowdown {args.slowdown}: must be a number >= 1 (how many times slower one device is)")
    devices = [d.strip() for d in args.device.split(",") if d.strip()]
    if args.sweep_devices:
        from paratrain.planner.sweep import sweep_command

        return sweep_command(args, profile, batch, devices)
    cluster = cluster_for(devices[0], args.devices, args.per_node, link=args.link)
    dtype = args.dtype or ("fp32" if devices[0] == "local" else "bf16")
    found = search(profile, cluster, batch, dtype, runnable=args.runnable, slowdown=args.slowdown)
    if not found.ranked:
        raise ConfigError(_fits_nothing(found, cluster))
    ranked = [e for e in found.ranked if exact(e)] or found.ranked
    first, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    if args.json:
        print(json.dumps({"model": profile.name, "params": profile.params, "global_batch": batch,
                          "devices": args.devices, "device": cluster.device.name, "considered": found.considered,
                          "dropped": dict(found.dropped), "why": explain(first, second),
                          "plans": [e.to_dict() for e in ranked[:args.top]],
                          "trains_differently": [e.to_dict() for e in _others(found).values()]}, indent=1))
        return 0
    _print_plans(profile, cluster, batch, found, args.top)
    return 0


def exact(e: Estimate) -> bool:
    """A plan that trains exactly what one process would (no codec, no local steps): the ranking's own."""
    return e.plan.family == "sync" and e.plan.codec == "none"


def _others(found: Search) -> dict[str, Estimate]:
    """The best plan of each family that trains differently (local SGD, DiLoCo, parameter server, a codec)."""
    others: dict[str, Estimate] = {}
    for e in found.ranked:
        key = e.plan.family if e.plan.family != "sync" else "ddp + codec"
        if not exact(e) and key not in others:
            others[key] = e
    return others


def _print_plans(profile: ModelProfile, cluster: Cluster, batch: int, found: Search, top: int) -> None:
    """The best synchronous plans, then the best of each family that trains differently."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    same = [e for e in found.ranked if exact(e)]
    others = _others(found)
    title = (f"{profile.name}: {profile.params / 1e6:,.1f} M parameters, global batch {batch}, "
             f"{cluster.devices} x {cluster.device.name}")
    for rows, heading in ((same[:top], title + ": the same training as one process"),
                          (list(others.values()), "trains differently (asynchronous or compressed): the best of each")):
        if not rows:
            continue
        table = Table(title=heading)
        for col in ("#", "plan", "run as", "step", "samples/s", "compute", "exposed comm", "bubble", "memory/device",
                    "MFU"):
            table.add_column(col, justify="left" if col in ("plan", "run as") else "right")
        for i, e in enumerate(rows, 1):
            table.add_row(str(i), e.plan.describe(), e.plan.strategy(), duration(e.step_s),
                          f"{e.samples_per_s:,.1f}", duration(e.compute_s), duration(e.comm_s),
                          duration(e.bubble_s), f"{e.memory_bytes / 2**30:.2f} GiB", f"{e.mfu:.1%}")
        console.print(table)
    dropped = ", ".join(f"{n} {why}" for why, n in found.dropped.items()) or "none"
    console.print(f"{found.considered} plans considered; dropped: {dropped}.")
    if same:
        console.print(explain(same[0], same[1] if len(same) > 1 else None))


def duration(seconds: float) -> str:
    return "-" if not seconds else f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ---------------------------------------------------------------------------- paratrain calibrate


def calibrate_command(args) -> int:
    from paratrain.planner.calibrate import calibrate, calibrate_testbed, save

    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: must be an integer >= 1")
    out = Path(args.out) if args.out else calibration_path()
    if args.if_missing and out.is_file():
        print(f"paratrain calibrate: {out} exists (measured {Calibration.load(out).measured_at}); kept",
              file=sys.stderr)
        return 0
    if args.testbed and out.is_file():  # a link added to this machine's calibration
        cal = Calibration.load(out)
    else:
        print("paratrain calibrate: measuring matmul FLOP/s, memory bandwidth and 4 collectives over loopback ...",
              file=sys.stderr)
        cal = calibrate(args.device, args.repeats)
        kept = _earlier_links(out, cal)
        if kept:  # the testbed links measured before are kept: re-measuring this machine does not lose them
            cal = replace(cal, links={**cal.links, **kept})
            print(f"paratrain calibrate: kept the link(s) measured before: {', '.join(kept)}", file=sys.stderr)
    if args.testbed:
        print(f"paratrain calibrate: measuring 4 collectives between 2 testbed hosts at {args.testbed} ...",
              file=sys.stderr)
        cal = calibrate_testbed(args.testbed, cal)
    save(cal, out)
    print(cal.to_toml(), end="")
    print(f"written: {out}", file=sys.stderr)
    return 0


def _earlier_links(path: Path, cal: Calibration) -> dict:
    """The links of the calibration at `path` that `cal` did not measure; none from an unreadable file."""
    try:
        earlier = Calibration.load(path) if path.is_file() else None
    except (OSError, ValueError, TypeError):  # tomllib.TOMLDecodeError is a ValueError
        return {}
    return {k: v for k, v in earlier.links.items() if k not in cal.links} if earlier else {}


# ---------------------------------------------------------------------------- a run's own plan


def plan_of(cfg: Config, world_size: int) -> Plan:
    """The plan a config runs on `world_size` processes, in the planner's terms."""
    from paratrain.strategies.layout import layout

    s = cfg.strategy
    dims = layout(cfg, world_size)
    dtype = "bf16" if s.zero.mixed_precision == "bf16" and s.name in ("zero2", "zero3") else "fp32"
    if s.name in ("local_sgd", "diloco"):
        return Plan(dp=world_size, family=s.name, sync_every=s.local_sgd.sync_every, codec=s.compression.codec,
                    dtype=dtype)
    if s.name == "parameter_server":
        return Plan(dp=world_size - s.ps.servers, family="parameter_server", servers=s.ps.servers,
                    codec=s.compression.codec, dtype=dtype, mode=s.ps.mode)
    pipelined = dims.pp > 1
    zero = {"zero1": 1, "zero2": 2, "zero3": 3}.get(s.name, 3 if s.name == "hybrid" and s.dp_mode == "shard" else 0)
    # hybrid runs a pipeline schedule even of one stage: its micro-batches accumulate
    return Plan(dp=dims.dp, pp=dims.pp, tp=dims.tp,
                microbatches=(1 if s.name == "model_parallel" else s.pipeline.microbatches)
                if pipelined or s.name == "hybrid" else cfg.training.grad_accum_steps,
                schedule=("gpipe" if s.name == "model_parallel" else s.pipeline.schedule) if pipelined else "none",
                virtual=s.pipeline.virtual_stages if pipelined else 1, zero=zero,
                sequence_parallel=s.tensor.sequence_parallel and dims.tp > 1, dtype=dtype,
                codec=s.compression.codec if s.name == "ddp" else "none")


def predict(cfg: Config, world_size: int) -> dict | None:
    """The planner's step time, memory and peak FLOP/s for this run on the calibrated machine (None:
    no calibration, or a strategy it does not model); for the summary beside the measured ones."""
    unmodelled = cfg.strategy.name in ("single", "hogwild", "gossip") or cfg.fault_tolerance.replica_groups
    if not calibration_path().is_file() or unmodelled:
        return None
    from paratrain.planner.cost import estimate

    plan = plan_of(cfg, world_size)
    cluster = load_calibration().cluster(world_size, computing=world_size - plan.servers)
    profile = profile_config(cfg)
    est = estimate(plan, profile, cluster, cfg.training.global_batch_size)
    return {"plan": est.plan.describe(), "step_s": run_step_s(cfg, est, profile, cluster),
            "memory_bytes": est.memory_bytes,
            "model_flops": est.model_flops, "peak_flops": cluster.device.peak("fp32") * world_size,
            "compute_s": est.compute_s, "comm_s": est.comm_s, "bubble_s": est.bubble_s}


def run_step_s(cfg: Config, est, profile: ModelProfile, cluster: Cluster) -> float:
    """The mean step of this run past its first (what its summary measures): the planner's steady
    step, and for PowerSGD its first uncompressed steps (torch's start_powerSGD_iter) among them."""
    from dataclasses import replace

    from paratrain.compression.adapters import POWERSGD_START_ITER
    from paratrain.planner.cost import estimate

    steps = cfg.training.steps - 1
    if est.plan.codec != "powersgd" or steps <= 0:
        return est.step_s
    plain = min(POWERSGD_START_ITER - 1, steps)
    full = estimate(replace(est.plan, codec="none"), profile, cluster, cfg.training.global_batch_size).step_s
    return ((steps - plain) * est.step_s + plain * full) / steps


def resolve_auto(cfg: Config, nproc: int) -> tuple[Config, Choice]:
    """`strategy.name = "auto"`: the planner's choice, as a config that runs it, and why."""
    choice = choose(cfg.replace("strategy.name=ddp"), nproc)
    chosen = cfg.replace(*choice.plan.config_sets())
    return chosen, choice
