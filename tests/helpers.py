"""Shared test configs and the per-rank training function (importable by spawned ranks)."""
from __future__ import annotations

import json

import torch
from torch.distributed.tensor import DTensor

import paratrain
from paratrain.checkpoint import list_checkpoints, read_checkpoint

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
    """Train (one rank or the whole single run) and return parameters + summary, on CPU."""
    result = paratrain.train(cfg, resume=resume)
    params = result.model.state_dict()
    if any(isinstance(v, DTensor) for v in params.values()):
        # Sharded (DTensor) parameters: .full_tensor() needs the process group, which train()
        # has destroyed by now, so read the full tensors of the final checkpoint instead.
        assert cfg.checkpoint.enabled, "a run with sharded parameters needs checkpoint.enabled=true here"
        params = read_checkpoint(list_checkpoints(result.run_dir)[-1])["strategy"]["model"]
    return {"params": {k: v.detach().cpu().clone() for k, v in params.items()}, "summary": result.summary}


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
