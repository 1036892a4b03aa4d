"""A Hugging Face transformers model (GPT-2's architecture, 2 layers, built from its config: no
download) through paratrain: configs/hf_gpt2.toml and examples/huggingface_gpt2.py, as the README
shows them. ddp, zero2, zero3 and hybrid's dp axis, loaded from the config file, equal `single`;
the Python API with the objects themselves equals the config. Pipelines: its blocks are its
`transformer.h`, its stages traced by torch.distributed.pipelining, its tied input and output
embeddings kept equal across the stages; pipeline, model_parallel and hybrid dp 2 x pp 2 equal
`single`, with the gradient clipped by the norm over the whole model, and `paratrain run` of the config file trains
one that `paratrain.load_model` gives back as the transformers model."""
import json

import pytest

import paratrain
from paratrain.checkpoint import list_checkpoints, read_checkpoint
from paratrain.data import Datasets, MapDataset
from tests.helpers import ROOT, cli, fit, max_param_diff, run_jobs

pytest.importorskip("transformers", reason="transformers is a test extra (pip install -e '.[dev]')")
CONFIG = str(ROOT / "configs" / "hf_gpt2.toml")
SHORT = ["training.steps=6", "training.eval_every=6", "run.progress=off"]


def _config(tmp_path, name: str, *sets: str, run: str = "") -> paratrain.Config:
    return paratrain.load_config(CONFIG, [*SHORT, f"strategy.name={name}", *sets,
                                          f"run.dir={json.dumps(str(tmp_path / (run or name)))}"])


def test_a_transformers_model_under_the_data_parallel_strategies_equals_single(tmp_path):
    oracle = fit(_config(tmp_path, "single"))
    assert oracle["summary"]["eval_metrics"]["perplexity"] > 1
    out = run_jobs({name: (fit, _config(tmp_path, name)) for name in ("ddp", "zero2", "zero3", "hybrid")})
    # AdamW divides each update by the root of its second moment: a coordinate whose gradient is
    # near zero takes a step of lr from a float-order difference (seen: 3.2e-6 to 1.05e-5 after 6 steps).
    print({name: max_param_diff(ranks[0]["params"], oracle["params"]) for name, ranks in out.items()})
    for name, ranks in out.items():
        for rank in ranks:
            assert max_param_diff(rank["params"], oracle["params"]) <= 1e-4, name
            assert rank["summary"]["eval_loss"] == pytest.approx(oracle["summary"]["eval_loss"], abs=1e-5), name

    from examples import huggingface_gpt2 as hf

    cfg = _config(tmp_path, "single").replace(f"run.dir={json.dumps(str(tmp_path / 'api'))}")
    import torch

    torch.manual_seed(cfg.training.seed)
    data = Datasets(MapDataset(hf.dataset("train", cfg)), MapDataset(hf.dataset("eval", cfg)))
    api = paratrain.train(cfg, model=hf.build(), loss_fn=hf.loss, datasets=data)
    assert max_param_diff(api.model.state_dict(), oracle["params"]) <= 1e-6


def test_a_transformers_model_in_a_pipeline_equals_single(tmp_path):
    # 4 blocks: under zbv, 4 stages, whose attention mask (made by the first) is threaded through
    # the stages between. Clipped at every step (the norm is 1-3 here): the norm over the stages
    # counts the tied embedding once, as single's does.
    sets = ["model.options={n_layer=4}", "optimizer.grad_clip=0.5"]
    oracle = fit(_config(tmp_path, "single", *sets))
    out = run_jobs({run: (fit, _config(tmp_path, name, *sets, *more, run=run)) for run, (name, more) in {
        "1f1b": ("pipeline", ["strategy.pipeline.schedule=1f1b"]),
        "zbv": ("pipeline", ["strategy.pipeline.schedule=zbv", "strategy.pipeline.virtual_stages=2"]),
        "model_parallel": ("model_parallel", []),
    }.items()})
    # dp 2 x pp 2, the stages FSDP-sharded over dp: the tied copies' shards are summed
    out |= run_jobs({"hybrid": (fit, _config(tmp_path, "hybrid", *sets, "strategy.pp=2", "strategy.dp_mode=shard"))},
                    4)
    print({name: max_param_diff(ranks[0]["params"], oracle["params"]) for name, ranks in out.items()})
    for name, ranks in out.items():
        for rank in ranks:
            assert max_param_diff(rank["params"], oracle["params"]) <= 1e-4, name
            assert rank["summary"]["eval_loss"] == pytest.approx(oracle["summary"]["eval_loss"], abs=1e-5), name
            assert rank["summary"]["eval_metrics"]["accuracy"] == oracle["summary"]["eval_metrics"]["accuracy"]


def test_its_checkpoints_resume_between_a_pipeline_and_single(tmp_path):
    """A checkpoint holds the tied embedding's optimizer state once, under the plain model's name:
    a pipeline's resumes under single, and single's under a pipeline, whose copies all start from it."""
    every = ["checkpoint.every=3", "training.steps=6"]
    oracle = fit(_config(tmp_path, "single", *every))
    run_jobs({"pp": (fit, _config(tmp_path, "pipeline", "training.steps=3", "checkpoint.every=3", run="pp")),
              "from_single": (fit, _config(tmp_path, "pipeline", *every, run="from_single"),
                              tmp_path / "single" / "checkpoints" / "step-00000003.pt")})
    single = fit(_config(tmp_path, "single", *every, run="from_pp"),
                 resume=tmp_path / "pp" / "checkpoints" / "step-00000003.pt")
    piped = read_checkpoint(list_checkpoints(tmp_path / "from_single")[-1])["strategy"]["model"]
    assert max_param_diff(single["params"], oracle["params"]) <= 1e-4
    assert max_param_diff(piped, oracle["params"]) <= 1e-4


def test_paratrain_run_trains_a_pipeline_of_it_and_load_model_gives_it_back(tmp_path):
    out = cli(["run", CONFIG, "--set", "strategy.name=pipeline", "--set", "run.dir='pp'",
               *[a for s in SHORT for a in ("--set", s)]], cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr  # torch's tracer says nothing to the user
    model = paratrain.load_model(tmp_path / "pp")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    saved = read_checkpoint(list_checkpoints(tmp_path / "pp")[-1])["strategy"]["model"]
    assert max_param_diff(model.state_dict(), saved) == 0.0
    # the two copies of the tied embedding, trained on different stages, are one value
    assert saved["lm_head.weight"].equal(saved["transformer.wte.weight"])
