"""What several test modules share: configs, the per-rank training function and job runner
(importable by spawned ranks), readers of a run's metrics, and the `paratrain` command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import paratrain
from paratrain.checkpoint import list_checkpoints, read_checkpoint
from paratrain.testing import run_ranks

ROOT = Path(__file__).parents[1]
PARATRAIN = [sys.executable, "-m", "paratrain"]
# workers import tests.user_code etc. (and tests/shims: conftest.py)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

TINY_GPT = ["model.name=gpt", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=16",
            "training.global_batch_size=8", "training.steps=20", "training.eval_every=10", "training.eval_batches=2",
            "optimizer.name=adamw", "optimizer.lr=3e-3", "run.progress=off"]
MLP = ["model.name=mlp", "data.name=synthetic", "data.num_samples=512", "training.global_batch_size=32",
       "training.steps=20", "training.eval_every=10", "optimizer.name=sgd", "optimizer.lr=0.05",
       "optimizer.momentum=0.9", "run.progress=off"]


def config(base: list[str], *sets: str, run_dir=None) -> paratrain.Config:
    extra = [f"run.dir={json.dumps(str(run_dir))}"] if run_dir is not None else []
    return paratrain.load_config(None, [*base, *sets, *extra])


def fit(cfg: paratrain.Config, resume=None) -> dict:
    """Train (one rank, or the whole single run): the whole model's parameters from the final
    checkpoint (full tensors by name, whatever the layout), and this rank's summary."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")  # kept by train(): several runs can share one group
    result = paratrain.train(cfg, resume=resume)
    assert cfg.checkpoint.enabled, "tests read the trained parameters from the final checkpoint"
    params = read_checkpoint(list_checkpoints(result.run_dir)[-1])["strategy"]["model"]
    return {"params": params, "summary": result.summary}


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def initial_params(cfg: paratrain.Config) -> dict:
    """The model's parameters before any step, built as the trainer builds them."""
    from paratrain.data import build_datasets
    from paratrain.models import build_model

    torch.manual_seed(cfg.training.seed)
    return {k: v.clone() for k, v in build_model(cfg, build_datasets(cfg).vocab_size).state_dict().items()}


def _jobs_rank(jobs: list) -> list:
    dist.init_process_group("gloo")  # one group for every job: train() leaves a caller's group alone
    return [fn(*args) for fn, *args in jobs]


def run_jobs(jobs: dict, world_size: int = 2, **kwargs) -> dict:
    """{name: (fn, *args)} run one after another in one spawn of the ranks -> {name: [per-rank result]}
    (None for a rank that left no result, where `allow_missing=True` is passed on)."""
    ranks = run_ranks(_jobs_rank, world_size, list(jobs.values()), timeout_s=300, **kwargs)
    return {name: [None if r is None else r[i] for r in ranks] for i, name in enumerate(jobs)}


# ---------------------------------------------------------------------------- a run's metrics


def records(run_dir: Path, rank: int = 0, kind: str = "step") -> list[dict]:
    """One rank's metrics records of one kind ("step", "eval", ...), in order."""
    lines = (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def server_report(run_dir: Path, rank: int = 2) -> dict:
    """A parameter server's closing report."""
    return json.loads((run_dir / "metrics" / f"ps_server{rank}.json").read_text())


# ---------------------------------------------------------------------------- the command line


def cli(args: list[str], cwd, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`paratrain ARGS` as a user types it, to the end."""
    return subprocess.run([*PARATRAIN, *args], cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------- system packages


def apt_install(packages: list[str], commands: list[str]) -> None:
    """Debian's `packages`, installed with apt-get (as root) unless `commands` are all found already;
    the test is skipped, saying why, where they cannot be had."""
    import shutil

    import pytest

    if all(shutil.which(c) for c in commands):
        return
    names = " and ".join(packages)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"Debian's {names} are not installed, and apt-get as root is not available here to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *packages]
    out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:  # package lists missing or stale: fetch them once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or not all(shutil.which(c) for c in commands):
        said = (out.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"apt-get could not install Debian's {names}: {said}")
