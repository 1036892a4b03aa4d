"""A NaN or Inf loss or gradient: stop before the update, or skip it on every rank.

Checked before every optimizer update: this rank's loss (before any averaging) and its
gradients' norms (`check_update`). Where ranks step together (`Strategy.lockstep`) they agree with one all-reduce
of a world-size vector, slot r set when rank r is non-finite, so every rank takes the same
decision and the message names the ranks; local SGD, DiLoCo, gossip and Hogwild replicas decide
alone, as they update alone. Written here: torch has no update guard outside AMP's GradScaler,
which is for fp16 loss scaling and skips silently.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

NONFINITE_EXIT = 3  # the exit code of a stop on a non-finite step (the CLI's, and a worker's)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under training.on_nonfinite = 'stop' (step filled in by the
    trainer), or a non-finite weight a checkpoint would have held (checkpoint.py)."""

    STOPPED = " (training.on_nonfinite = 'stop'); stopped before the update, no checkpoint written with it"

    def __init__(self, ranks: list[int], step: int | None = None, where: str = "loss", outcome: str = STOPPED):
        self.ranks, self.step, self.where, self.outcome = ranks, step, where, outcome
        super().__init__(self.message())

    def message(self) -> str:
        at = f"step {self.step}: " if self.step is not None else ""
        who = f" on rank{'s' if len(self.ranks) > 1 else ''} {', '.join(map(str, self.ranks))}" if self.ranks else ""
        return f"{at}non-finite {self.where}{who}{self.outcome}"


def bad_ranks(loss: torch.Tensor, params, rank: int, world_size: int, agree: bool) -> tuple[list[int], str]:
    """The ranks whose loss is not finite, or else those whose gradients are not (an all-reduce
    spreads one rank's NaN to every rank's gradients: the loss names where it came from), agreed
    over the world where `agree`; and which of the two it is."""
    # A DTensor's local shard (by its method: importing DTensor costs every process 0.5 s of start-up).
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    loss = loss.detach().float().reshape(1)
    norms = torch.stack(torch._foreach_norm(grads)).float().to(loss.device) if grads else loss.new_zeros(1)
    mine = torch.stack([~loss.isfinite().all(), ~norms.isfinite().all()]).float()
    if agree and world_size > 1:
        flags = torch.zeros(2, world_size, device=loss.device)
        flags[:, rank] = mine
        dist.all_reduce(flags)  # not metered: a guard, not training traffic
    else:
        flags = torch.zeros(2, 1)
        flags[:, 0] = mine
    ranks = list(range(world_size)) if agree and world_size > 1 else [rank]
    for row, where in ((0, "loss"), (1, "gradient")):
        bad = [ranks[i] for i in flags[row].nonzero().flatten().tolist()]
        if bad:
            return bad, where
    return [], ""


def check_update(strategy, loss: torch.Tensor, params) -> bool:
    """Before `strategy`'s update: True to take it, False to skip it (training.on_nonfinite =
    'skip'); NonFiniteError to stop. Agreed over the world where the strategy is `lockstep`."""
    topo = strategy.topo
    bad, where = bad_ranks(loss, list(params), topo.group_rank, topo.world_size, strategy.lockstep)
    bad = [r + topo.rank - topo.group_rank for r in bad]  # named as the job numbers them
    if bad and strategy.cfg.training.on_nonfinite == "stop":
        raise NonFiniteError(bad, where=where)
    return not bad
