"""What paratrain's own strategies cost on a CPU beyond their arithmetic, measured for calibrate.py:
- a whole forward and backward of the built-in GPT against what its calibrated parts add up to
  (`compute_factor`), and the same under tensor parallelism beyond its fixed costs (`tp_factor`);
- DDP's gradient all-reduce in backward, as a step pays it, per step and per byte (`ddp_cost`);
- a real two-stage 1F1B pipeline of that GPT against the planner's simulation of it (`pp_factor`);
- the built-in GPT under DTensor tensor parallelism (dispatch, conversions and the small
  all-reduces inside, per block and at its ends) and under FSDP2 (its hooks, copies and the
  collectives' start-up per unit), each on a tiny GPT of two depths;
- the trainer's update after backward (clipping, the non-finite check, eager AdamW) per tensor
  and per parameter, the caches cleared first as a step leaves them;
- ZeroRedundancyOptimizer's step beyond AdamW on the rank's share (its broadcasts);
- torch.distributed.pipelining's runtime per action of each schedule, solved through the
  planner's own simulation (schedule.py), and a split backward's second graph walk;
- with more ranks than cores, a message's wait for its receiver to be scheduled again.
All run on the two ranks of `paratrain calibrate`'s group (the last on four); each figure is
calibrate's median (`_median`), a whole step the mean of its timings. Written by hand: torch
measures none of these; each times torch's own modules as paratrain's strategies use them.
"""
from __future__ import annotations

import time

import torch


def _median(fn) -> float:
    from paratrain.planner.calibrate import _median as median  # calibrate sets its repeats per run

    return median(fn)


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
    from statistics import mean

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
    from statistics import mean

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
    from dataclasses import replace

    from paratrain.config import load_config
    from paratrain.planner.commands import plan_of, profile_config
    from paratrain.planner.cost import estimate

    cfg = load_config(None, [*STEP_SETS, "strategy.name=tensor", f"training.global_batch_size={2 * STEP_BATCH}"])
    plan, profile = plan_of(cfg, 2), profile_config(cfg)

    def predicted(factor: float) -> float:
        est = estimate(plan, profile, replace(cal, tp_factor=factor).cluster(2), 2 * STEP_BATCH)
        return est.step_s - est.optimizer_s  # forward and backward, their all-reduces in them
    fixed, whole = predicted(0.0), predicted(1.0)
    return max(0.0, measured_s - fixed) / (whole - fixed) if whole > fixed else 1.0


PIPELINE_SETS = ("strategy.name=pipeline", "strategy.pipeline.schedule=1f1b", "strategy.pipeline.microbatches=4")


def pipeline_gpt_seconds(device: str) -> float:
    """Seconds of one 1F1B step (forward, loss and backward of 4 micro-batches) of the STEP_SETS
    GPT cut into two stages of a block each, on the current group's two ranks, as paratrain's
    pipeline strategy builds it (torch's PipelineStage and Schedule1F1B), on a batch of 16: the
    mean of 2 x calibrate's timings, the ranks starting together."""
    from statistics import mean

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
    from dataclasses import replace

    from paratrain.config import load_config
    from paratrain.planner.commands import plan_of, profile_config
    from paratrain.planner.cost import estimate

    cfg = load_config(None, [*STEP_SETS, *PIPELINE_SETS, f"training.global_batch_size={2 * STEP_BATCH}"])
    plan, profile = plan_of(cfg, 2), profile_config(cfg)

    def predicted(factor: float) -> float:
        est = estimate(plan, profile, replace(cal, pp_factor=factor).cluster(2), 2 * STEP_BATCH)
        return est.step_s - est.optimizer_s
    fixed, whole = predicted(0.0), predicted(1.0)
    return max(0.0, measured_s - fixed) / (whole - fixed) if whole > fixed else 1.0


# The GPTs (layers, width) whose parameters `zero1_sync_seconds` steps: one of many small tensors
# and one of few large ones, so that the two solve apart (neither is a benchmark's model)
ZERO1_MODELS = ((4, 96), (2, 384))


