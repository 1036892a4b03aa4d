"""Whole steps of the built-in GPT, measured for calibrate.py against what the planner adds up from
the calibrated parts for the same models:
- forwards and backwards of two small GPTs plain (`compute_factor`, which cost.py scales every
  model's compute by) and under DDP (`ddp_cost`: its all-reduce in backward, per step and per
  gradient byte, as a step pays it);
- the first under tensor parallelism, beyond its fixed costs (`tp_factor`), and as real two-stage
  pipelines (1F1B at 2 and 8 micro-batches, GPipe at 8) against the planner's own simulation of
  them (`pp_factor` and each schedule's cost per send, `pipeline_costs`).
Each runs on the two ranks of `paratrain calibrate`'s group, the mean of its timings (a run's
summary reports its mean step). Written by hand: torch measures none of these; each times
torch's own modules (DDP, DTensor, torch.distributed.pipelining) as paratrain's strategies use
them. The pieces of the frameworks' own costs are framework.py's.
"""
from __future__ import annotations

import time
from functools import lru_cache
from statistics import mean

import torch

# The models whose whole steps measure `compute_factor` and DDP's cost: the built-in GPT at 2 x 192
# and 2 x 384 (neither of benchmarks/planner.py's two), one rank's share of a batch of 16. The
# first is also the one tensor parallelism's whole step runs.
STEP_SETS = ("model.n_layer=2", "model.d_model=192", "model.n_head=4", "model.block_size=64")
STEP_MODELS = (STEP_SETS, ("model.n_layer=2", "model.d_model=384", "model.n_head=4", "model.block_size=64"))
STEP_BATCH = 8
# ... and their plain forward and backward at half that: a micro-batch's size (a pipeline of 4
# micro-batches, or gradient accumulation, takes the batch in such parts), which this machine runs
# more slowly for its work than a whole batch (seen: 5 to 13% over six GPTs, 2 x 192 to 8 x 256)
SMALL_BATCH = 4


