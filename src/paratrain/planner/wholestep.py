"""Whole steps of the built-in GPT, measured for calibrate.py against what the planner adds up from
the calibrated parts for the same models:
- forwards and backwards of two small GPTs plain (`compute_factor`, which cost.py scales every
  model's compute by) and under DDP (`ddp_cost`: its all-reduce in backward, per step and per
  gradient byte, as a step pays it);
- the first under tensor parallelism, beyond its fixed costs (`tp_factor`), and as a real
  two-stage 1F1B pipeline against the planner's own simulation of it (`pp_factor`).
Each runs on the two ranks of `paratrain calibrate`'s group, the mean of its timings (a run's
summary reports its mean step). Written by hand: torch measures none of these; each times
torch's own modules (DDP, DTensor, torch.distributed.pipelining) as paratrain's strategies use
them. The pieces of the frameworks' own costs are framework.py's.
"""
from __future__ import annotations

import time
from statistics import mean

import torch

# The models whose whole steps measure `compute_factor` and DDP's cost: the built-in GPT at 2 x 192
# and 2 x 384 (neither of benchmarks/planner.py's two), one rank's share of a batch of 16. The
# first is also the one tensor parallelism's whole step runs.
STEP_SETS = ("model.n_layer=2", "model.d_model=192", "model.n_head=4", "model.block_size=64")
STEP_MODELS = (STEP_SETS, ("model.n_layer=2", "model.d_model=384", "model.n_head=4", "model.block_size=64"))
STEP_BATCH = 8


