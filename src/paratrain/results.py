"""What the Python API hands back: `launch`'s result, `train`'s on each rank, and `load_model`, the
trained model as one plain `nn.Module` whatever layout trained it.

A checkpoint file (`<run dir>/checkpoints/step-NNNNNNNN.pt`, written by checkpoint.py with
`torch.save`, read back with `weights_only=True`) is a dict:

    format, version      "paratrain-checkpoint" and its layout version
    step                 optimizer steps taken
    config               the run's whole config (Config.to_dict())
    world_size           processes of the job that wrote it
    strategy["model"]    the whole model: full tensors by parameter and buffer name, gathered from
                         every stage and shard (the names of the plain model, whatever the layout)
    strategy[...]        the optimizer (full tensors), and what the strategy needs to resume
    data, rng, rng_ranks where the data loader was, each rank's random streams

So `load_model` needs no process group: it builds the model the config names (or takes yours)
and loads `strategy["model"]` into it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from paratrain.checkpoint import list_checkpoints, newest_verified, read_checkpoint
from paratrain.config import ConfigError, from_dict


@dataclass
class LaunchResult:
    exit_code: int  # 0: finished; what `paratrain run` would exit with
    run_dir: Path | None  # None where the run never got a directory (refused before)
    summary: dict  # summary.json: losses, step times, throughput, bytes ({} if the run did not finish)
    checkpoint: Path | None  # the newest checkpoint, the whole trained model in it

    @classmethod
    def of(cls, exit_code: int, run_dir: Path | None) -> LaunchResult:
        summary, ckpt = {}, None
        if run_dir is not None:
            try:
                summary = json.loads((Path(run_dir) / "summary.json").read_text())
            except (OSError, ValueError):
                pass
            found = list_checkpoints(Path(run_dir))
            ckpt = found[-1] if found else None
        return cls(exit_code, Path(run_dir) if run_dir is not None else None, summary, ckpt)

    def load_model(self, model: nn.Module | None = None) -> nn.Module:
        if self.checkpoint is None:
            raise ConfigError(f"run {self.run_dir}: no checkpoint to load a model from (checkpoint.enabled = false?)")
        return load_model(self.checkpoint, model)


@dataclass
class TrainResult:
    """What `train` returns on each rank. `model` is what this rank trained with: the whole plain
    model (single, ddp, zero1, local SGD, DiLoCo, gossip, Hogwild, a parameter-server worker), its
    shards (zero2 / zero3: FSDP2 DTensors; tensor: DTensors), its pipeline stages (pipeline,
    model_parallel, hybrid: the stages' modules), or on a parameter server's serving rank the
    initial model (the server's report is `summary`). `full_model()` is the whole trained model on
    any strategy."""
    model: nn.Module
    summary: dict  # losses, step times, throughput, bytes sent
    run_dir: Path  # its last checkpoint holds the whole model, full tensors by name

    def full_model(self, model: nn.Module | None = None) -> nn.Module:
        """The whole trained model as one plain nn.Module on the CPU, whatever the layout: read from
        the run's final checkpoint, which holds it gathered from every stage and shard (written by
        rank 0 before train() returns there; other ranks: after a barrier). `model`: a fresh
        instance to load it into, needed where train() was given a model of your own."""
        return load_model(self.run_dir, model)


def load_model(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The trained model from a run directory (its newest checkpoint that verifies) or a checkpoint
    file, as a plain nn.Module on the CPU: `model` with the weights loaded into it, or, without one,
    the model its config names (built-in or `model.factory`), built as the trainer builds it."""
    path = Path(path)
    if path.is_dir():
        found = newest_verified(path)
        if found is None:
            raise ConfigError(f"{path}: no checkpoint that verifies in {path / 'checkpoints'}")
        ckpt = found[1]
    else:
        ckpt = read_checkpoint(path)
    if model is None:
        from paratrain.trainer import initial_model

        model, _ = initial_model(from_dict(ckpt["config"]))
    missing, unexpected = model.load_state_dict(ckpt["strategy"]["model"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: the model does not match the checkpoint: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return model