def step_seconds(device: str) -> dict:
    """{"plain": [seconds], "ddp": [seconds], "small": [seconds], "zero2": [seconds], "zero3":
    [seconds], "gradient_bytes": [bytes]}, one of each per STEP_MODELS GPT: its forward, loss and
    backward as the trainer runs them (gradients allocated afresh: the update sets them to None),
    plain, under DDP as paratrain's ddp strategy wraps it (its timed all-reduce hook), plain on
    SMALL_BATCH samples, and under FSDP2 as paratrain's zero2 and zero3 shard it, both ranks at
    once. They alternate, step by step, so that the machine's speed as it drifts falls on all
    alike; each the mean of 2 x calibrate's timings, as a run's summary reports its mean step (the
    machine's interruptions fall on some steps)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.comm import CommMeter
    from paratrain.config import load_config
    from paratrain.data import build_datasets
    from paratrain.models import build_loss, build_model
    from paratrain.planner.calibrate import REPEATS
    from paratrain.strategies.data_parallel.ddp import _HookState, timed_allreduce_hook
    from paratrain.strategies.data_parallel.zero import shard_blocks

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    out: dict = {"plain": [], "ddp": [], "small": [], "zero2": [], "zero3": [], "gradient_bytes": []}
    for sets in STEP_MODELS:
        cfg = load_config(None, list(sets))
        vocab = build_datasets(cfg).vocab_size
        torch.manual_seed(0)
        model, loss_fn = build_model(cfg, vocab).to(device), build_loss(cfg)
        zero2, zero3 = (shard_blocks(build_model(cfg, vocab).to(device), mesh, reshard) for reshard in (False, True))
        wrapped = DistributedDataParallel(model, device_ids=[device] if device == "cuda" else None,
                                          bucket_cap_mb=cfg.strategy.ddp.bucket_mb,
                                          gradient_as_bucket_view=cfg.strategy.ddp.gradient_as_bucket_view)
        wrapped.register_comm_hook(_HookState(dist.group.WORLD, CommMeter()), timed_allreduce_hook)
        tokens = torch.randint(0, vocab, (STEP_BATCH, cfg.model.block_size + 1), device=device)

        def step(m, batch=STEP_BATCH, loss_fn=loss_fn, tokens=tokens) -> float:
            m.zero_grad(set_to_none=True)
            dist.barrier()  # the ranks start together, as a step's do
            t0 = time.perf_counter()
            loss_fn(m(tokens[:batch, :-1]), tokens[:batch, 1:]).backward()
            return time.perf_counter() - t0

        def all_five(models=(model, wrapped, zero2, zero3)):
            plain, ddp, shard2, shard3 = models
            return step(plain), step(ddp), step(plain, SMALL_BATCH), step(shard2), step(shard3)

        all_five()  # warm-up
        times = [all_five() for _ in range(2 * REPEATS)]
        for i, name in enumerate(("plain", "ddp", "small", "zero2", "zero3")):
            out[name].append(mean(t[i] for t in times))
        out["gradient_bytes"].append(4.0 * sum(q.numel() for q in model.parameters()))
    return out


def compute_factor(measured_s: list[float], cal, batch: int = STEP_BATCH) -> float:
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

    cluster = replace(cal, compute_factor=1.0, compute_curve=[]).cluster(1)
    predicted = sum(estimate(Plan(), profile_config(load_config(None, list(sets))), cluster, batch).compute_s
                    for sets in STEP_MODELS[:len(measured_s)])
    return sum(measured_s) / predicted if predicted > 0 else 1.0


def compute_curve(steps: dict, cal) -> list[list[float]]:
    """[[tokens in a forward, compute_factor], ...]: `compute_factor` at SMALL_BATCH and STEP_BATCH
    samples (`step_seconds`' small and plain steps), for cost.py to take at a plan's micro-batch
    (interpolated in log(tokens) between the two, held flat beyond)."""
    from paratrain.config import load_config

    seq = load_config(None, list(STEP_SETS)).model.block_size
    return [[SMALL_BATCH * seq, compute_factor(steps["small"], cal, SMALL_BATCH)],
            [STEP_BATCH * seq, compute_factor(steps["plain"], cal)]]


def solve(cal, got: dict):
    """`cal` with the figures the whole steps solve (`calibrate._rank`'s "step_s", "tp_step_s" and
    "pp_step_s"): compute_factor at both sizes, DDP's cost, tp_factor, pp_factor and the cost per
    send, each solved with the ones before it in."""
    from dataclasses import replace

    steps = got["step_s"]
    curve = compute_curve(steps, cal)
    cal = replace(cal, compute_factor=curve[-1][1], compute_curve=curve, ddp=ddp_cost(steps))
    cal = replace(cal, tp_factor=tp_factor(got["tp_step_s"], cal))
    # against the pipeline's own model (STEP_SETS) at its own micro-batches' sizes: a stage's
    # slowdown beyond what the same GPT pays whole on as few samples (that the curve carries)
    own = compute_curve({k: steps[k][:1] for k in ("plain", "small")}, cal)
    pp_factor, send = pipeline_costs(got["pp_step_s"], replace(cal, compute_curve=own))
    return replace(cal, pp_factor=pp_factor, pipeline_send=send, fsdp_factor=fsdp_factors(steps, cal))


def fsdp_factors(steps: dict, cal) -> dict:
    """"zero2"/"zero3" -> the factor on FSDP2's bytes (its collectives' beyond their start-up, and
    the copies around them) at which the planner's sharded step exceeds its plain one by what
    `step_seconds` measured, summed over STEP_MODELS, given the fixed costs calibrated on a tiny
    GPT (framework.fsdp_seconds). Those at width 8 carry no bytes; at a real GPT's sizes FSDP2's
    per-tensor copies into and out of its flat buffers cost more than memory bandwidth says, and
    the collectives run on gloo's threads beside the ones computing (seen: a 4 x 128 GPT's zero2
    step 30% over its prediction, an 8 x 256 one's 20%). By bisection on cost.py's own estimate."""
    from dataclasses import replace

    from paratrain.config import load_config
    from paratrain.planner.commands import profile_config
    from paratrain.planner.cost import estimate
    from paratrain.planner.framework import rising_root
    from paratrain.planner.plan import Plan

    profiles = [profile_config(load_config(None, list(sets))) for sets in STEP_MODELS]
    out = {}
    for zero in (2, 3):
        name = f"zero{zero}"
        measured = sum(z - p for z, p in zip(steps[name], steps["plain"]))

        def surplus(k: float, name=name, zero=zero) -> float:
            cluster = replace(cal, fsdp_factor={name: k}).cluster(2)
            return sum(estimate(Plan(dp=2, zero=zero), profile, cluster, 2 * STEP_BATCH).comm_s for profile in profiles)

        out[name] = rising_root(surplus, measured, hi=20.0)
    return out


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

    cfg = load_config(None, list(STEP_SETS))
    m, vocab = cfg.model, build_datasets(cfg).vocab_size
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


# The real pipelines whose steps solve `pp_factor` and each schedule's cost per send: 1F1B at two
# micro-batch counts (how a step grows with its messages), GPipe (its sends, all forwards' then all
# backwards', wait on their own).
PIPELINE_RUNS = (("1f1b", 2), ("1f1b", 8), ("gpipe", 8))


def pipeline_sets(schedule: str, microbatches: int) -> list[str]:
    return [*STEP_SETS, "strategy.name=pipeline", f"strategy.pipeline.schedule={schedule}",
            f"strategy.pipeline.microbatches={microbatches}"]


def pipeline_gpt_seconds(device: str) -> dict:
    """{"1f1b m2": seconds, "1f1b m2 busy": seconds, ...}: one step (forward, loss and backward of its
    micro-batches) of the STEP_SETS GPT cut into two stages of a block each, for each of
    PIPELINE_RUNS, on the current group's two ranks, as paratrain's pipeline strategy builds it
    (torch's PipelineStage and its schedule, its actions timed by paratrain's StageClock), on a
    batch of 16: the mean of 4 x calibrate's timings, the ranks starting together; and the busier
    rank's time in its stage's forwards and backwards, a step's mean."""
    import torch.distributed as dist

    from paratrain.config import load_config
    from paratrain.data import build_datasets
    from paratrain.models import build_loss, build_model
    from paratrain.planner.calibrate import REPEATS, timings
    from paratrain.strategies.pipeline.instrument import StageClock
    from paratrain.strategies.pipeline.pipeline import SCHEDULES, _Stage
    from paratrain.strategies.pipeline.split import build_stage

    out, rank = {}, dist.get_rank()
    for schedule, m in PIPELINE_RUNS:
        cfg = load_config(None, pipeline_sets(schedule, m))
        vocab = build_datasets(cfg).vocab_size
        torch.manual_seed(0)
        part = build_stage(build_model(cfg, vocab), [0, 1], rank).to(device)
        stage = _Stage(part, rank, 2, torch.device(device))
        events: list[tuple] = []
        StageClock(events).attach(stage, sends_forward=rank == 0, sends_backward=rank == 1)
        run = SCHEDULES[schedule](stage, m, loss_fn=build_loss(cfg))
        tokens = torch.randint(0, vocab, (2 * STEP_BATCH, cfg.model.block_size + 1), device=device)
        busy: list[float] = []

        def step(part=part, run=run, tokens=tokens, events=events, busy=busy):
            part.zero_grad(set_to_none=True)
            events.clear()
            run.step(*([tokens[:, :-1]] if rank == 0 else []), target=tokens[:, 1:] if rank == 1 else None)
            busy.append(sum(end - start for *_, start, end in events))

        out[f"{schedule} m{m}"] = mean(timings(step, 4 * REPEATS, before=dist.barrier))
        busiest = torch.tensor([mean(busy[1:])])  # past the warm-up
        dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
        out[f"{schedule} m{m} busy"] = float(busiest)
    return out


