"""One plan's memory per device, on its busiest rank (cost.estimate calls it before the step).

Parameters, gradients and optimizer state per ZeRO stage and dtype (Rajbhandari et al. 2020,
"ZeRO": each stage shards one more of the three; bytes a parameter as paratrain holds them,
`param_bytes`); the activations the
schedule holds at its peak (schedule.peak_held: an order's count, whatever the durations) per
recomputation mode (Korthikanti et al. 2022); and the gathered parameters FSDP2 holds: two blocks
under ZeRO-3, all of them from forward to backward under ZeRO-2.
"""
from __future__ import annotations

from paratrain.planner.schedule import peak_held


def param_bytes(dtype: str) -> tuple[float, float, float]:
    """Bytes per parameter: (parameter as computed, gradient, optimizer incl. fp32 master copy)."""
    return (2.0, 4.0, 12.0) if dtype == "bf16" else (4.0, 4.0, 8.0)


def memory(lay) -> dict:
    """Bytes per device on the busiest rank of `lay` (cost._Layout: the plan's stages and shares):
    model states per ZeRO stage and dtype, the activations the schedule holds at its peak (an
    order's count, whatever the durations), FSDP2's gathered parameters."""
    plan, tp, pp = lay.plan, lay.plan.tp, lay.plan.pp
    p_bytes, g_bytes, o_bytes = param_bytes(plan.dtype)
    zero = plan.zero if plan.family == "sync" and plan.dp > 1 else 0
    n = plan.dp
    # FSDP2 (ZeRO-2 and 3) shards the parameters; ZeRO-2 (reshard_after_forward off) holds every
    # gathered parameter from its forward to its backward, ZeRO-3 the two blocks it has prefetched
    out = {"params": lay.local_params * p_bytes / (n if zero >= 2 else 1),
           # accumulating over micro-batches, FSDP2's no_sync keeps whole gradients until the last one
           "grads": lay.local_params * g_bytes / (n if zero >= 2 and plan.microbatches == 1 else 1),
           # a parameter server's workers hold no optimizer state: its servers step
           "optimizer": 0.0 if plan.family == "parameter_server"
           else lay.local_params * o_bytes / (n if zero >= 1 else 1)}

    def tp_share(nbytes: float) -> float:  # tensor parallelism splits most activations (Korthikanti: 24 of 34)
        return nbytes / tp if plan.sequence_parallel else nbytes * (24 / 34 / tp + 10 / 34) if tp > 1 else nbytes

    per_stage, working = [], 0.0
    for blocks in lay.stages:
        if plan.recompute == "full":  # each layer's input is kept; one layer's activations while it recomputes
            saved = sum(b.boundary for b in blocks)
            working = max(working, tp_share(max(b.saved for b in blocks)) * lay.mb)
        else:
            saved = sum(b.saved_selective if plan.recompute == "selective" else b.saved for b in blocks)
        per_stage.append(tp_share(saved) * lay.mb)
    held = peak_held(plan.schedule, pp, plan.microbatches, plan.virtual) if pp > 1 else (1.0,)
    out["activations"] = working + max(held[r] * max(per_stage[s] for s in lay.rank_stages[r]) for r in range(pp))
    if zero == 3:
        out["buffers"] = 2 * max((b.params for b in lay.model.blocks), default=0) / tp * p_bytes
    elif zero == 2 or (plan.strategy() == "hybrid" and plan.dp > 1):  # hybrid's replicated dp axis is FSDP2 too
        out["buffers"] = lay.local_params * p_bytes
    return out
