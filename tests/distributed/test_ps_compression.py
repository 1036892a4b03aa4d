"""parameter_server with codecs on push and pull (3 gloo ranks): loss against uncompressed, bytes
against each codec's payload formula, exact resume, and the codecs it refuses.

Every training shares one spawn and one process group (train() leaves a caller's group alone).
"""
import dataclasses
import math

import pytest
import torch.distributed as dist

from paratrain.config import CompressionConfig, ConfigError
from paratrain.strategies.layout import layout
from paratrain.strategies.parameter_server.protocol import HEADER_BYTES, PUSH_REPLY_NUMEL, partition
from paratrain.testing import run_ranks
from tests.distributed.test_parameter_server import copy_checkpoint
from tests.helpers import MLP, config, fit, max_param_diff, records, server_report

WORLD = 3
STEPS = 80
PS = ["strategy.name=parameter_server", "strategy.ps.mode=bsp"]  # BSP: ddp's math, so test_compression's bar
# Plain SGD and 80 steps, as test_compression.py measured for ddp (momentum 0.9 with error feedback lags).
TRAIN = ["optimizer.momentum=0.0", f"training.steps={STEPS}"]
# Measured eval loss vs none: fp16, bf16, int8 0%, sign +1.7%, top-1% +2.4%, random-25% +3.2%.
CODECS = {"none": {}, "fp16": {}, "bf16": {}, "int8": {}, "sign": {},
          "topk": {"ratio": 0.01},  # keeps 3 of 241 values each way
          "randomk": {"ratio": 0.25}}
SSP = ["strategy.ps.mode=ssp", "optimizer.lr=0.025"]  # asynchronous: lr / workers (parameter_server.py)
LOSS_TOL = 0.05  # final eval loss within 5% of uncompressed
SIZES = {"layer0.weight": 200, "layer0.bias": 20, "layer1.weight": 20, "layer1.bias": 1}  # the MLP's
RESUMABLE = [*PS, "training.steps=20", "checkpoint.every=10", "checkpoint.keep=3"]


def with_codec(cfg, codec: str, **options):
    """`cfg` with strategy.compression set."""
    compression = CompressionConfig(codec=codec, **options)
    return dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, compression=compression))


def _runs(tmp) -> dict:
    dist.init_process_group("gloo")
    out = {codec: fit(with_codec(config(MLP, *PS, *TRAIN, run_dir=tmp / codec), codec, **options))
           for codec, options in CODECS.items()}
    for codec in ("none", "int8"):  # asynchronous: each worker's copy is pulled at its own times
        out[f"ssp-{codec}"] = fit(with_codec(config(MLP, *PS, *TRAIN, *SSP, run_dir=tmp / f"ssp-{codec}"), codec))
    # one worker, two servers: a payload per shard, sized by that shard
    out["topk-2servers"] = fit(with_codec(config(MLP, *PS, "strategy.ps.servers=2", run_dir=tmp / "topk-2servers"),
                                          "topk", ratio=0.01))
    # resume: every residual, copy and generator restored (int8 draws random numbers on both links)
    out["full"] = fit(with_codec(config(MLP, *RESUMABLE, run_dir=tmp / "full"), "int8"))
    if dist.get_rank() == 0:
        copy_checkpoint(tmp / "full", tmp / "resumed")
    dist.barrier()
    out["resumed"] = fit(with_codec(config(MLP, *RESUMABLE, run_dir=tmp / "resumed"), "int8"),
                         resume=tmp / "resumed" / "checkpoints" / "step-00000010.pt")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ps_compression")
    return tmp, run_ranks(_runs, WORLD, tmp, timeout_s=300)


def payload_bytes(codec: str, numel: int) -> int:
    """A shard's payload, by the codec's formula (paratrain.compression.codecs)."""
    if codec in ("topk", "randomk"):  # an fp32 value and an int32 index for each of k
        return 8 * math.ceil(CODECS[codec]["ratio"] * numel)
    return {"none": 4 * numel, "fp16": 2 * numel, "bf16": 2 * numel,
            "int8": numel + 4,  # an int8 per element and an fp32 scale
            "sign": math.ceil(numel / 8) + 4}[codec]  # a bit per element and an fp32 scale


@pytest.mark.parametrize("job,base", [*((c, "none") for c in CODECS if c != "none"), ("ssp-int8", "ssp-none")])
def test_codec_trains_close_to_uncompressed(runs, job, base):
    # The eval loss is the workers' own: of the copies the compressed pulls rebuilt.
    _, ranks = runs
    base, run = ranks[0][base]["summary"]["eval_loss"], ranks[0][job]["summary"]["eval_loss"]
    assert run <= base * (1 + LOSS_TOL), f"{job}: eval loss {run:.4f} vs uncompressed {base:.4f}"


@pytest.mark.parametrize("job", [*CODECS, "ssp-int8", "topk-2servers"])
def test_bytes_match_the_payload_formula(runs, job):
    tmp, ranks = runs
    servers = 2 if job.endswith("2servers") else 1
    codec = job.removeprefix("ssp-").removesuffix("-2servers")
    workers, steps = WORLD - servers, 20 if job.endswith("2servers") else STEPS
    shards = [sum(SIZES[n] for n in names) for names in partition(SIZES, servers)]
    push = sum(HEADER_BYTES + payload_bytes(codec, n) for n in shards)
    pull = sum(8 * PUSH_REPLY_NUMEL + payload_bytes(codec, n) for n in shards)
    for rank in range(workers):  # every step, exactly: a header and a payload each way per shard
        steps_of_rank = records(tmp / job, rank)
        assert {r["bytes_sent"] for r in steps_of_rank} == {push}
        plain = sum(HEADER_BYTES + 4 * n for n in shards)  # the same push uncompressed
        assert {round(r["compression_ratio"], 9) for r in steps_of_rank} == {round(plain / push, 9)}
        assert {r["bytes_received"] for r in steps_of_rank} == {pull}
    reports = [server_report(tmp / job, workers + s) for s in range(servers)]
    assert sum(r["push_bytes"] for r in reports) == steps * workers * push
    assert sum(r["pull_bytes"] for r in reports) == steps * workers * pull
    if codec != "none":
        assert push < HEADER_BYTES * servers + 4 * sum(shards)  # it did compress


def test_resume_with_a_codec_equals_uninterrupted(runs):
    _, ranks = runs
    for r in (ranks[0], ranks[1], ranks[2]):
        assert max_param_diff(r["full"]["params"], r["resumed"]["params"]) == 0.0
    assert ranks[0]["resumed"]["summary"]["steps_this_start"] == 10  # it really ran only the second half
    assert ranks[0]["full"]["summary"]["eval_loss"] == ranks[0]["resumed"]["summary"]["eval_loss"]


def test_codecs_parameter_server_cannot_take_are_one_line_errors():
    cfg = with_codec(config(MLP, *PS), "powersgd")
    with pytest.raises(ConfigError) as err:
        layout(cfg, WORLD)  # what preflight calls, before any worker starts
    assert "strategy.compression.codec = 'powersgd'" in str(err.value) and "\n" not in str(err.value)
    for codec in ("fp16", "int8", "topk", "sign"):
        layout(with_codec(config(MLP, *PS), codec), WORLD)
