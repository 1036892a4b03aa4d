"""gossip (D-PSGD) on gloo ranks: consensus on a per-rank quadratic, exact mixing, exact bytes, and a GPT.
Compressed gossip (CHOCO-SGD) on the same quadratic: test_gossip_choco.py.

The quadratic: rank r's loss is 0.5 ||theta - c_r||^2 with its own optimum c_r, so no rank can
reach the global optimum, mean(c_r), alone; only averaging with neighbours gets them there.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import paratrain
from paratrain.data.synthetic import TensorDataset
from paratrain.strategies.gossip.gossip import gossip_peers
from paratrain.testing import run_ranks
from tests.helpers import MLP, TINY_GPT, config, fit, max_param_diff, records

WORLD, DIM = 4, 8
HERE = "tests.distributed.test_gossip"
POINT = ["model.name=custom", f"model.factory={HERE}:point", f"model.loss={HERE}:quadratic", "data.name=custom",
         f"data.factory={HERE}:rank_targets", "strategy.name=gossip", "optimizer.name=sgd",
         "training.global_batch_size=16", "training.eval_every=0", "checkpoint.enabled=false", "run.progress=off"]
# Decaying step size: the replicas' disagreement is O(lr), so it vanishes as lr -> 0.
QUADRATIC = [*POINT, f"model.options={{dim={DIM}}}", "optimizer.lr=0.3", "optimizer.schedule=cosine",
             "optimizer.min_lr_ratio=0", "training.steps=60"]
# No gradient at all: what moves the replicas is the mixing alone.
MIXING = [*POINT, f"model.options={{dim={DIM}, init='by_rank'}}", f"model.loss={HERE}:no_gradient",
          "optimizer.lr=0.1", "training.steps=30"]


# -- user code for the configs above (imported by path in the spawned ranks)
class Point(nn.Module):
    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)


def initial_theta(rank: int) -> torch.Tensor:
    return 3 * torch.randn(DIM, generator=torch.Generator().manual_seed(100 + rank))


def optimum(rank: int) -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(200 + rank))


def point(dim: int, init: str = "zeros") -> Point:
    return Point(initial_theta(int(os.environ["RANK"])) if init == "by_rank" else torch.zeros(dim))


def quadratic(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - target) ** 2).sum(dim=1).mean()


def no_gradient(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output * 0).sum()


def rank_targets(split: str, cfg) -> TensorDataset:
    """Every sample of rank r's data has target c_r: rank r's own optimum."""
    return TensorDataset(torch.zeros(64, 1), optimum(int(os.environ["RANK"])).expand(64, -1).clone())


# -- the runs: every training on 4 ranks shares one spawn
def _train_all(tmp) -> dict:
    dist.init_process_group("gloo")  # kept by train(): the runs share it
    out = {}
    for graph in ("ring", "exponential"):
        for name, sets in (("quadratic", QUADRATIC), ("mixing", MIXING)):
            result = paratrain.train(config(sets, f"strategy.gossip.graph='{graph}'", run_dir=tmp / f"{name}-{graph}"))
            out[name, graph] = {"theta": result.model.theta.detach().clone(), "summary": result.summary}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gossip")
    return tmp, run_ranks(_train_all, WORLD, tmp)


def test_peers_are_the_graph():
    assert gossip_peers(0, 4, "ring", 0) == ([3, 1], [3, 1])
    assert gossip_peers(1, 2, "ring", 5) == ([0], [0])  # both neighbours are rank 0: one message
    assert [gossip_peers(0, 8, "exponential", t)[0] for t in range(4)] == [[1], [2], [4], [1]]
    assert gossip_peers(0, 8, "exponential", 2)[1] == [4]
    assert [gossip_peers(2, 3, "exponential", t) for t in range(2)] == [([0], [1]), ([1], [0])]


@pytest.mark.parametrize("graph", ["ring", "exponential"])
def test_consensus_at_the_global_optimum(runs, graph):
    tmp, ranks = runs
    thetas = torch.stack([r["quadratic", graph]["theta"] for r in ranks])
    optima = torch.stack([optimum(r) for r in range(WORLD)])
    spread = torch.cdist(optima, optima).max().item()  # how far apart the local optima are (~4)
    disagreement = torch.cdist(thetas, thetas).max().item()
    assert disagreement < 1e-3 * spread
    assert (thetas.mean(0) - optima.mean(0)).norm().item() < 1e-4 * spread
    # Each rank alone would have gone to its own optimum: the neighbours pulled it to the average.
    assert (thetas[0] - optima[0]).norm().item() > 0.3 * spread
    # Measured (4 ranks, optima spread 4.9): disagreement 1.5e-3 ring, 5e-4 exponential; mean off by 4e-5.
    distance = [r["neighbour_distance"] for r in records(tmp / f"quadratic-{graph}", 0)]
    assert max(distance) > 1.0 and distance[-1] < 1e-2 * max(distance)  # measured: 2e-3 x peak


@pytest.mark.parametrize("graph", ["ring", "exponential"])
def test_mixing_alone_reaches_the_exact_initial_average(runs, graph):
    tmp, ranks = runs
    average = torch.stack([initial_theta(r) for r in range(WORLD)]).mean(0)
    for r in ranks:
        # fp32 rounding only: every step preserves the average (doubly stochastic mixing), and the
        # disagreement contracts by 1/3 a step (ring of 4) or vanishes after log2(4) = 2 steps.
        assert (r["mixing", graph]["theta"] - average).abs().max().item() <= 1e-5
    if graph == "exponential":  # SGP's one-peer graph on 2^m ranks averages exactly in m steps
        distance = [r["neighbour_distance"] for r in records(tmp / "mixing-exponential", 0)]
        assert min(distance[:2]) > 1.0 and max(distance[2:]) <= 1e-5


@pytest.mark.parametrize("graph, messages", [("ring", 2), ("exponential", 1)])
def test_bytes_are_the_neighbour_messages(runs, graph, messages):
    _, ranks = runs
    for r in ranks:
        for name in ("quadratic", "mixing"):
            # The flat fp32 parameters to each neighbour, and nothing else (the loss logged is the rank's own).
            assert r[name, graph]["summary"]["bytes_sent_per_step"] == messages * 4 * DIM


def _two_runs(gpt, mlp) -> tuple[dict, dict]:
    dist.init_process_group("gloo")
    return fit(gpt), fit(mlp)


def test_gpt_trains_and_two_ranks_sgd_equals_single(tmp_path):
    gpt = config(TINY_GPT, "strategy.name=gossip", run_dir=tmp_path / "gpt")
    mlp = config(MLP, "strategy.name=gossip", run_dir=tmp_path / "mlp")
    oracle = fit(config(MLP, "strategy.name=single", run_dir=tmp_path / "single"))
    ranks = run_ranks(_two_runs, 2, gpt, mlp)
    losses = [r["loss"] for r in records(tmp_path / "gpt", 0)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    n_params = sum(v.numel() for v in ranks[0][0]["params"].values())
    assert ranks[0][0]["summary"]["bytes_sent_per_step"] == 4 * n_params
    # On 2 ranks both replicas leave each step as (x - lr g_0 + x - lr g_1) / 2: SGD (with momentum,
    # which is linear too) then equals the all-reduce of gradients, and so the single oracle.
    assert max_param_diff(ranks[0][1]["params"], oracle["params"]) <= 1e-5
