"""Starting work: in this process, or as N local workers through torch's elastic launcher.

`paratrain run` checks the whole config against the process count, settles the run directory
and the checkpoint to resume from, and only then starts workers, through the same code path as
`torchrun ... -m paratrain worker CONFIG` (torch.distributed.run), so one machine and many
behave alike. No cluster layer of our own: multi-node is torchrun's rendezvous.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.nn as nn

from paratrain.checkpoint import check_compatible, list_checkpoints, read_checkpoint, resolve_resume
from paratrain.config import Config, ConfigError, validate
from paratrain.data import Datasets, ShardedBatches, build_datasets
from paratrain.imports import import_callable

# Measured: with the rendezvous store shared with the process group, 4 of 15 restarts hung.
LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "metrics").exists() or bool(list_checkpoints(run_dir))


def next_run_dir(name: str, root: Path = Path("runs")) -> Path:
    i = 1
    while (root / f"{name}-{i:03d}").exists():
        i += 1
    return root / f"{name}-{i:03d}"


def settle_run(cfg: Config, resume: str | Path | None, default_dir: Callable[[], Path]) -> tuple[Config, Path | None]:
    """Config with run.dir filled in, and the checkpoint to resume from (or None)."""
    ckpt = resolve_resume(resume) if resume is not None else None
    if ckpt is not None and ckpt.parent.name == "checkpoints":
        run_dir = ckpt.parent.parent  # resume where the checkpoint lives
    else:
        run_dir = Path(cfg.run.dir) if cfg.run.dir else default_dir()
    if ckpt is None and holds_run(run_dir):
        raise ConfigError(f"run.dir = '{run_dir}': already holds a run; pass --resume {run_dir} to continue it "
                          "or choose another run.dir")
    return cfg.replace(f"run.dir={json.dumps(str(run_dir))}"), ckpt


@dataclass
class TrainResult:
    model: nn.Module  # this rank's trained model, or its part of it (pipeline stages, shards)
    summary: dict  # losses, step times, throughput, bytes sent
    run_dir: Path  # its last checkpoint holds the whole model, full tensors by name


def train(cfg: Config, *, resume: str | Path | None = None, model: nn.Module | None = None,
          loss_fn: Callable | None = None, datasets: Datasets | None = None) -> TrainResult:
    """Train in this process: alone (`single`), or as one rank of a job that torchrun started.

    `model`, `loss_fn` and `datasets` override what the config names, for use from Python.
    """
    from paratrain.strategies import get_strategy
    from paratrain.topology import Topology
    from paratrain.trainer import Trainer

    strategy = get_strategy(cfg.strategy.name)
    distributed = "WORLD_SIZE" in os.environ  # a rank of a torchrun / `paratrain run` job
    if not distributed and cfg.strategy.name != "single":
        raise ConfigError(f"strategy.name = '{cfg.strategy.name}': needs worker processes; start it with "
                          "'paratrain run CONFIG --nproc N' or torchrun")
    # Under torchrun every rank, on every node, derives the same directory from the job id.
    job_dir = lambda: Path("runs") / f"{cfg.run.name}-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}"
    cfg, ckpt = settle_run(cfg, resume, job_dir if distributed else lambda: next_run_dir(cfg.run.name))
    if distributed and dist.is_initialized():  # a caller's group: no rank writes there before all have looked
        dist.barrier()
    run_dir = Path(cfg.run.dir)
    if distributed:
        topo = Topology.from_env(cfg.run, lambda n: strategy.parallel_dims(cfg, n))
    else:
        topo = Topology.single(cfg.run)
    try:
        validate(cfg, topo.world_size)
        trainer = Trainer(cfg, topo, run_dir, resume=ckpt, model=model, loss_fn=loss_fn, datasets=datasets)
        if topo.is_main:
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        summary = trainer.fit()
        return TrainResult(trainer.strategy.module, summary, run_dir)
    finally:
        topo.destroy()


def preflight(cfg: Config, world_size: int, ckpt: Path | None) -> None:
    """Every check of the user's input that would otherwise fail in N workers at once."""
    import torch

    from paratrain.models import build_model
    from paratrain.strategies import get_strategy
    from paratrain.strategies.pipeline import check_model_split

    validate(cfg, world_size)
    for key in ("model.factory", "model.loss", "data.factory"):  # user code must import
        section, name = key.split(".")
        if path := getattr(getattr(cfg, section), name):
            import_callable(path, key)
    dims = get_strategy(cfg.strategy.name).parallel_dims(cfg, world_size)
    datasets = build_datasets(cfg)
    for split, data in (("train", datasets.train), ("eval", datasets.eval)):  # enough samples for a batch
        ShardedBatches(data, cfg.training.global_batch_size, 0, dims.dp, cfg.training.seed, split)
    with torch.device("meta"):  # shapes only, no memory
        model = build_model(cfg, datasets.vocab_size)
    if dims.pp > 1:
        check_model_split(cfg, model, dims.pp)
    if ckpt is not None:
        check_compatible(read_checkpoint(ckpt), cfg, ckpt, model)


def launch(cfg: Config, nproc: int | None = None, resume: str | Path | None = None) -> int:
    """Check everything, then train on `nproc` local processes (default: run.nproc). Exit code."""
    nproc = nproc or cfg.run.nproc
    if cfg.strategy.name == "single":
        validate(cfg, world_size=nproc)
        train(cfg, resume=resume)
        return 0
    cfg, ckpt = settle_run(cfg, resume, lambda: next_run_dir(cfg.run.name))
    preflight(cfg, nproc, ckpt)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2))

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.update(LAUNCH_ENV)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.run.threads_per_rank))
    worker = ["-m", "paratrain", "worker", str(config_path)] + (["--resume", str(ckpt)] if ckpt else [])
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", *worker])
    try:
        run(args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        print(f"paratrain: {len(e.failures)} of {nproc} workers failed (exit codes {codes}); "
              f"see their messages above; run directory {run_dir}", file=sys.stderr)
        return 2 if 2 in codes else 1
    return 0
