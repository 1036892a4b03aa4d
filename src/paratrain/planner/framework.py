"""What paratrain's own strategies cost on a CPU beyond their arithmetic, measured for calibrate.py:
the built-in GPT under DTensor tensor parallelism (dispatch, conversions and the small all-reduces
inside, per block and at its ends), and torch.distributed.pipelining's runtime per action of each
schedule, solved through the planner's own simulation (schedule.py). Both run on the two ranks of
`paratrain calibrate`'s group; each figure is calibrate's median (`_median`).
"""
from __future__ import annotations

import torch


def _median(fn) -> float:
    from paratrain.planner.calibrate import _median as median  # calibrate sets its repeats per run

    return median(fn)


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
    """schedule -> the median step of a pipeline of tiny stages (one 8 x 8 Linear each) over 8
    micro-batches on the current group's two ranks, as paratrain's pipeline strategy builds it,
    and "p2p" -> one send of a micro-batch's activation; `pipeline_action_seconds` turns them into
    a cost per action."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage

    from paratrain.planner.schedule import MULTI
    from paratrain.strategies.pipeline.pipeline import SCHEDULES, stages_of_rank

    rank, m = dist.get_rank(), PIPELINE_MICROBATCHES
    x = torch.ones(m, 8, device=device)
    one = x[:1].clone()  # a micro-batch's activation: the sends' latency, measured beside the steps

    def p2p():
        for send_first in (rank == 0, rank != 0):
            dist.send(one, 1 - rank) if send_first else dist.recv(one, 1 - rank)

    out = {"p2p": _median(p2p) / 2}
    for name, schedule_class in SCHEDULES.items():
        v = 2 if name in MULTI else 1
        ids = stages_of_rank(rank, 2, v, name)
        stages = [PipelineStage(nn.Linear(8, 8).to(device), i, 2 * v, torch.device(device)) for i in ids]
        schedule = schedule_class(stages if v > 1 else stages[0], m, loss_fn=lambda y, _: y.sum())
        inputs, target = ([x] if 0 in ids else []), (x if 2 * v - 1 in ids else None)
        out[name] = _median(lambda schedule=schedule, inputs=inputs, target=target:
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
