"""One parameter server's loop: BSP, ASP and SSP over ps_protocol's messages.

The consistency models of Li et al. (OSDI 2014) and SSP of Ho et al. (NeurIPS 2013); the
strategy around it, and what the numbers mean, are described in parameter_server.py. Messages
are handled one at a time, in arrival order, by this thread alone; after each, whatever it made
ready (a full BSP round, an SSP reply whose gate opened, a barrier) is answered.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from paratrain.config import Config
from paratrain.strategies import ps_protocol as wire
from paratrain.strategies.ps_protocol import Kind, Message


class Server:
    def __init__(self, cfg: Config, index: int, num_workers: int, names: list[str], params: list, optimizer):
        self.mode, self.slack = cfg.strategy.ps.mode, cfg.strategy.ps.staleness
        self.index, self.num_workers = index, num_workers
        self.names, self.params, self.optimizer = names, params, optimizer
        self.live, self.done, self.lost = set(range(num_workers)), set(), []
        self.clock = [0] * num_workers  # gradients applied per worker (SSP's clocks)
        self.version = 0  # updates applied to this shard
        self.round: dict[int, Message] = {}  # BSP: the open round's gradients, by worker
        self.held: dict[int, int] = {}  # SSP: worker -> staleness of its applied gradient, reply held back
        self.at_barrier: set[int] = set()
        self.final_sent = False
        self.staleness: Counter[int] = Counter()
        self.push_bytes = self.pull_bytes = self.checkpoint_bytes = 0  # gradients in, parameters out, state out

    def run(self) -> None:
        """Serve until every worker is done or lost."""
        numel = sum(p.numel() for p in self.params)
        inbox = wire.Inbox(list(range(self.num_workers)), numel, self.params[0].dtype if self.params else torch.float32)
        handlers = {Kind.PUSH: self._push, Kind.BARRIER: self._barrier, Kind.STATE: self._state,
                    Kind.DONE: self._done, Kind.DEAD: self._lose}
        while self.live - self.done:
            msg = inbox.get()
            handlers[msg.kind](msg)
            if self.mode == "bsp":
                self._close_round()
            if self.mode == "ssp":
                self._open_gate()
            if self.index == 0:
                self._release_barrier()
        for t in inbox.threads:  # each ended with its worker's DONE or death
            t.join()

    # -- gradients
    def _push(self, msg: Message) -> None:
        self.push_bytes += wire.HEADER_BYTES + msg.payload.numel() * msg.payload.element_size()
        if self.mode == "bsp":
            self.round[msg.worker] = msg
            return
        stale = self.version - msg.version
        self._apply(msg.payload, msg.lr)
        self.staleness[stale] += 1
        self.clock[msg.worker] += 1
        if self.mode == "asp":
            self._reply(msg.worker, stale, wire.flatten(self.params))
        else:
            self.held[msg.worker] = stale

    def _close_round(self) -> None:
        """BSP: once every live worker has pushed, average (worker order: deterministic) and step once."""
        expected = self.live - self.done
        if not expected or not expected <= self.round.keys():
            return
        msgs = [self.round.pop(w) for w in sorted(self.round)]
        assert len({m.clock for m in msgs}) == 1, "BSP: gradients of different steps in one round"
        total = msgs[0].payload.clone()
        for m in msgs[1:]:
            total += m.payload
        version = self.version
        self._apply(total / len(msgs), msgs[0].lr)
        flat = wire.flatten(self.params)
        for m in msgs:
            self.staleness[version - m.version] += 1
            self._reply(m.worker, version - m.version, flat)

    def _open_gate(self) -> None:
        """SSP: answer a held pull once its worker is at most `staleness` clocks ahead of the slowest."""
        active = [self.clock[w] for w in self.live - self.done]
        slowest = min(active) if active else 0
        ready = [w for w in sorted(self.held) if self.clock[w] - slowest <= self.slack]
        flat = wire.flatten(self.params) if ready else None
        for w in ready:
            self._reply(w, self.held.pop(w), flat)

    def _apply(self, grad: torch.Tensor, lr: float) -> None:
        for p, g in zip(self.params, wire.unflatten(grad, self.params)):
            p.grad = g
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1

    def _reply(self, worker: int, stale: int, flat: torch.Tensor) -> None:
        head = torch.tensor([self.version, stale], dtype=torch.float64)
        try:
            dist.send(head, dst=worker, tag=wire.REPLY)
            dist.send(flat, dst=worker, tag=wire.PAYLOAD)
        except RuntimeError:  # gone: its receiving thread reports the death, and _lose acts on it
            return
        self.pull_bytes += head.numel() * 8 + flat.numel() * flat.element_size()

    # -- membership (server 0 coordinates), lost workers, checkpoints
    def _barrier(self, msg: Message) -> None:
        self.at_barrier.add(msg.worker)

    def _done(self, msg: Message) -> None:
        self.done.add(msg.worker)

    def _release_barrier(self) -> None:
        """Answer a barrier (or, once all are done, the final one) with the live workers."""
        if self.at_barrier and self.live <= self.at_barrier:
            self._send_members(sorted(self.at_barrier))
            self.at_barrier.clear()
        if self.live and self.live <= self.done and not self.final_sent:
            self._send_members(sorted(self.live))
            self.final_sent = True

    def _send_members(self, workers: list[int]) -> None:
        mask = torch.zeros(self.num_workers, dtype=torch.float64)
        mask[sorted(self.live)] = 1
        for w in workers:
            try:
                dist.send(mask, dst=w, tag=wire.REPLY)
            except RuntimeError:  # lost in between: its thread reports it
                pass

    def _lose(self, msg: Message) -> None:
        worker = msg.worker
        self.live.discard(worker)
        self.lost.append(worker)
        for pending in (self.round, self.held):
            pending.pop(worker, None)  # its data shard is no longer trained on
        self.at_barrier.discard(worker)

    def _state(self, msg: Message) -> None:
        state = {"model": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)},
                 "optimizer": named_optimizer_state(self.optimizer, self.names)}
        self.checkpoint_bytes += wire.send_object(state, msg.worker)

    def report(self) -> dict:
        bound = {"bsp": 0, "ssp": (self.num_workers - 1) * (2 * self.slack + 1), "asp": None}[self.mode]
        return {"server": self.index, "mode": self.mode, "parameters": sum(p.numel() for p in self.params),
                "updates": self.version, "gradients": sum(self.staleness.values()),
                "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
                "max_staleness": max(self.staleness, default=0), "staleness_bound": bound,
                "lost_workers": self.lost, "push_bytes": self.push_bytes, "pull_bytes": self.pull_bytes,
                "checkpoint_bytes": self.checkpoint_bytes}


def named_optimizer_state(optimizer, names: list[str]) -> dict:
    """torch's index-keyed optimizer state -> the name-keyed form checkpoints hold."""
    if optimizer is None:
        return {"state": {}, "param_groups": []}
    sd = optimizer.state_dict()
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_named_optimizer(optimizer, names: list[str], full: dict) -> None:
    """This shard's entries of a name-keyed optimizer state (from any layout) into `optimizer`."""
    if not full["param_groups"]:
        return
    state = {i: full["state"][n] for i, n in enumerate(names) if n in full["state"]}
    group = {**full["param_groups"][0], "params": list(range(len(names)))}  # hyperparameters: one group
    optimizer.load_state_dict({"state": state, "param_groups": [group]})
