"""Cutting a model into pipeline stages: which consecutive blocks each stage holds.

A model is a run of blocks: the GPT's `layers` (embeddings ride with the first stage, the
final norm and head with the last), the children of an `nn.Sequential`, or any other model's
longest nn.ModuleList of like blocks (layout.block_list: a transformers model's). Stages are chosen
to minimise the most expensive stage (linear partition by dynamic programming), where a block
costs its parameter count or its measured forward + backward time; or the user names the cut
points. Each stage is a pruned copy of the model, so parameter names stay those of the whole
model and a checkpoint loads under any layout (the torchtitan convention).

A model of the third kind has no stage forward of its own (a transformers GPT-2's forward always
runs its embeddings, all its blocks and its head): torch.distributed.pipelining's tracer
(`pipeline()`, torch.export underneath) captures its forward on one micro-batch and cuts the graph
at the first block of each stage. Its stage modules keep the model's parameter names, so the
checkpoints are the same as the other layouts'. A parameter registered under two names (a tied
input and output embedding) is copied into every stage that uses it; tied.py keeps the copies
equal. A traced stage runs on the micro-batch shape it was traced with (torch.export specialises
shapes), and values that skip stages are threaded through them (`traced_stages`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn

from paratrain.config import Config, ConfigError
from paratrain.data import Datasets
from paratrain.strategies.layout import block_list, blocks_of, check_split_points, is_traced


def _numel(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())


def param_costs(model: nn.Module) -> list[float]:
    costs = [float(_numel(b)) for b in blocks_of(model)]
    if not hasattr(model, "tok_emb"):  # a Sequential's blocks are all of it; a traced model's ends are not weighed
        return costs
    costs[0] += _numel(model.tok_emb) + _numel(model.pos_emb)
    costs[-1] += _numel(model.norm) + _numel(model.head)
    return costs


def time_costs(model: nn.Module, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Forward + backward seconds of each block on `sample` (the best of `repeats`)."""
    x = sample
    if not isinstance(model, nn.Sequential):
        x = model.tok_emb(sample) + model.pos_emb(torch.arange(sample.shape[1], device=sample.device))
    costs = []
    for block in blocks_of(model):
        inp = x.detach().requires_grad_(x.is_floating_point())
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = block(inp)
            out.float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        costs.append(best)
        x = out.detach()
    model.zero_grad(set_to_none=True)
    return costs


def planned_starts(cfg: Config, model: nn.Module, num_stages: int) -> list[int] | None:
    """The first block of each stage where no timing decides it: the named split points, or the
    parameter balance; None for `split = "time"` (measured by the pipeline at start-up)."""
    p = cfg.strategy.pipeline
    if p.split_points:
        return check_split_points(p.split_points, len(blocks_of(model)), num_stages)
    return balanced_split(param_costs(model), num_stages) if p.split == "params" else None


def balanced_split(costs: list[float], num_stages: int) -> list[int]:
    """First block index of each stage, minimising the largest stage cost."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest max-stage cost putting the first i blocks into s stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    starts, i = [], n
    for s in range(num_stages, 0, -1):
        i = cut[s][i]
        starts.append(i)
    return starts[::-1]


def whole_model(model: nn.Module) -> nn.Module:
    """The one stage of a one-stage pipeline (hybrid with pp = 1): a copy of the whole model, any
    model, with its output as a tensor (a transformers ModelOutput: its logits), since the pipeline
    runtime sends and checks tensors. Parameter names stay the model's."""
    part = copy.deepcopy(model)
    part.register_forward_hook(lambda module, args, out: out.logits if hasattr(out, "logits") else out)
    return part