def pipeline_costs(measured: dict, cal) -> tuple[float, dict]:
    """(pp_factor, {schedule: seconds per send}) from `pipeline_gpt_seconds`' measurements: the
    factor cost.py scales a pipeline stage's forward and backward by, at which the planner's busiest
    rank computes as long as the real one did in 1F1B's forwards and backwards; then, at that
    factor, what each message between stages costs beyond the link's latency and bytes for the
    simulation of each schedule to take its measured steps (solved by bisection: a step grows with
    it). What they take in: a stage computes a micro-batch more slowly than the same work in a whole
    model, and a message arriving while its receiver computes waits for gloo's thread to get a core
    (seen here: a 4 x 96 GPT's 1F1B step 35 ms at 2 micro-batches and 49 at 8, where the stages'
    compute grew by 9 and the simulation's step, sends at the link's figures, by 0.4). Solved from
    the time in the actions rather than from whole steps: the steps' waits vary from one timing to
    the next far more than the actions do. `cal`'s compute curve: the STEP_SETS GPT's own
    (calibrate.py), so that the factor is a stage's beyond the whole model on as few samples."""
    from dataclasses import replace

    from paratrain.planner.framework import rising_root

    def runs(schedule: str) -> list[tuple[str, list[str]]]:
        return [(f"{s} m{m}", pipeline_sets(s, m)) for s, m in PIPELINE_RUNS if s == schedule]

    # the actions' time as StageClock measures it: the stages' forwards and backwards alone, not the
    # schedule's runtime around them nor the sends (which the simulation's busy time holds too)
    stages = sum(stage_compute(cal, sets) for _, sets in runs("1f1b"))
    factor = sum(measured[f"{key} busy"] for key, _ in runs("1f1b")) / stages if stages > 0 else 1.0
    solved = replace(cal, pipeline_send={}, pp_factor=factor)

    def send(schedule: str) -> float:
        def step(cost: float) -> float:
            at = replace(solved, pipeline_send={schedule: cost})
            return sum(_predicted(at, sets) for _, sets in runs(schedule))

        return rising_root(step, sum(measured[key] for key, _ in runs(schedule)), 0.02)

    return factor, {schedule: send(schedule) for schedule in dict(PIPELINE_RUNS)}


