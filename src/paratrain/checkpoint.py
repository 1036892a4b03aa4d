"""Atomic, verified checkpoints: written to a temporary file, fsynced, then renamed into place.

A crash mid-write leaves the previous checkpoint untouched, and the temporary file is removed on
any failure; a full disk is one line naming the directory and the bytes needed. Each file carries
a SHA-256 of its payload (every tensor's bytes, dtype and shape, and every other value), checked
on load: a flipped bit inside a weight is a one-line error instead of a silently corrupted run,
and resuming a run directory falls back to its newest checkpoint that verifies. Files are read
back with `torch.load(weights_only=True)` (no arbitrary code), and a truncated or foreign file
gives a one-line error. A checkpoint holds the strategy's state (model, optimizer), the step (which
fixes the data position and learning rate), and every rank's RNG states.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from paratrain import messages
from paratrain.config import Config, ConfigError

FORMAT = "paratrain-checkpoint"
VERSION = 2  # 2: a payload checksum
_NAME = re.compile(r"step-(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint files of a run, oldest first."""
    found = [p for p in checkpoint_dir(run_dir).glob("step-*.pt") if _NAME.search(p.name)]
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); older checkpoints are intact."""


def payload_digest(obj) -> str:
    """SHA-256 over a checkpoint's values in order: tensors by dtype, shape and raw bytes."""
    h = hashlib.sha256()

    def visit(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(v, dict):
            h.update(b"{")
            for k, x in v.items():
                if k != "sha256":
                    h.update(repr(k).encode())
                    visit(x)
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[" if isinstance(v, list) else b"(")
            for x in v:
                visit(x)
            h.update(b"]")
        else:
            h.update(repr(v).encode())

    visit(obj)
    return h.hexdigest()


def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def save_atomic(obj, path: Path) -> None:
    """Write `obj` with its checksum to `path`, or leave nothing new behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {**obj, "sha256": payload_digest(obj)}
    need = _tensor_bytes(obj) + (64 << 10)  # tensors plus the archive's own records (measured: < 64 KiB)
    free = shutil.disk_usage(path.parent).free
    if free < need:  # refuse before filling the disk: the save would fail half-way anyway
        raise CheckpointWriteError(_no_space(path, need, free))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointWriteError(_no_space(path, need, shutil.disk_usage(path.parent).free)) from None
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(path: Path, need: int, free: int) -> str:
    return (f"checkpoint {path.name} not written: no space left in '{path.parent}' (needs about "
            f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free); older checkpoints are kept")


def read_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint file; ConfigError (one line) if it is not a usable one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign classes, random bytes...
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint '{path}' cannot be read (truncated or not a checkpoint): {reason}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ConfigError(f"checkpoint '{path}' is not a paratrain checkpoint (no '{FORMAT}' header)")
    if obj.get("version") != VERSION:
        raise ConfigError(f"checkpoint '{path}' has format version {obj.get('version')}; "
                          f"this paratrain reads {VERSION}")
    if obj.get("sha256") != payload_digest(obj):
        raise ConfigError(f"checkpoint '{path}' fails its checksum: its contents changed after it was written "
                          "(a disk or copy error)")
    return obj


def check_compatible(ckpt: dict, cfg: Config, path: Path, model: torch.nn.Module) -> None:
    """One line if `model` (unsharded; meta tensors will do) cannot continue from `ckpt`."""
    saved, now = ckpt["config"]["model"], dataclasses.asdict(cfg.model)
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        raise ConfigError(f"checkpoint '{path}' was written for another model (model.{', model.'.join(diff)} differ)")
    stored = ckpt["strategy"]["model"]
    wrong = [k for k, v in model.state_dict().items() if k not in stored or tuple(stored[k].shape) != tuple(v.shape)]
    if wrong:  # e.g. the same GPT on another corpus: another vocabulary
        k = wrong[0]
        got = tuple(stored[k].shape) if k in stored else "missing"
        raise ConfigError(f"checkpoint '{path}' does not fit this model: {k} is {got} there, "
                          f"{tuple(model.state_dict()[k].shape)} here ({len(wrong)} tensor(s) differ; other data?)")
    saved_steps = ckpt["config"]["training"]["steps"]
    if cfg.optimizer.schedule == "cosine" and saved_steps != cfg.training.steps:
        raise ConfigError(f"training.steps = {cfg.training.steps}: the checkpoint's cosine schedule spans "
                          f"{saved_steps} steps; resume with {saved_steps} or use optimizer.schedule = 'constant'")


def newest_verified(run_dir: Path) -> tuple[Path, dict, list[Path]] | None:
    """The newest checkpoint of a run that reads and verifies, its contents, and the newer files
    that did not (each named in one line on stderr); None if the run has none that verifies."""
    failed = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, read_checkpoint(path), failed
        except ConfigError as e:
            print(f"paratrain: {e}; trying the one before", file=sys.stderr)
            failed.append(path)
    return None


def resolve_resume(target: str | Path) -> Path:
    """`--resume` takes a checkpoint file or a run directory (its newest checkpoint that verifies)."""
    target = Path(target)
    if target.is_dir():
        found = newest_verified(target)
        if found is None:
            raise ConfigError(f"--resume '{target}': the directory holds no checkpoints/step-*.pt that read and verify")
        return found[0]
    return target


def step_of(path: Path) -> int:
    return int(_NAME.search(Path(path).name).group(1))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def merge_states(parts: list[dict]) -> dict:
    """Union of name-keyed {model, optimizer} states from ranks holding different parameters."""
    model, state, groups = {}, {}, []
    for part in parts:
        model.update(part["model"])
        state.update(part["optimizer"]["state"])
        for i, g in enumerate(part["optimizer"]["param_groups"]):
            if i == len(groups):
                groups.append({**g, "params": []})
            groups[i]["params"] += [p for p in g["params"] if p not in groups[i]["params"]]
    merged = {"model": model, "optimizer": {"state": state, "param_groups": groups}}
    for part in parts:  # a strategy's own top-level keys (local_sgd's): the first rank's copy
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


def _refuse_nonfinite(model: dict, step: int) -> None:
    """A checkpoint never holds NaN or Inf weights (they would push good ones out of the rotation)."""
    from paratrain.nonfinite import NonFiniteError

    for name, t in model.items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            # No ranks named: the tensor is the merge of every rank's part.
            raise NonFiniteError([], step, f"value in {name}", ": checkpoint not written, older ones kept")


class Checkpointer:
    def __init__(self, run_dir: Path, cfg: Config, topo):
        self.dir, self.cfg, self.topo = checkpoint_dir(run_dir), cfg, topo

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.pt"

    def save(self, step: int, strategy, data_position: dict) -> Path | None:
        group = strategy.agree_on_members()  # every rank still in the job takes part
        rng = [_rng_state()]
        rng_ranks = list(range(self.topo.world_size))  # whose streams: the live group's ranks
        if self.topo.world_size > 1:
            rng = messages.all_gather(_rng_state(), group=group)
            if group is not None:  # a subset: survivors of a lost rank, a parameter server's workers
                rng_ranks = dist.get_process_group_ranks(group)
        state = strategy.state_dict(group)  # sharded strategies gather here
        if self.topo.world_size > 1:  # pipeline stages hold different layers: merge them on rank 0
            parts = messages.gather(state if strategy.holds_unique_state else None, dst=0, group=group)
            state = merge_states([p for p in parts if p is not None]) if self.topo.is_main else None
        path = self.path(step)
        if self.topo.is_main:
            _refuse_nonfinite(state["model"], step)
            save_atomic({"format": FORMAT, "version": VERSION, "step": step, "data": data_position,
                         "config": self.cfg.to_dict(), "world_size": self.topo.world_size,
                         "strategy": state, "rng": rng, "rng_ranks": rng_ranks}, path)
            # Only older checkpoints of this run make room: never one from a step after this one.
            older = [p for p in list_checkpoints(self.dir.parent) if step_of(p) < step]
            for old in older[:max(0, len(older) - (self.cfg.checkpoint.keep - 1))]:
                old.unlink()
        if self.topo.world_size > 1:
            dist.barrier(group=group)  # nobody runs ahead of a checkpoint that is not yet on disk
        return path

    def restore(self, ckpt: dict, strategy) -> int:
        strategy.load_state_dict(ckpt["strategy"])
        rng = ckpt["rng"]
        ranks = list(ckpt.get("rng_ranks", range(len(rng))))  # older checkpoints: every rank's, in order
        # Same layout: each rank gets its own stream back; another layout, or a rank whose stream
        # was not saved (not in the live group: a lost rank, a parameter server): rank 0's.
        same = ckpt["world_size"] == self.topo.world_size and self.topo.rank in ranks
        _set_rng_state(rng[ranks.index(self.topo.rank)] if same else rng[0])
        return int(ckpt["step"])