def zero1_sync_seconds(device: str) -> list[float]:
    """[seconds per parameter tensor, per byte] that ZeroRedundancyOptimizer's step costs beyond
    AdamW's on the rank's own share (handing each rank's updated parameters to the others: an
    asynchronous broadcast per tensor, then a wait on them all), on the parameters of the two
    ZERO1_MODELS GPTs, gradients set: the mean of 2 x calibrate's timings, each after the caches
    are cleared (`evict`: backward has passed over the model) and the ranks start together. On
    GPT parameters, not on tensors of one size: seen on two ranks of two cores, 96 tensors of
    1 Ki and 4 of 256 Ki predicted 9 ms for the small GPT's 45 tensors, where its own step paid 15
    (and 26 for the large GPT's 85, where it paid 41)."""
    from statistics import mean

    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from paratrain.models.gpt import GPT
    from paratrain.planner.calibrate import REPEATS, timings

    def before():
        evict()
        dist.barrier()

    points = []
    for layers, width in ZERO1_MODELS:
        torch.manual_seed(0)
        params = list(GPT(64, n_layer=layers, n_head=4, d_model=width, block_size=64).to(device).parameters())
        for q in params:
            q.grad = torch.ones_like(q)
        zero = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3)
        own = torch.optim.AdamW([q for group in zero.optim.param_groups for q in group["params"]], lr=1e-3)
        zero_s, own_s = (mean(timings(fn, 2 * REPEATS, before=before)) for fn in (zero.step, own.step))
        points.append((len(params), sum(q.numel() for q in params) * 4, max(0.0, zero_s - own_s)))
    (n1, b1, t1), (n2, b2, t2) = points
    per_byte = max(0.0, (t2 - t1 * n2 / n1) / (b2 - b1 * n2 / n1))
    return [max(0.0, (t1 - per_byte * b1) / n1), per_byte]


_scratch: list = []  # evict's buffer, made once


