"""NaN and Inf policy: stop before the update naming step and rank, or skip it on every rank."""
import math

import pytest
import torch

from paratrain.checkpoint import Checkpointer, list_checkpoints, read_checkpoint, step_of
from paratrain.config import ConfigError
from paratrain.nonfinite import NonFiniteError
from paratrain.strategies.layout import layout
from paratrain.testing import RankFailed, run_ranks
from paratrain.topology import Topology
from tests.helpers import MLP, TINY_GPT, config, fit

NAN_AT_4 = ["faults.rank=1", "faults.nan_at_step=4", "training.steps=8", "checkpoint.every=2"]


def _fit_or_error(cfg):
    """Train; or the NonFiniteError this rank raised, as (step, ranks)."""
    try:
        return fit(cfg)
    except NonFiniteError as e:
        return ("stopped", e.step, e.ranks)


def _all_finite(params: dict) -> bool:
    return all(bool(v.isfinite().all()) for v in params.values() if v.is_floating_point())


def test_stop_names_step_and_rank_on_every_rank_and_writes_no_bad_checkpoint(tmp_path):
    out = run_ranks(_fit_or_error, 2, config(MLP, "strategy.name=ddp", *NAN_AT_4, run_dir=tmp_path / "r"))
    assert out == [("stopped", 4, [1])] * 2  # the step the fault named, as records and progress lines count
    ckpts = list_checkpoints(tmp_path / "r")
    assert [step_of(p) for p in ckpts] == [2]  # none at or after the bad step
    assert _all_finite(read_checkpoint(ckpts[-1])["strategy"]["model"])
    assert str(NonFiniteError([1], 4)).startswith("step 4: non-finite loss on rank 1 (training.on_nonfinite")


@pytest.mark.parametrize("strategy,base", [("ddp", MLP), ("pipeline", TINY_GPT)])
def test_skip_leaves_the_update_out_on_every_rank(tmp_path, strategy, base):
    # pipeline: the NaN loss of the last stage (rank 1); the first stage holds other parameters
    # and skips with it, by the agreement.
    sets = [f"strategy.name={strategy}", "faults.rank=1", "faults.nan_at_step=3", "training.steps=4",
            "training.on_nonfinite=skip"]
    ranks = run_ranks(fit, 2, config(base, *sets, run_dir=tmp_path / "r"))
    for r in ranks:
        assert r["summary"]["nonfinite_skipped"] == 1 and _all_finite(r["params"])
        assert math.isfinite(r["summary"]["eval_loss"])  # evaluated right after the bad step: the fault is training's
    if strategy == "ddp":  # the same update skipped on both: the replicas stay identical
        assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"])


def test_replicas_that_update_alone_decide_alone(tmp_path):
    cfg = config(MLP, "strategy.name=local_sgd", *NAN_AT_4, run_dir=tmp_path / "r")
    with pytest.raises(RankFailed, match=r"rank 1:[\s\S]*NonFiniteError: step 4: non-finite loss on rank 1"):
        run_ranks(fit, 2, cfg)


def test_a_real_divergence_stops_single(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite (loss|gradient) on rank 0"):
        fit(config(MLP, "strategy.name=single", "optimizer.lr=1e6", "optimizer.momentum=0", run_dir=tmp_path / "r"))
    assert not list_checkpoints(tmp_path / "r")


class _Weights:
    """A strategy as Checkpointer.save sees it, on one process."""
    holds_unique_state = True

    def __init__(self, w: torch.Tensor):
        self.w = w

    def agree_on_members(self):
        return None

    def state_dict(self, group=None) -> dict:
        return {"model": {"w": self.w, "i": torch.tensor([1])}, "optimizer": {"state": {}, "param_groups": []}}


def test_a_checkpoint_with_nan_weights_is_not_written_and_the_older_one_kept(tmp_path):
    cfg = config(MLP, "checkpoint.keep=1", run_dir=tmp_path / "r")
    saver = Checkpointer(tmp_path / "r", cfg, Topology.single(cfg.run))
    saver.save(2, _Weights(torch.ones(2)), {})
    message = r"^step 4: non-finite value in w: checkpoint not written, older ones kept$"
    with pytest.raises(NonFiniteError, match=message):
        saver.save(4, _Weights(torch.tensor([1.0, float("nan")])), {})
    assert [step_of(p) for p in list_checkpoints(tmp_path / "r")] == [2]
    assert [f.name for f in saver.dir.iterdir()] == ["step-00000002.pt"]  # no temporary file left either


def test_skip_is_refused_for_the_parameter_server():
    with pytest.raises(ConfigError, match="training.on_nonfinite = 'skip': parameter_server takes 'stop'"):
        layout(config(MLP, "strategy.name=parameter_server", "training.on_nonfinite=skip"), 3)
