"""Compressed gossip (CHOCO-SGD) on 4 gloo ranks: consensus at the global optimum of test_gossip.py's
per-rank quadratic with int8 and top-k messages, the bytes of those messages, and the config errors.
One spawn for both trainings; the arithmetic alone is tested in tests/unit/test_deadline_and_choco.py.
"""
import pytest
import torch
import torch.distributed as dist

import paratrain
from paratrain.config import ConfigError
from paratrain.strategies.layout import layout
from paratrain.testing import run_ranks
from tests.distributed.test_gossip import DIM, QUADRATIC, WORLD, optimum
from tests.helpers import MLP, config, records

# codec -> its settings and its message's bytes (int8: a byte per value and an fp32 scale; top-k: 2 of
# the 8 values, fp32 value + int32 index each). 100 steps, not plain gossip's 60: consensus is slower
# than with whole messages (its rate scales with the consensus step gamma, 0.5 by default).
CHOCO = {"int8": (["strategy.compression.codec=int8"], DIM + 4),
         "topk": (["strategy.compression.codec=topk", "strategy.compression.ratio=0.25"], 8 * 2)}


def _train_all(tmp) -> dict:
    dist.init_process_group("gloo")
    out = {}
    for codec, (sets, _) in CHOCO.items():
        result = paratrain.train(config(QUADRATIC, *sets, "training.steps=100", run_dir=tmp / codec))
        out[codec] = {"theta": result.model.theta.detach().clone(), "summary": result.summary}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("choco")
    return tmp, run_ranks(_train_all, WORLD, tmp)


@pytest.mark.parametrize("codec", list(CHOCO))
def test_compressed_gossip_reaches_consensus_at_the_global_optimum(runs, codec):
    tmp, ranks = runs
    thetas = torch.stack([r[codec]["theta"] for r in ranks])
    optima = torch.stack([optimum(r) for r in range(WORLD)])
    spread = torch.cdist(optima, optima).max().item()
    # Measured: disagreement 2.2e-3 (int8) and 1.5e-3 (top-k) x spread (whole messages: 3e-4); mean off by 3e-8.
    assert torch.cdist(thetas, thetas).max().item() < 1e-2 * spread
    assert (thetas.mean(0) - optima.mean(0)).norm().item() < 1e-4 * spread
    # Each rank alone would have gone to its own optimum: the neighbours pulled it to the average.
    assert (thetas[0] - optima[0]).norm().item() > 0.3 * spread
    distance = [rec["neighbour_distance"] for rec in records(tmp / codec, 0)]  # to the neighbours' public copies
    assert max(distance) > 1.0 and distance[-1] < 2e-2 * max(distance)  # measured: 4e-3 x peak


@pytest.mark.parametrize("codec", list(CHOCO))
def test_bytes_are_the_compressed_messages(runs, codec):
    # The packed message to each of the 2 ring neighbours, every step, and nothing else.
    _, ranks = runs
    for r in ranks:
        assert r[codec]["summary"]["bytes_sent_per_step"] == 2 * CHOCO[codec][1]


def test_compressed_gossip_config_errors():
    def check(*sets):
        layout(config(MLP, "strategy.name=gossip", *sets), 4)

    check("strategy.compression.codec=topk", "strategy.gossip.consensus_step=0.1")
    with pytest.raises(ConfigError, match="strategy.gossip.graph = 'exponential': compressed gossip"):
        check("strategy.compression.codec=int8", "strategy.gossip.graph=exponential")
    with pytest.raises(ConfigError, match="strategy.compression.codec = 'powersgd'"):
        check("strategy.compression.codec=powersgd")
    with pytest.raises(ConfigError, match=r"consensus_step = 0: must be a number in \(0, 1\]"):
        check("strategy.compression.codec=int8", "strategy.gossip.consensus_step=0")


def test_consensus_step_without_a_codec_is_an_error():
    with pytest.raises(ConfigError, match="consensus_step = 0.1: used only by compressed gossip"):
        layout(config(MLP, "strategy.name=gossip", "strategy.gossip.consensus_step=0.1"), 4)
