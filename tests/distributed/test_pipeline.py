"""Pipeline schedules and the plain layer split against the single-process oracle."""
import json

import pytest
import torch.nn as nn

from paratrain.config import ConfigError
from paratrain.strategies.layout import blocks_of, check_split_points, layout
from paratrain.strategies.pipeline import split
from paratrain.testing import run_ranks
from tests.distributed.test_user_code import USER
from tests.helpers import TINY_GPT, config, fit, max_param_diff

TOL = 1e-5  # fp32: micro-batch gradients summed in another order than one big batch
GPT4 = [*TINY_GPT, "model.n_layer=4", "strategy.pipeline.microbatches=4"]
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_zb", 2), ("zbv", 2)]


def fit_stages(*cfgs) -> list[dict]:
    """Train each config in turn on this rank (one process group for all of them)."""
    return [fit(cfg) for cfg in cfgs]


def _assert_matches(stage_results, oracle):
    # The final checkpoint holds the whole model, merged from every stage.
    assert max_param_diff(stage_results[0]["params"], oracle["params"]) <= TOL
    for r in stage_results:  # every stage logged the same global losses
        for key in ("final_loss", "eval_loss"):
            assert r["summary"][key] == pytest.approx(oracle["summary"][key], abs=1e-5)


def test_every_schedule_and_the_plain_split_equal_single(tmp_path):
    oracle = fit(config(GPT4, "strategy.name=single", run_dir=tmp_path / "single"))
    cfgs = [config(GPT4, "strategy.name=pipeline", f"strategy.pipeline.schedule={s}",
                   f"strategy.pipeline.virtual_stages={v}", run_dir=tmp_path / s) for s, v in SCHEDULES]
    cfgs.append(config(GPT4, "strategy.name=model_parallel", run_dir=tmp_path / "mp"))
    per_rank = run_ranks(fit_stages, 2, *cfgs)
    for i, name in enumerate([s for s, _ in SCHEDULES] + ["model_parallel"]):
        _assert_matches([per_rank[0][i], per_rank[1][i]], oracle)
        timeline = json.loads((tmp_path / ("mp" if name == "model_parallel" else name) / "timeline.json").read_text())
        events = timeline["events"]
        m = 1 if name == "model_parallel" else 4
        # Every stage ran each micro-batch's forward and backward exactly once.
        for rank_events in events:
            stages = {e[1] for e in rank_events}
            for kind in ("F", "B"):
                assert sorted((e[1], e[2]) for e in rank_events if e[0] == kind) == \
                    sorted((s, mb) for s in stages for mb in range(m))
        kinds_last_rank = [e[0] for e in events[1] if e[0] != "W"]
        if name == "gpipe":  # all forwards, then all backwards
            assert kinds_last_rank == ["F"] * 4 + ["B"] * 4
        if name == "1f1b":  # the last stage alternates from the first micro-batch on
            assert kinds_last_rank == ["F", "B"] * 4
        if name in ("interleaved_zb", "zbv"):  # weight gradients split from input gradients
            assert any(e[0] == "W" for e in events[0])
    assert (tmp_path / "1f1b" / "timeline.png").stat().st_size > 10_000


def test_four_stages_and_time_balanced_split(tmp_path):
    oracle = fit(config(GPT4, "strategy.name=single", run_dir=tmp_path / "single"))
    results = run_ranks(fit_stages, 4, config(GPT4, "strategy.name=pipeline", "strategy.pipeline.split=time",
                                              run_dir=tmp_path / "pp4"))
    _assert_matches([r[0] for r in results], oracle)


def test_sequential_user_model_and_checkpoint_across_layouts(tmp_path):
    # A user's nn.Sequential splits by its children; its checkpoint resumes under `single`.
    # Clipping with SGD: the norm must span both stages (Adam's normalisation would hide a wrong one).
    sets = [*USER, "training.global_batch_size=16", "strategy.pipeline.microbatches=2", "optimizer.grad_clip=0.2",
            "checkpoint.enabled=true", "checkpoint.every=5", "checkpoint.keep=5"]
    oracle = fit(config(sets, "strategy.name=single", run_dir=tmp_path / "single"))
    pp = run_ranks(fit_stages, 2, config(sets, "strategy.name=pipeline", "strategy.pipeline.split_points=[2]",
                                         run_dir=tmp_path / "pp"))
    _assert_matches([pp[0][0], pp[1][0]], oracle)
    ckpt = tmp_path / "pp" / "checkpoints" / "step-00000010.pt"
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    (resumed_dir / ckpt.name).write_bytes(ckpt.read_bytes())
    resumed = fit(config(sets, "strategy.name=single", run_dir=tmp_path / "resumed"), resumed_dir / ckpt.name)
    assert max_param_diff(resumed["params"], oracle["params"]) <= TOL
    assert resumed["summary"]["steps_this_start"] == 5


def test_stage_split_logic():
    assert split.balanced_split([1, 1, 1, 1], 2) == [0, 2]
    assert split.balanced_split([5, 1, 1, 1, 1, 1], 2) == [0, 1]
    assert split.balanced_split([1, 2, 3, 4, 5, 6], 3) == [0, 3, 5]  # 6 | 9 | 6
    with pytest.raises(ConfigError, match=r"split_points = \[3, 2\]: must be 2 increasing block indices in 1..3"):
        check_split_points((3, 2), 4, 3)
    with pytest.raises(ConfigError, match="cannot be split into pipeline stages"):
        blocks_of(nn.Linear(2, 2))


@pytest.mark.parametrize("sets,world,message", [
    (["strategy.name=pipeline", "model.n_layer=2", "strategy.pipeline.virtual_stages=2",
      "strategy.pipeline.schedule=interleaved_1f1b"], 2, "model.n_layer = 2: fewer blocks than pipeline stages"),
    (["strategy.name=pipeline", "strategy.pipeline.microbatches=3"], 2,
     "strategy.pipeline.microbatches = 3: must divide the per-rank batch 8"),
    (["strategy.name=pipeline", "strategy.pipeline.schedule=zbv"], 2,
     "virtual_stages = 1: schedule 'zbv' places exactly 2 stages per rank"),
    (["strategy.name=pipeline", "strategy.pipeline.virtual_stages=2"], 2,
     "virtual_stages = 2: schedule '1f1b' takes 1 stage per rank"),
    (["strategy.name=pipeline", "strategy.pipeline.schedule=interleaved_zb"], 2,
     "virtual_stages = 1: schedule 'interleaved_zb' needs >= 2 stages per rank"),
    (["strategy.name=pipeline", "training.grad_accum_steps=2"], 2,
     "training.grad_accum_steps = 2: pipelines accumulate over micro-batches"),
    (["strategy.name=pipeline", "model.n_layer=4", "strategy.pipeline.split_points=[1]"], 4,
     "split_points = [1]: must be 3 increasing block indices"),
    (["strategy.name=pipeline", "model.name=mlp", "data.name=synthetic", "strategy.pipeline.split=time"], 2,
     "strategy.pipeline.split = 'time': measures the built-in gpt's blocks only"),
])
def test_invalid_pipeline_layouts(sets, world, message):
    with pytest.raises(ConfigError) as err:
        layout(config(TINY_GPT, *sets), world)
    assert message in str(err.value)
