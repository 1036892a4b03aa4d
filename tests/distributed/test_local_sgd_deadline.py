"""Time-bounded rounds (`strategy.local_sgd.deadline = "auto"`, DropCompute) on 3 gloo ranks, one slowed.

Every rank's forward sleeps a fixed 20 ms, so steps take a steady time that the 2 cores' contention
barely moves (a sleeping rank leaves its core to the others), and rank 2 sleeps 200 ms more per
computed step (`[faults] delay_s`). With the deadline the slow rank drops inner steps and the fast
ones drop none; without it nobody drops anything and everyone waits for the slow rank at each sync.
All trainings share one spawn.
"""
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from paratrain.config import ConfigError
from paratrain.models.mlp import mlp
from paratrain.strategies.layout import layout
from paratrain.testing import run_ranks
from tests.distributed.test_local_sgd import stepwise
from tests.helpers import MLP, config

HERE = "tests.distributed.test_local_sgd_deadline"
SLOW, WORLD, H, STEPS = 2, 3, 4, 16
BASE = ["model.name=custom", f"model.factory={HERE}:sleepy_mlp", "model.loss=torch.nn.functional:mse_loss",
        "data.name=synthetic", "data.num_samples=512", "training.global_batch_size=30", f"training.steps={STEPS}",
        "training.eval_every=0", "optimizer.name=sgd", "optimizer.lr=0.05", "checkpoint.enabled=false",
        "run.progress=off", f"strategy.local_sgd.sync_every={H}", f"faults.rank={SLOW}", "faults.delay_s=0.2",
        # budget = 2 x the fast ranks' round (168 ms, below one slow step): room for a loaded 2-core
        # machine's noise (84 ms a round) before a fast rank would drop a step
        "strategy.local_sgd.deadline_slack=1.0"]
RUNS = {"local_sgd-auto": ["strategy.name=local_sgd", "strategy.local_sgd.deadline=auto"],
        "diloco-auto": ["strategy.name=diloco", "strategy.local_sgd.deadline=auto"],
        "local_sgd-off": ["strategy.name=local_sgd"]}
SYNCS = [s for s in range(STEPS) if (s + 1) % H == 0]


class Sleepy(nn.Module):
    def __init__(self, sleep_s: float):
        super().__init__()
        self.net, self.sleep_s = mlp(), sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.sleep_s)
        return self.net(x)


def sleepy_mlp(sleep_s: float = 0.02) -> Sleepy:
    return Sleepy(sleep_s)


def _train_all(tmp) -> dict:
    dist.init_process_group("gloo")
    return {name: stepwise(config(BASE, *sets, run_dir=tmp / name))["steps"] for name, sets in RUNS.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(_train_all, WORLD, tmp_path_factory.mktemp("deadline"))


@pytest.mark.parametrize("name", ["local_sgd-auto", "diloco-auto"])
def test_the_straggler_drops_steps_and_the_others_none(runs, name):
    ranks = [r[name] for r in runs]
    for rank, steps in enumerate(ranks):
        skipped = [s for s, rec in enumerate(steps) if rec["skipped"]]
        if rank == SLOW:
            # The first round has no budget; after it one slow step (220 ms) overruns a whole round's
            # budget (4 x ~21 ms x 2): it drops rounds, computing the first step of every other one
            # to measure itself again.
            assert not any(s < H for s in skipped) and len(skipped) >= 2 * H, skipped
            # Its own loss for a dropped step is NaN (at syncs the others' mean is logged instead).
            assert all(math.isnan(steps[s]["loss"]) and steps[s]["loss_ranks"] == 0 for s in skipped if s not in SYNCS)
        else:
            assert skipped == [], (rank, skipped)
    for s in SYNCS:
        recs = [steps[s] for steps in ranks]
        assert all(r["skipped_steps"] == (len([t for t in range(s - H + 1, s + 1) if ranks[i][t]["skipped"]]))
                   for i, r in enumerate(recs))
        # Every rank holds the same budget (none in the first round), and the mean loss of those that computed.
        assert len({r["round_budget_s"] for r in recs}) == 1 and (recs[0]["round_budget_s"] is None) == (s < H)
        assert len({r["loss"] for r in recs}) == 1
        assert recs[0]["loss_ranks"] == WORLD - recs[SLOW]["skipped"]


@pytest.mark.parametrize("name", list(RUNS))
def test_replicas_identical_right_after_each_sync(runs, name):
    for s in SYNCS:
        for r in runs[1:]:
            assert torch.equal(r[name][s]["params"], runs[0][name][s]["params"]), s


def test_without_deadline_nothing_is_dropped(runs):
    for r in runs:
        assert not any(rec["skipped"] for rec in r["local_sgd-off"])
        assert all("skipped_steps" not in rec for rec in r["local_sgd-off"])


def test_fast_ranks_keep_their_pace(runs):
    # After the first round the slow rank no longer sets the round's length: it computes at most
    # half of each round's steps (one slow step overruns the budget of H fast ones), while without
    # the deadline it computes all H and every sync waits for them. The time this saves the fast
    # ranks is measured in benchmarks/stragglers.py.
    def computed_per_round(name: str) -> list[int]:
        steps = runs[SLOW][name]
        return [sum(not rec["skipped"] for rec in steps[s - H + 1:s + 1]) for s in SYNCS if s >= 2 * H - 1]

    assert set(computed_per_round("local_sgd-off")) == {H}
    for name in ("local_sgd-auto", "diloco-auto"):
        assert computed_per_round(name) and max(computed_per_round(name)) <= H // 2, computed_per_round(name)


def test_deadline_config_errors():
    with pytest.raises(ConfigError, match=r"strategy.local_sgd.deadline = 'sometimes': must be one of off, auto"):
        config(MLP, "strategy.name=local_sgd", "strategy.local_sgd.deadline=sometimes")
    with pytest.raises(ConfigError, match="deadline_slack = -0.1: must be a number >= 0"):
        config(MLP, "strategy.name=diloco", "strategy.local_sgd.deadline_slack=-0.1")
    one = config(MLP, "strategy.name=local_sgd", "strategy.local_sgd.deadline=auto", "strategy.local_sgd.sync_every=1")
    with pytest.raises(ConfigError, match="needs strategy.local_sgd.sync_every >= 2"):
        layout(one, 2)