def evict(nbytes: int = 64 * 2**20) -> None:
    """Write over more memory than the caches hold: what follows finds its tensors in memory."""
    if not _scratch:
        _scratch.append(torch.empty(nbytes // 4))
    _scratch[0].fill_(1.0)


def update_seconds(params_of) -> list[float]:
    """[seconds per parameter tensor, per parameter] of the trainer's update, from two sets: 96
    tensors of 1 Ki values, and 4 of 1 Mi (with gradients and AdamW's moments, 64 MiB of state:
    more than the caches hold, as a model's). `params_of(shapes)` makes the parameters. Each
    timing starts with the caches cleared (`evict`): in training, forward and backward have
    passed over the whole model since the last update, and the update finds parameters,
    gradients and moments in memory (seen: 4.0 ns a parameter timed over and over on the same
    set, 6.5 in the update of an 8-layer GPT's training step; 3.2 on 4 tensors of 256 Ki after
    `evict`, where that GPT's 6.4 M parameters took 3.7 in training)."""
    from paratrain.nonfinite import bad_ranks
    from paratrain.planner.calibrate import REPEATS
    from paratrain.planner.calibrate import _median as median

    def timed(count: int, numel: int) -> float:
        params = params_of([numel] * count)
        for q in params:
            q.grad = torch.ones_like(q)
        opt = torch.optim.AdamW(params, lr=1e-3)

        def update():  # the gradients kept: backward's allocation of them is backward's cost
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            bad_ranks(torch.zeros(()), params, 0, 1, False)
            opt.step()

        # at least 3 timings (the median of 3 outlasts one interrupted): a fit from two points
        return median(update, max(3, min(5, REPEATS)), before=evict if params[0].device.type == "cpu" else None)

    small, large = (96, 1024), (4, 1024 * 1024)  # the second's state (64 MiB) past the caches, as a model's
    t_small, t_large = timed(*small), timed(*large)
    # t = a x tensors + b x parameters at both points
    det = small[0] * large[0] * large[1] - large[0] * small[0] * small[1]
    b = (small[0] * t_large - large[0] * t_small) / det
    a = (t_small - b * small[0] * small[1]) / small[0]
    return [max(0.0, a), max(0.0, b)]


def _spin(seconds: float) -> None:
    """Compute (small products) for `seconds` of wall time."""
    a = torch.randn(128, 128)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


WAKE_WORK_S = 0.005  # the compute before each send: a stage's action, small


def wake_rank(spinning: float, repeats: int) -> float | None:
    """One rank of `wake_seconds`: ranks 0 and 1 pass a message back and forth, each after
    WAKE_WORK_S of compute; the others compute for `spinning` seconds. Rank 0 returns seconds per
    hand-over (what each message costs beyond the compute), the others None."""
    import torch.distributed as dist

    from paratrain.planner.calibrate import _median as median

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, x = dist.get_rank(), torch.ones(256)
    dist.barrier()
    if rank >= 2:
        _spin(spinning)
        return None

    def exchange():
        for send_first in (rank == 0, rank != 0):
            if send_first:
                _spin(WAKE_WORK_S)
                dist.send(x, 1 - rank)
            else:
                dist.recv(x, 1 - rank)

    seconds = (median(exchange, 2 * repeats + 1) - 2 * WAKE_WORK_S) / 2
    return seconds if rank == 0 else None


def wake_seconds(cores: int, repeats: int) -> float:
    """The seconds a message waits for its receiver to be scheduled again when more ranks compute
    than there are cores (4 ranks on 2: hybrid runs on this machine), beyond what it costs with a
    rank per core: measured both ways. A rank blocked in a receive gives its core to another
    process; the message wakes it, but it runs again only when the scheduler next gives it a core
    (seen: 2.5 ms more a message, against 0.3 with a rank per core). Measured up to 8 cores (it
    starts twice as many processes); 0 above, where runs rarely outnumber the cores."""
    from paratrain.testing import run_ranks

    if cores > 8:
        return 0.0
    spinning = 4 * (2 * repeats + 2) * (WAKE_WORK_S + 0.01)  # outlasts the exchanges
    alone = run_ranks(wake_rank, 2, spinning, repeats)[0]
    # the median of three: where the scheduler happens to put both exchanging ranks on one core and
    # the computing ones on the other, nothing waits (seen once in four: 0.15 ms against 2.3-2.5)
    crowded = sorted(run_ranks(wake_rank, 2 * max(1, cores), spinning, repeats)[0] for _ in range(3))[1]
    return max(0.0, crowded - alone)


def tensor_parallel_seconds(mesh, device: str, layers: tuple[int, int] = (1, 9)) -> list[float]:
    """[ends forward, ends backward, per block forward, per block backward] seconds of the built-in
    GPT under tensor parallelism (parallelize.py, the vocabulary-parallel loss) at a size where
    nothing but the fixed costs counts (width 8, 2 tokens), from a GPT of `layers[0]` and one of
    `layers[1]` blocks. The two ranks of `mesh` run it together: its collectives are real."""
    from torch.distributed.tensor.parallel import loss_parallel

    from paratrain.models.gpt import GPT, cross_entropy
    from paratrain.strategies.tensor.parallelize import parallelize_gpt, replicated_loss

    loss_fn = replicated_loss(cross_entropy)
    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
    times = []
    for n in layers:
        torch.manual_seed(0)  # the same weights on both ranks, as a run starts
        model = parallelize_gpt(GPT(8, n_layer=n, n_head=2, d_model=8, block_size=2).to(device), mesh, False)

        def forward(model=model):
            with loss_parallel():
                return loss_fn(model(tokens), tokens)

        def both(model=model):
            with loss_parallel():
                loss_fn(model(tokens), tokens).backward()

        fwd = _median(forward)
        times.append((fwd, max(0.0, _median(both) - fwd)))
    (f1, b1), (f2, b2) = times
    span = layers[1] - layers[0]
    block_f, block_b = max(0.0, (f2 - f1) / span), max(0.0, (b2 - b1) / span)
    return [max(0.0, f1 - layers[0] * block_f), max(0.0, b1 - layers[0] * block_b), block_f, block_b]


def fsdp_seconds(mesh, device: str, layers: tuple[int, int] = (1, 5)) -> dict:
    """"zero2" / "zero3" -> [ends, per block] seconds of a forward and backward of the built-in GPT
    under FSDP2 as paratrain shards it (zero.shard_blocks: a unit per block and the root; zero3
    reshards after forward) at a size where nothing but the fixed costs counts (width 8, 2 tokens),
    from a GPT of `layers[0]` and one of `layers[1]` blocks, on the two ranks of `mesh`. FSDP2's
    hooks around each unit's forward and backward, its copies in and out of the flat buffers and
    each all-gather's and reduce-scatter's start-up: several milliseconds a block on a CPU (seen:
    3-5 under zero2, 4-6 under zero3), which the collectives' latency alone does not predict.
    "replicate" -> [ends, per block, then each further micro-batch's ends, per block]: hybrid's."""
    from torch.distributed.device_mesh import init_device_mesh

    from paratrain.models.gpt import GPT, cross_entropy
    from paratrain.strategies.data_parallel.zero import shard_blocks

    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)

    def fixed(mesh, reshard: bool, microbatches: int = 1) -> list[float]:
        times = []
        for n in layers:
            torch.manual_seed(0)
            model = shard_blocks(GPT(8, n_layer=n, n_head=2, d_model=8, block_size=2).to(device), mesh, reshard)

            def step(model=model):  # forward and backward together: zero2 keeps the parameters gathered
                for i in range(microbatches):  # gradients reduced on the last micro-batch only
                    model.set_requires_gradient_sync(i == microbatches - 1)
                    cross_entropy(model(tokens), tokens).backward()

            times.append(_median(step))
        block = max(0.0, (times[1] - times[0]) / (layers[1] - layers[0]))
        return [max(0.0, times[0] - layers[0] * block), block]

    out = {"zero2": fixed(mesh, False), "zero3": fixed(mesh, True)}
    # hybrid's dp axis where it replicates: FSDP2 over a (dp, 1) mesh, each stage's micro-batches
    # accumulating without the all-reduce but the last (torch's PipelineStage): the first
    # micro-batch's cost, then each further one's (seen: 2.3-3.5 ms a block, then 0.6-0.7)
    hsdp = init_device_mesh(device, (mesh.size(), 1), mesh_dim_names=("dp", "dp_shard"))
    (e1, b1), (e4, b4) = fixed(hsdp, False), fixed(hsdp, False, 4)
    out["replicate"] = [e1, b1, max(0.0, (e4 - e1) / 3), max(0.0, (b4 - b1) / 3)]
    return out


def split_backward_seconds(device: str, widths: tuple[int, int] = (128, 256)) -> list[float]:
    """[seconds per block, share of the backward] that a zero-bubble schedule's backward, split
    into its input half (I) and its weight half (W) as torch.distributed.pipelining runs them
    (`stage_backward_input`, then `stage_backward_weight`, which walk the autograd graph in
    Python), costs beyond one whole backward: on one built-in GPT block at two widths (2 x 64
    tokens), solved for a cost per block and one in proportion to the backward. Seen on one core:
    1.66x the whole backward at width 128, 1.28x at 256."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from paratrain.models.gpt import GPT

    points = []
    for width in widths:
        torch.manual_seed(0)
        block = next(iter(GPT(8, n_layer=1, n_head=4, d_model=width, block_size=64).to(device).layers.values()))
        x0, grad = torch.randn(2, 64, width, device=device), torch.randn(2, 64, width, device=device)

        def forward(block=block, x0=x0):
            return block(x0.clone().requires_grad_(True))

        def whole(block=block, x0=x0, grad=grad):
            block(x0.clone().requires_grad_(True)).backward(grad)

        def split(block=block, x0=x0, grad=grad):
            x = x0.clone().requires_grad_(True)
            _, groups = stage_backward_input([block(x)], [grad], [x], block.parameters())
            stage_backward_weight(block.parameters(), groups)

        fwd = _median(forward)
        backward = max(1e-9, _median(whole) - fwd)
        points.append((backward, max(0.0, _median(split) - fwd - backward)))
    (b1, e1), (b2, e2) = points
    share = max(0.0, (e2 - e1) / (b2 - b1)) if b2 > b1 else 0.0
    return [max(0.0, e1 - share * b1), share]


PIPELINE_MICROBATCHES = 8


def pipeline_step_seconds(device: str) -> dict:
    """schedule -> the mean step of a pipeline of tiny stages (one 8 x 8 Linear each) over 8
    micro-batches on the current group's two ranks, as paratrain's pipeline strategy builds it,
    and "p2p" -> one send of a micro-batch's activation (the median); `pipeline_action_seconds`
    turns them into a cost per action. The steps' mean, not their median: a few of the messages
    wait far longer than the rest (seen here, inside a run: 5 ms for a 64 KB activation whose
    sends took 0.1), and a step pays them, as the cost per action then does."""
    from statistics import mean

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage

    from paratrain.planner.calibrate import REPEATS, timings
    from paratrain.planner.schedule import MULTI
    from paratrain.strategies.pipeline.pipeline import SCHEDULES, stages_of_rank

    rank, m = dist.get_rank(), PIPELINE_MICROBATCHES
    x = torch.ones(m, 8, device=device)
    one = x[:1].clone()  # a micro-batch's activation: the sends' latency, measured beside the steps

    def p2p():
        for send_first in (rank == 0, rank != 0):
            dist.send(one, 1 - rank) if send_first else dist.recv(one, 1 - rank)

    def mean_of(fn) -> float:  # the ranks starting together, as a step's do
        return mean(timings(fn, 2 * REPEATS, before=dist.barrier))

    out = {"p2p": _median(p2p) / 2}  # the typical send: a step's mean holds the longer waits
    for name, schedule_class in SCHEDULES.items():
        v = 2 if name in MULTI else 1
        ids = stages_of_rank(rank, 2, v, name)
        stages = [PipelineStage(nn.Linear(8, 8).to(device), i, 2 * v, torch.device(device)) for i in ids]
        schedule = schedule_class(stages if v > 1 else stages[0], m, loss_fn=lambda y, _: y.sum())
        inputs, target = ([x] if 0 in ids else []), (x if 2 * v - 1 in ids else None)
        out[name] = mean_of(lambda schedule=schedule, inputs=inputs, target=target:
                            schedule.step(*inputs, target=target))
    return out


def pipeline_action_seconds(steps: dict) -> dict:
    """schedule -> seconds per action: the cost per action at which the planner's simulation of the
    same order (tiny stages, each send at the latency measured beside them) takes the measured step.
    The step grows with it monotonically, not quite linearly (the critical path moves from the sends
    to the actions): found by bisection. 0 where the measured step is no longer than the sends."""
    from paratrain.planner.schedule import MULTI, simulate

    steps = dict(steps)
    p2p_alpha = steps.pop("p2p")
    out = {}
    for name, measured in steps.items():
        v = 2 if name in MULTI else 1
        tiny = [1e-6] * (2 * v)  # an 8 x 8 product: microseconds

        def step(action: float, name=name, v=v, tiny=tiny) -> float:
            return simulate(name, 2, PIPELINE_MICROBATCHES, v, tiny, tiny, [p2p_alpha] * 2 * v, action).makespan

        lo, hi = 0.0, measured
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if step(mid) < measured else (lo, mid)
        out[name] = lo
    return out
