"""Codecs on plain local SGD's average on 2 gloo ranks: replicas identical after each sync, bytes by
formula, loss within 5% of uncompressed (as test_compression.py checks ddp). One spawn for all.

Each rank compresses its delta from the last synchronised parameters (with error feedback) and
applies the mean delta to them, so every rank leaves a sync with the same parameters.
"""
import pytest
import torch.distributed as dist

from paratrain.comm import ring_allgather_bytes
from paratrain.config import ConfigError
from paratrain.strategies.layout import layout
from paratrain.testing import run_ranks
from tests.distributed.test_local_sgd import INT8, LOSS_GATHER, PLAIN_SGD, SYNCS, P, stepwise
from tests.helpers import MLP, config, fit, max_param_diff

# 10 steps, H = 4: syncs after steps 4, 8 and 10 (SYNCS), as test_local_sgd.py's local_h4 without a codec.
SHORT = ["strategy.name=local_sgd", "strategy.local_sgd.sync_every=4", "training.steps=10", "checkpoint.enabled=false"]
# codec -> bytes per rank of one sync's average on 2 ranks: an all-gather of the packed payloads.
SHORT_CODECS = {"int8": ([INT8], ring_allgather_bytes(2 * (P + 4), 2)),  # a byte per value + fp32 scale
                "topk": (["strategy.compression.codec=topk", "strategy.compression.ratio=0.1"],
                         ring_allgather_bytes(2 * 8 * 25, 2))}  # 25 of 241 values: fp32 value + int32 index
# Plain SGD, 80 steps, as test_compression.py: with momentum 0.9 error feedback lags (measured there).
LONG = ["strategy.name=local_sgd", "strategy.local_sgd.sync_every=4", PLAIN_SGD, "training.steps=80"]
LONG_CODECS = {"none": [], "int8": [INT8], "sign": ["strategy.compression.codec=sign"],
               "topk": ["strategy.compression.codec=topk", "strategy.compression.ratio=0.1"]}
LOSS_TOL = 0.05  # measured: int8 +0.0%, sign +0.9%, top-10% +2.7%


def _runs(tmp) -> dict:
    dist.init_process_group("gloo")
    runs = {f"short_{codec}": stepwise(config(MLP, *SHORT, *sets, run_dir=tmp / f"short_{codec}"))["steps"]
            for codec, (sets, _) in SHORT_CODECS.items()}
    for codec, sets in LONG_CODECS.items():
        runs[f"long_{codec}"] = fit(config(MLP, *LONG, *sets, run_dir=tmp / f"long_{codec}"))
    return runs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_runs, 2, tmp_path_factory.mktemp("local_sgd_codecs"))


@pytest.mark.parametrize("codec", list(SHORT_CODECS))
def test_replicas_identical_after_each_sync_under_a_codec(two_ranks, codec):
    a, b = (r[f"short_{codec}"] for r in two_ranks)
    for step, (ra, rb) in enumerate(zip(a, b)):
        diff = (ra["params"] - rb["params"]).abs().max().item()
        if step in SYNCS:
            assert diff == 0.0, step
            assert ra["replica_rms_dist"] > 1e-6 and ra["loss"] == rb["loss"]
        else:
            assert diff > 1e-6, step


@pytest.mark.parametrize("codec", list(SHORT_CODECS))
def test_bytes_are_the_codec_payload_at_syncs(two_ranks, codec):
    for r in two_ranks:
        for step, rec in enumerate(r[f"short_{codec}"]):
            assert rec["bytes_sent"] == (SHORT_CODECS[codec][1] + LOSS_GATHER if step in SYNCS else 0), step


@pytest.mark.parametrize("codec", [c for c in LONG_CODECS if c != "none"])
def test_local_sgd_codec_trains_close_to_uncompressed(two_ranks, codec):
    base, run = (two_ranks[0][f"long_{c}"]["summary"]["eval_loss"] for c in ("none", codec))
    assert run <= base * (1 + LOSS_TOL), f"{codec}: eval loss {run:.4f} vs uncompressed {base:.4f}"
    assert max_param_diff(two_ranks[0][f"long_{codec}"]["params"], two_ranks[1][f"long_{codec}"]["params"]) == 0.0
    # The codec changed the training (the comparison is not of two identical runs).
    assert max_param_diff(two_ranks[0][f"long_{codec}"]["params"], two_ranks[0]["long_none"]["params"]) > 1e-4


@pytest.mark.parametrize("name", ["local_sgd", "diloco"])
def test_codecs_each_variant_takes(name):
    for codec in ("fp16", "bf16", "int8", "topk", "randomk", "sign"):
        layout(config(MLP, f"strategy.name={name}", f"strategy.compression.codec={codec}"), 2)
    with pytest.raises(ConfigError, match="strategy.compression.codec = 'powersgd'"):
        layout(config(MLP, f"strategy.name={name}", "strategy.compression.codec=powersgd"), 2)
