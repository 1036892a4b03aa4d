"""Shared test configs and the per-rank training function (importable by spawned ranks)."""
from __future__ import annotations

import json
import os

import torch.distributed as dist

import paratrain
from paratrain.checkpoint import list_checkpoints, read_checkpoint

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
