"""ddp on 2 gloo ranks against the single-process oracle (same seed, same global batch)."""
import pytest

from paratrain.comm import ring_allreduce_bytes
from paratrain.testing import run_ranks
from tests.helpers import MLP, TINY_GPT, config, fit, initial_params, max_param_diff

TOL = 1e-5  # fp32: all-reduce sums in another order than one big batch, nothing more


@pytest.mark.parametrize("base", [TINY_GPT, MLP], ids=["gpt-adamw", "mlp-sgd-momentum"])
def test_ddp_equals_single(base, tmp_path):
    oracle = fit(config(base, "strategy.name=single", run_dir=tmp_path / "single"))
    ranks = run_ranks(fit, 2, config(base, "strategy.name=ddp", run_dir=tmp_path / "ddp"))
    # The comparison means something only if training moved the weights well beyond TOL.
    assert max_param_diff(oracle["params"], initial_params(config(base))) > 1e-2
    for r in ranks:
        assert max_param_diff(r["params"], oracle["params"]) <= TOL
    for key in ("final_loss", "eval_loss"):
        assert ranks[0]["summary"][key] == pytest.approx(oracle["summary"][key], abs=1e-5)
    # Every rank sent its gradients: ring all-reduce of the fp32 parameters each step, plus the
    # 4-byte loss for the log.
    n_params = sum(v.numel() for v in oracle["params"].values())
    for r in ranks:
        assert r["summary"]["bytes_sent_per_step"] == ring_allreduce_bytes(4 * n_params, 2) + ring_allreduce_bytes(4, 2)


def test_gradient_accumulation_equals_larger_batch(tmp_path):
    one = fit(config(TINY_GPT, "strategy.name=single", run_dir=tmp_path / "a"))
    accum = fit(config(TINY_GPT, "strategy.name=single", "training.grad_accum_steps=4", run_dir=tmp_path / "b"))
    assert max_param_diff(one["params"], accum["params"]) <= TOL
    # ddp with no_sync over 2 micro-batches per rank: 2 ranks x 2 x 2 samples = the same 8.
    ranks = run_ranks(fit, 2, config(TINY_GPT, "strategy.name=ddp", "training.grad_accum_steps=2",
                                     run_dir=tmp_path / "c"))
    assert max_param_diff(ranks[0]["params"], one["params"]) <= TOL


def test_resume_equals_uninterrupted(tmp_path):
    # Dropout, warm-up + cosine and clipping: resuming must restore RNG streams, optimizer
    # state, data position and schedule, or the parameters drift apart.
    sets = ["strategy.name=ddp", "model.dropout=0.1", "optimizer.schedule=cosine", "optimizer.warmup_steps=4",
            "optimizer.grad_clip=0.5", "checkpoint.enabled=true", "checkpoint.every=10", "checkpoint.keep=3"]
    full = run_ranks(fit, 2, config(TINY_GPT, *sets, run_dir=tmp_path / "full"))
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000010.pt"
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    (resumed_dir / ckpt.name).write_bytes(ckpt.read_bytes())
    resumed = run_ranks(fit, 2, config(TINY_GPT, *sets, run_dir=tmp_path / "resumed"), resumed_dir / ckpt.name)
    for a, b in zip(full, resumed):
        assert max_param_diff(a["params"], b["params"]) == 0.0
    assert resumed[0]["summary"]["steps_this_start"] == 10  # it really ran only the second half