def _estimate(cal, sets: list[str]):
    """The planner's estimate of the plan `sets` runs on two ranks, on a batch of 16, with `cal`."""
    from paratrain.planner.cost import estimate

    plan, profile = _plan(tuple(sets))
    return estimate(plan, profile, cal.cluster(2), 2 * STEP_BATCH)


def stage_compute(cal, sets: list[str]) -> float:
    """The busiest rank's stages' forwards and backwards of the pipeline `sets` runs, at pp_factor 1
    (what the factor scales: the simulation's busy time less what it holds at factor 0)."""
    from dataclasses import replace

    at = [_estimate(replace(cal, pp_factor=k, pipeline_send={}), sets).compute_s for k in (0.0, 1.0)]
    return at[1] - at[0]


def _predicted(cal, sets: list[str]) -> float:
    """The planner's forward and backward (their communication in them) of the plan `sets`."""
    est = _estimate(cal, sets)
    return est.step_s - est.optimizer_s


@lru_cache(maxsize=16)
def _plan(sets: tuple[str, ...]) -> tuple:
    """(plan on two ranks, model profile) of `sets` on a batch of 16: traced once, solved many times."""
    from paratrain.config import load_config
    from paratrain.planner.commands import plan_of, profile_config

    cfg = load_config(None, [*sets, f"training.global_batch_size={2 * STEP_BATCH}"])
    return plan_of(cfg, 2), profile_config(cfg)


def _solve(measured_s: float, cal, factor: str, sets: list[str]) -> float:
    """The value of `cal`'s `factor` at which the planner predicts `measured_s` for the forward and
    backward of the plan `sets` runs on two ranks, on a batch of 16: what the factor leaves
    unscaled (factor 0) held, what it scales (factor 1 less factor 0) in proportion."""
    from dataclasses import replace

    fixed, whole = (_predicted(replace(cal, **{factor: value}), sets) for value in (0.0, 1.0))
    return max(0.0, measured_s - fixed) / (whole - fixed) if whole > fixed else 1.0
