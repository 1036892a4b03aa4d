"""Shared test configs and the per-rank training function (importable by spawned ranks)."""
from __future__ import annotations

import json

import os

import torch.distributed as dist

import paratrain

TINY_GPT = ["model.name=gpt", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=16",
            "training.global_batch_size=8", "training.steps=20", "training.eval_every=10", "training.eval_batches=2",
            "optimizer.name=adamw", "optimizer.lr=3e-3", "run.progress=off", "checkpoint.enabled=false"]
MLP = ["model.name=mlp", "data.name=synthetic", "data.num_samples=512", "training.global_batch_size=32",
       "training.steps=20", "training.eval_every=10", "optimizer.name=sgd", "optimizer.lr=0.05",
       "optimizer.momentum=0.9", "run.progress=off", "checkpoint.enabled=false"]


def config(base: list[str], *sets: str, run_dir=None) -> paratrain.Config:
    extra = [f"run.dir={json.dumps(str(run_dir))}"] if run_dir is not None else []
    return paratrain.load_config(None, [*base, *sets, *extra])


def fit(cfg: paratrain.Config, resume=None) -> dict:
    """Train (one rank, or the whole single run): this rank's full parameters by name, and the summary.

    Under run_ranks the process group is made here, so train() leaves it alive for gathering
    sharded parameters afterwards, and several runs can share it.
    """
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    result = paratrain.train(cfg, resume=resume)
    params = result.strategy.state_dict()["model"]  # full tensors, names of the whole model
    return {"params": {k: v.detach().cpu().clone() for k, v in params.items()}, "summary": result.summary}


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
