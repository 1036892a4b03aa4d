"""What a step holds in memory, measured: model states at the optimizer step, saved activations.

CPU tensors have no allocator statistics (torch.cuda.max_memory_allocated has no CPU twin), so a
step's memory is counted where it is held: `state_bytes` (strategies/base.py) takes the
parameters, gradients and optimizer state this rank holds just before the optimizer steps (where
they peak; a parameter-server worker's as it lets its pushed gradients go), and `SavedBytes` the
storages autograd keeps for backward, live and peak, through
`torch.autograd.graph.saved_tensors_hooks` (each storage once, parameters excluded). Their sum is
what the planner predicts per device (planner/cost.py `memory`). Measured on one step only: the
hooks cost a Python call per saved tensor.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch


class SavedBytes:
    """Live and peak bytes of the storages autograd holds for backward (parameters excluded)."""

    class Handle:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor):
            self.tensor = tensor

    def __init__(self, params):
        self.skip = {st.data_ptr() for p in params if (st := _storage(p)) is not None}
        self.refs: dict[int, list[int]] = {}  # storage address -> [handles alive, bytes]
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        storage = _storage(t)
        if storage is None:  # a tensor without storage of its own here (a fake or meta tensor)
            return t
        ptr = storage.data_ptr()
        if ptr in self.skip:
            return t
        entry = self.refs.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:  # the same storage saved twice (x in two ops, or a view) counts once
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        handle = SavedBytes.Handle(t)
        weakref.finalize(handle, self._release, ptr)
        return handle

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    @staticmethod
    def unpack(h):
        return h.tensor if isinstance(h, SavedBytes.Handle) else h


def _storage(t: torch.Tensor):
    """The storage a tensor's bytes live in: a DTensor's (tensor parallel, FSDP2) is its local shard's."""
    local = getattr(t, "_local_tensor", t)
    try:
        return local.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


@contextmanager
def measured(strategy, into: dict):
    """Around one step: `into` gets the model states at the optimizer step and the saved-activation peak."""
    from paratrain.strategies.base import state_bytes

    optimizer = getattr(strategy, "optimizer", None)  # None: a parameter-server worker (its servers step)
    first = next(iter(getattr(optimizer, "optimizers", [optimizer])), None)  # a pipeline's: one per stage
    hook, model = None, strategy.module
    if isinstance(first, torch.optim.Optimizer):
        hook = first.register_step_pre_hook(lambda *_: into.update(states=state_bytes(strategy)))
    if optimizer is None:  # a parameter-server worker: its gradients are held until it lets them go
        model.zero_grad = lambda *a, **k: (into.update(states=_worker_states(model)),
                                           type(model).zero_grad(model, *a, **k))[1]
    trained = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
    saved = SavedBytes([*model.parameters(), *trained])  # a pipeline's stages are copies of the model
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            yield
    finally:
        if hook is not None:
            hook.remove()
        if optimizer is None:
            del model.zero_grad
    into["activations"] = saved.peak
    if optimizer is None and "states" not in into:
        into["states"] = _worker_states(model)


def _worker_states(model) -> dict:
    """A parameter-server worker's own copy of the parameters, and its gradients while held."""
    params = list(model.parameters())
    return {"params": sum(p.numel() * p.element_size() for p in params),
            "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)}


def held(memory: dict) -> float | None:
    """A measured step's bytes: model states at the optimizer step plus the saved-activation peak."""
    if "activations" not in memory:
        return None
    return sum(memory.get("states", {}).values()) + memory["activations"]
