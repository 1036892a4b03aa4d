"""What paratrain's own strategies cost on a CPU beyond their arithmetic, measured for calibrate.py
piece by piece (whole steps against the planner's sum of these: wholestep.py):
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
    "replicate" -> [ends, per block, then each further micro-batch's ends, per block]: hybrid's.
    Each is FSDP2's surplus over the same GPT unsharded, timed alike: the model's own operators
    are cost.py's already (seen: 0.3 ms at the ends and 0.5 a block, 40% of replicate's figure)."""
    from torch.distributed.device_mesh import init_device_mesh

    from paratrain.models.gpt import GPT, cross_entropy
    from paratrain.strategies.data_parallel.zero import shard_blocks

    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)

    def fixed(mesh, reshard: bool, microbatches: int = 1) -> list[float]:
        times = []
        for n in layers:
            torch.manual_seed(0)
            plain = GPT(8, n_layer=n, n_head=2, d_model=8, block_size=2).to(device)
            model = shard_blocks(GPT(8, n_layer=n, n_head=2, d_model=8, block_size=2).to(device), mesh, reshard)

            def step(model=model, sync=True):  # forward and backward together: zero2 keeps the parameters gathered
                for i in range(microbatches):  # gradients reduced on the last micro-batch only
                    if sync:
                        model.set_requires_gradient_sync(i == microbatches - 1)
                    cross_entropy(model(tokens), tokens).backward()

            times.append(_median(step) - _median(lambda plain=plain: step(plain, sync=False)))
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

        out[name] = rising_root(step, measured, measured)
    return out


def rising_root(f, target: float, hi: float, steps: int = 40) -> float:
    """The x in [0, hi] at which `f`, rising with x, reaches `target`, by bisection; 0 where f(0)
    already does (calibrate's costs that a simulated step grows with)."""
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return lo
