"""Evaluation metrics beside the loss (`training.eval_metrics`, evaluation.py) under every strategy
family on 2 gloo ranks: where the ranks step together, equal to `single`'s on the same held-out
batches; perplexity exp(eval loss) where the loss is cross-entropy; recorded in the eval records,
the summary and the progress line."""
import math

import pytest

import paratrain
from tests.distributed.test_user_code import USER
from tests.helpers import TINY_GPT, config, fit, records, run_jobs

METRICS = 'training.eval_metrics=["accuracy", "tests.user_code:top_logit"]'


def test_metrics_under_each_strategy(tmp_path):
    sets = [*USER, METRICS, "training.eval_every=5", "training.eval_batches=2"]
    oracle = fit(config(sets, "strategy.name=single", run_dir=tmp_path / "single"))["summary"]
    assert set(oracle["eval_metrics"]) == {"accuracy", "top_logit"} and 0.5 < oracle["eval_metrics"]["accuracy"] <= 1
    lockstep = {"ddp": [], "zero3": [], "pipeline": ["strategy.pipeline.schedule=gpipe"]}
    apart = {"local_sgd": [], "diloco": [], "gossip": [], "hogwild": ["optimizer.momentum=0"],
             "parameter_server": []}
    gpt = [*TINY_GPT, 'training.eval_metrics=["accuracy", "perplexity"]', "training.steps=4", "training.eval_every=4"]
    jobs = {name: (fit, config(sets, f"strategy.name={name}", *extra, run_dir=tmp_path / name))
            for name, extra in {**lockstep, **apart}.items()}
    jobs |= {f"gpt-{name}": (fit, config(gpt, f"strategy.name={name}", run_dir=tmp_path / f"gpt-{name}"))
             for name in ("tensor", "pipeline")}
    out = run_jobs(jobs)
    for name in lockstep:
        got = out[name][0]["summary"]["eval_metrics"]
        assert got == pytest.approx(oracle["eval_metrics"], abs=1e-5), name
    for name in apart:
        got = out[name][0]["summary"]["eval_metrics"]
        assert set(got) == {"accuracy", "top_logit"} and 0 <= got["accuracy"] <= 1, name
    for name in lockstep | apart:  # every evaluation's record carries them
        evals = records(tmp_path / name, 0, "eval")
        assert [e["step"] for e in evals] == [5, 10, 15] and all("eval_accuracy" in e for e in evals), name
    gpt_oracle = fit(config(gpt, "strategy.name=single", run_dir=tmp_path / "gpt-single"))["summary"]
    for name in ("tensor", "pipeline"):  # vocabulary-sharded DTensor logits; the last stage's
        s = out[f"gpt-{name}"][0]["summary"]
        assert s["eval_metrics"]["perplexity"] == pytest.approx(math.exp(s["eval_loss"]), rel=1e-5), name
        assert s["eval_metrics"] == pytest.approx(gpt_oracle["eval_metrics"], rel=1e-5), name


def test_metrics_from_the_python_api_and_the_progress_line(tmp_path, capsys):
    cfg = config(USER, "strategy.name=single", 'training.eval_metrics=["accuracy"]', "run.progress=lines",
                 "training.eval_every=15", run_dir=tmp_path / "api")
    result = paratrain.train(cfg, metrics={"wrong": lambda out, y: (out.argmax(-1) != y).float().mean()})
    m = result.summary["eval_metrics"]
    assert m["accuracy"] + m["wrong"] == pytest.approx(1.0)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step 15/15")][0]
    assert f"accuracy {m['accuracy']:.4g}" in line and "wrong" in line
