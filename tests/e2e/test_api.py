"""The Python API hands back what it trained: `launch` a result with the exit code, run
directory, summary and checkpoint; `load_model` the whole model as one plain nn.Module whatever
layout trained it (here a 2-stage pipeline, against `single` on the same batches)."""
import pytest
import torch

import paratrain
from paratrain.config import ConfigError
from tests.helpers import TINY_GPT, config, fit, max_param_diff


def test_launch_returns_the_run_and_load_model_gives_the_whole_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = [*TINY_GPT, "training.steps=6", "training.eval_every=6"]
    result = paratrain.launch(config(sets, "strategy.name=pipeline", run_dir=tmp_path / "pp"), nproc=2)
    assert result.exit_code == 0 and result.run_dir == tmp_path / "pp"
    assert result.checkpoint == tmp_path / "pp" / "checkpoints" / "step-00000006.pt"
    assert result.summary["steps_this_start"] == 6 and result.summary["eval_loss"] > 0

    model = paratrain.load_model(result.run_dir)  # built from the run's config, weights loaded
    assert type(model).__name__ == "GPT" and not any(hasattr(p, "to_local") for p in model.parameters())
    oracle = fit(config(sets, "strategy.name=single", run_dir=tmp_path / "single"))
    assert max_param_diff(model.state_dict(), oracle["params"]) <= 1e-5  # the 2 stages, one model
    tokens = torch.zeros(1, 16, dtype=torch.long)
    assert model(tokens).shape[:2] == (1, 16)

    # into a model of one's own, from the checkpoint file
    from paratrain.models.gpt import GPT

    mine = paratrain.load_model(result.checkpoint, model=GPT(model.head.out_features, n_layer=2, n_head=2,
                                                             d_model=32, block_size=16))
    assert max_param_diff(mine.state_dict(), model.state_dict()) == 0.0
    assert max_param_diff(result.load_model().state_dict(), model.state_dict()) == 0.0

    with pytest.raises(ConfigError, match="no checkpoint that verifies"):
        paratrain.load_model(tmp_path)
    with pytest.raises(ConfigError, match="does not match the checkpoint"):
        paratrain.load_model(result.checkpoint, model=torch.nn.Linear(2, 2))