def traced(model: nn.Module, starts: list[int], example: torch.Tensor):
    """torch's Pipe of `model` cut before each stage's first block (starts[1:]), traced on one
    micro-batch of inputs, `example`; `.get_stage_module(s)` is stage s."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    path = block_list(model)
    model = copy.deepcopy(model)
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):  # a transformers model's cache: an output torch.export cannot flatten
        config.use_cache = False
    with warnings.catch_warnings():  # torch's own deprecation inside its tracer (LeafSpec), nothing the user can do
        warnings.filterwarnings("ignore", message=".*treespec.*", category=FutureWarning)
        return pipeline(model, mb_args=(example,), split_spec={f"{path}.{i}": SplitPoint.BEGINNING for i in starts[1:]})


def traced_stages(model: nn.Module, starts: list[int], example: torch.Tensor) -> list[nn.Module]:
    """Every stage of the traced model, each taking exactly what the stage before it returns.

    torch's tracer passes a value straight from the stage that makes it to every later stage that
    uses it (a transformers model's attention mask, made once by the first stage, goes to every
    block): a skip over the stages in between, which torch's traced-stage runtime routes but a
    PipelineStage, one stage's outputs into the next's inputs, cannot. So each stage also
    returns the values that later stages need and it does not (threaded through it)."""
    pipe = traced(model, starts, example)
    graph = pipe.split_gm.graph
    made: dict = {}  # node -> ("in", name) | (stage, output index)
    uses: list[list] = []  # per stage: the values its arguments are, in order
    for node in graph.nodes:
        if node.op == "placeholder":
            made[node] = ("in", node.name)
        elif node.op == "call_module":
            made[node] = (len(uses), 0)
            uses.append([made[a] for a in node.args])
        elif node.op == "call_function" and node.args and node.args[0] in made:  # getitem of a stage's outputs
            made[node] = (made[node.args[0]][0], node.args[1])
    wires = [uses[0]]  # what stage k is given: what stages k.. use and stages before k made
    for k in range(1, len(uses)):
        later = [v for j in range(k, len(uses)) for v in uses[j] if v[0] == "in" or v[0] < k]
        wires.append(list(dict.fromkeys(later)))
    stages = []
    for k in range(len(uses)):
        stage = pipe.get_stage_module(k)
        if k + 1 < len(uses):
            takes = [wires[k].index(v) for v in uses[k]]
            gives = [(True, v[1]) if v[0] == k else (False, wires[k].index(v)) for v in wires[k + 1]]
            stage.forward = _threaded(stage.forward, takes, gives)  # an instance attribute: names stay the model's
        stages.append(stage)
    return stages


def _threaded(forward, takes: list[int], gives: list[tuple[bool, int]]):
    def threaded(*wire):
        out = forward(*[wire[i] for i in takes])
        out = out if isinstance(out, tuple) else (out,)
        return tuple(out[i] if own else wire[i] for own, i in gives)
    return threaded


@contextlib.contextmanager
def _logging_off():
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def check_traceable(cfg: Config, model: nn.Module, datasets: Datasets, pp: int, dp: int) -> None:
    """Before any worker starts: a model that the pipeline would trace is traced here, on the meta
    device (shapes only; 0.8 s for the 2-layer GPT-2 here), so that one torch.export cannot
    capture is one line instead of a traceback on every rank."""
    from paratrain.imports import describe
    from paratrain.strategies.layout import pipeline_settings

    _, v, m = pipeline_settings(cfg)
    if pp * v == 1 or not is_traced(model):
        return
    starts = planned_starts(cfg, model, pp * v)  # split = "time" is refused for such a model (layout.py)
    micro = datasets.train.get(torch.arange(cfg.training.global_batch_size // dp // m)).inputs
    try:  # torch.export logs the graph it failed on (40 lines): the one line below says it
        with contextlib.redirect_stderr(io.StringIO()), _logging_off():
            traced(model, starts, micro.to("meta"))
    except Exception as e:  # noqa: BLE001 - torch.export on user code
        raise ConfigError(f"model: {type(model).__name__} cannot be traced into pipeline stages by "
                          f"torch.distributed.pipelining: {describe(e.__cause__ or e)}") from None


def build_stage(model: nn.Module, starts: list[int], stage: int) -> nn.Module:
    """A copy of `model` holding only stage `stage`'s blocks (and the ends that go with it)."""
    num_blocks = len(blocks_of(model))
    lo, hi = starts[stage], starts[stage + 1] if stage + 1 < len(starts) else num_blocks
    if isinstance(model, nn.Sequential):  # keep the original indices as names
        return nn.Sequential(OrderedDict((str(i), copy.deepcopy(model[i])) for i in range(lo, hi)))
    part = copy.deepcopy(model)
    for i, name in enumerate(list(part.layers.keys())):
        if not lo <= i < hi:
            del part.layers[name]
    if stage > 0:
        part.tok_emb = part.pos_emb = None
    if stage < len(starts) - 1:
        part.norm = part.head = None
    return part