def step_seconds(device: str) -> dict:
    """{"plain": [seconds], "ddp": [seconds], "gradient_bytes": [bytes]}, one of each per STEP_MODELS
    GPT: its forward, loss and backward as the trainer runs them (gradients allocated afresh: the
    update sets them to None), plain and under DDP as paratrain's ddp strategy wraps it (its timed
    all-reduce hook), both ranks at once. The two alternate, step by step, so that the machine's
    speed as it drifts falls on both alike; each the mean of 2 x calibrate's timings, as a run's
    summary reports its mean step (the machine's interruptions fall on some steps)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.comm import CommMeter
    from paratrain.config import load_config
    from paratrain.data import build_datasets
    from paratrain.models import build_loss, build_model
    from paratrain.planner.calibrate import REPEATS
    from paratrain.strategies.data_parallel.ddp import _HookState, timed_allreduce_hook

    out: dict = {"plain": [], "ddp": [], "gradient_bytes": []}
    for sets in STEP_MODELS:
        cfg = load_config(None, list(sets))
        vocab = build_datasets(cfg).vocab_size
        torch.manual_seed(0)
        model, loss_fn = build_model(cfg, vocab).to(device), build_loss(cfg)
        wrapped = DistributedDataParallel(model, device_ids=[device] if device == "cuda" else None,
                                          bucket_cap_mb=cfg.strategy.ddp.bucket_mb,
                                          gradient_as_bucket_view=cfg.strategy.ddp.gradient_as_bucket_view)
        wrapped.register_comm_hook(_HookState(dist.group.WORLD, CommMeter()), timed_allreduce_hook)
        tokens = torch.randint(0, vocab, (STEP_BATCH, cfg.model.block_size + 1), device=device)

        def step(m, loss_fn=loss_fn, tokens=tokens) -> float:
            m.zero_grad(set_to_none=True)
            dist.barrier()  # the ranks start together, as a step's do
            t0 = time.perf_counter()
            loss_fn(m(tokens[:, :-1]), tokens[:, 1:]).backward()
            return time.perf_counter() - t0

        step(model), step(wrapped)  # warm-up
        times = [(step(model), step(wrapped)) for _ in range(2 * REPEATS)]
        out["plain"].append(mean(t for t, _ in times))
        out["ddp"].append(mean(t for _, t in times))
        out["gradient_bytes"].append(4.0 * sum(q.numel() for q in model.parameters()))
    return out


def compute_factor(measured_s: list[float], cal) -> float:
    """Real forwards and backwards (`step_seconds`' plain ones) over what the planner adds up from
    `cal`'s parts for the same models (cost.py's compute of one device), the factor cost.py scales
    compute by. On a CPU the parts, each timed alone, miss what a model pays between them:
    activations passed from one operator to the next through memory rather than cache, nn.Module
    calls, autograd's graph; and the parts drift between calibrations minutes apart, which whole
    steps measured beside them take back out (seen: 0.90 to 1.15 over a dozen calibrations of one
    machine from one model of 0.4 s of steps; hence two, and more steps)."""
    from dataclasses import replace

    from paratrain.config import load_config
    from paratrain.planner.commands import profile_config
    from paratrain.planner.cost import estimate
    from paratrain.planner.plan import Plan

    cluster = replace(cal, compute_factor=1.0).cluster(1)
    predicted = sum(estimate(Plan(), profile_config(load_config(None, list(sets))), cluster, STEP_BATCH).compute_s
                    for sets in STEP_MODELS[:len(measured_s)])
    return sum(measured_s) / predicted if predicted > 0 else 1.0


def ddp_cost(steps: dict) -> list[float]:
    """[seconds a step, per gradient byte] that a forward and backward under DDP takes beyond the
    same without it (`step_seconds`), solved from its two models. What it takes in beyond the
    calibrated all-reduce: the hook's division of the bucket by the world size (a pass over the
    gradients), the reducer's own work, and the all-reduce on gloo's threads while backward
    computes on the same cores (seen: 36 ms for an 8 x 256 GPT's 25 MB, 17 predicted from the
    link)."""
    (b1, b2), (p1, p2), (d1, d2) = steps["gradient_bytes"], steps["plain"], steps["ddp"]
    t1, t2 = max(0.0, d1 - p1), max(0.0, d2 - p2)
    per_byte = max(0.0, (t2 - t1) / (b2 - b1))
    return [max(0.0, t1 - per_byte * b1), per_byte]


def tensor_parallel_step_seconds(mesh, device: str) -> float:
    """Seconds of one forward, loss and backward of the STEP_SETS GPT under tensor parallelism on
    the two ranks of `mesh` (parallelize.py, the vocabulary-parallel loss), on the whole batch of
    16 as a tensor-parallel pair takes it: the mean of calibrate's timings, as `step_seconds`."""
    from torch.distributed.tensor.parallel import loss_parallel

    from paratrain.config import load_config
    from paratrain.data import build_datasets
    from paratrain.models.gpt import GPT, cross_entropy
    from paratrain.planner.calibrate import REPEATS, timings
    from paratrain.strategies.tensor.parallelize import parallelize_gpt, replicated_loss

    m = load_config(None, list(STEP_SETS)).model
    vocab = build_datasets(load_config(None, list(STEP_SETS))).vocab_size
    torch.manual_seed(0)  # the same weights on both ranks, as a run starts
    model = parallelize_gpt(GPT(vocab, n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model,
                                block_size=m.block_size).to(device), mesh, False)
    loss_fn = replicated_loss(cross_entropy)
    tokens = torch.randint(0, vocab, (2 * STEP_BATCH, m.block_size + 1), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        with loss_parallel():
            loss_fn(model(tokens[:, :-1]), tokens[:, 1:]).backward()

    return mean(timings(step, 2 * REPEATS))


def tp_factor(measured_s: float, cal) -> float:
    """A real tensor-parallel forward and backward (`tensor_parallel_step_seconds`) beyond its
    calibrated fixed costs, over what the planner adds up for the rest (its arithmetic, bytes and
    all-reduces' bytes): the factor cost.py scales that rest by under tensor parallelism. What it
    takes in: each all-reduce of activations waits for both ranks, and on this machine a tenth
    of them took 5 ms where the median took 1 (an 8 x 256 GPT: 80 ms a step waiting in 37
    all-reduces, against 24 predicted from the calibrated link), and DTensor's copies between
    layouts."""
    return _solve(measured_s, cal, "tp_factor", [*STEP_SETS, "strategy.name=tensor"])


PIPELINE_SETS = ("strategy.name=pipeline", "strategy.pipeline.schedule=1f1b", "strategy.pipeline.microbatches=4")


def pipeline_gpt_seconds(device: str) -> float:
    """Seconds of one 1F1B step (forward, loss and backward of 4 micro-batches) of the STEP_SETS
    GPT cut into two stages of a block each, on the current group's two ranks, as paratrain's
    pipeline strategy builds it (torch's PipelineStage and Schedule1F1B), on a batch of 16: the
    mean of 2 x calibrate's timings, the ranks starting together."""
    import torch.distributed as dist
    from torch.distributed.pipelining import Schedule1F1B

    from paratrain.config import load_config
    from paratrain.data import build_datasets
    from paratrain.models import build_loss, build_model
    from paratrain.planner.calibrate import REPEATS, timings
    from paratrain.strategies.pipeline.pipeline import _Stage
    from paratrain.strategies.pipeline.split import build_stage

    cfg = load_config(None, [*STEP_SETS, *PIPELINE_SETS])
    vocab, rank = build_datasets(cfg).vocab_size, dist.get_rank()
    torch.manual_seed(0)
    part = build_stage(build_model(cfg, vocab), [0, 1], rank).to(device)
    stage = _Stage(part, rank, 2, torch.device(device))
    schedule = Schedule1F1B(stage, cfg.strategy.pipeline.microbatches, loss_fn=build_loss(cfg))
    tokens = torch.randint(0, vocab, (2 * STEP_BATCH, cfg.model.block_size + 1), device=device)

    def step():
        part.zero_grad(set_to_none=True)
        schedule.step(*([tokens[:, :-1]] if rank == 0 else []), target=tokens[:, 1:] if rank == 1 else None)

    return mean(timings(step, 2 * REPEATS, before=dist.barrier))


def pp_factor(measured_s: float, cal) -> float:
    """A real pipeline step (`pipeline_gpt_seconds`) over what the planner's simulation of the same
    plan makes of its stages' compute, its sends and each action's calibrated cost held as they
    are: the factor cost.py scales a pipeline stage's forward and backward by. What it takes in:
    a stage computes a micro-batch more slowly than the same work in a whole model (seen here: an
    8 x 256 GPT's forward of 4 samples, 15.6-19 ms a half in a GPipe run, 15 outside it), and a
    few of the sends between stages wait 5 ms where the rest take 0.1."""
    return _solve(measured_s, cal, "pp_factor", [*STEP_SETS, *PIPELINE_SETS])


def _solve(measured_s: float, cal, factor: str, sets: list[str]) -> float:
    """The value of `cal`'s `factor` at which the planner predicts `measured_s` for the forward and
    backward of the plan `sets` runs on two ranks, on a batch of 16: what the factor leaves
    unscaled (factor 0) held, what it scales (factor 1 less factor 0) in proportion."""
    from dataclasses import replace

    from paratrain.config import load_config
    from paratrain.planner.commands import plan_of, profile_config
    from paratrain.planner.cost import estimate

    cfg = load_config(None, [*sets, f"training.global_batch_size={2 * STEP_BATCH}"])
    plan, profile = plan_of(cfg, 2), profile_config(cfg)

    def predicted(value: float) -> float:
        est = estimate(plan, profile, replace(cal, **{factor: value}).cluster(2), 2 * STEP_BATCH)
        return est.step_s - est.optimizer_s  # forward and backward, their communication in them
    fixed, whole = predicted(0.0), predicted(1.0)
    return max(0.0, measured_s - fixed) / (whole - fixed) if whole > fixed else 1.0
