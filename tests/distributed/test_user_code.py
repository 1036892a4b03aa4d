"""A user's model, loss and dataset, from import paths and from the Python API, under ddp and single."""
import torch

import paratrain
from paratrain.data import Datasets, MapDataset
from paratrain.testing import run_ranks
from tests import user_code
from tests.helpers import config, fit, max_param_diff

USER = ["model.name=custom", "model.factory=tests.user_code:build_model", "model.options={width=16}",
        "model.loss=tests.user_code:loss", "data.name=custom", "data.factory=tests.user_code:dataset",
        "training.global_batch_size=16", "training.steps=15", "optimizer.name=sgd", "optimizer.lr=0.1",
        "run.progress=off"]


def test_custom_by_import_path_ddp_equals_single(tmp_path):
    oracle = fit(config(USER, "strategy.name=single", run_dir=tmp_path / "s"))
    assert oracle["params"]["0.weight"].shape == (16, 4)  # options reached the factory
    ranks = run_ranks(fit, 2, config(USER, "strategy.name=ddp", run_dir=tmp_path / "d"))
    assert max_param_diff(ranks[0]["params"], oracle["params"]) <= 1e-5


def test_python_api_takes_objects(tmp_path):
    cfg = config(USER, "strategy.name=single", run_dir=tmp_path / "api")
    torch.manual_seed(cfg.training.seed)
    model = user_code.build_model(16)
    data = Datasets(MapDataset(user_code.dataset("train", cfg)), MapDataset(user_code.dataset("eval", cfg)))
    result = paratrain.train(cfg, model=model, loss_fn=user_code.loss, datasets=data)
    assert result.model is model  # trained in place, no copy, no change to model code
    by_path = fit(config(USER, "strategy.name=single", run_dir=tmp_path / "path"))
    assert max_param_diff({k: v for k, v in model.state_dict().items()}, by_path["params"]) <= 1e-6
    assert result.summary["final_loss"] < 1.0986  # better than chance over 3 classes


def test_any_text_file_trains_the_gpt(tmp_path):
    from tests.helpers import TINY_GPT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = fit(config(TINY_GPT, "strategy.name=single", "data.name=text", f"data.path='{corpus}'",
                     "training.steps=30", run_dir=tmp_path / "run"))
    assert out["params"]["tok_emb.weight"].shape[0] == len(set(corpus.read_text()))  # its own vocabulary
    assert out["summary"]["eval_loss"] < 2.0  # ln(28) = 3.3 at chance; the pattern is learnable
