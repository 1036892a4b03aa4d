"""Compression codecs under ddp (and diloco) on 2 gloo ranks: loss against uncompressed, bytes.

Every training shares one spawn and one process group (train() leaves a caller's group alone).
"""
import math

import pytest
import torch.distributed as dist

from paratrain.comm import ring_allgather_bytes, ring_allreduce_bytes
from paratrain.testing import run_ranks
from tests.helpers import MLP, config, fit, records

N = 2
P = 10 * 20 + 20 + 20 * 1 + 1  # the MLP's parameters: one DDP bucket
LOSS_BYTES = ring_allreduce_bytes(4, N)  # the logged loss, every step
SYNC_ROW_BYTES = ring_allgather_bytes(N * 8, N)  # diloco's sync: every rank's loss and pending signal
STEPS = 80
# Plain SGD and 80 steps (tests.helpers.MLP: momentum 0.9, 20 steps): with momentum 0.9 error
# feedback's delayed, accumulated updates made sign and random-k lag or diverge (measured), and
# 20 steps are too few for top-1% to catch up. lr 0.05 as in MLP.
TRAIN = ["optimizer.momentum=0.0", f"training.steps={STEPS}"]
CODECS = {  # codec -> its settings
    "none": [], "fp16": [], "bf16": [], "int8": [], "sign": [],
    "topk": ["strategy.compression.ratio=0.01"],  # keeps 3 of 241 values
    "randomk": ["strategy.compression.ratio=0.25"],  # 0.1 needs ~120 steps to come within 5%
    "powersgd": ["strategy.compression.rank=2"],  # rank 4 would not pay off on a 20 x 10 weight
}
K = {"topk": math.ceil(0.01 * P), "randomk": math.ceil(0.25 * P)}
# Bytes per rank and step of the gradient exchange (all-gather: (n-1)/n of the n payloads).
GRAD_BYTES = {
    "none": ring_allreduce_bytes(4 * P, N),
    "fp16": ring_allreduce_bytes(2 * P, N), "bf16": ring_allreduce_bytes(2 * P, N),
    "int8": ring_allgather_bytes(N * (P + 4), N),  # int8 per element + fp32 scale
    "sign": ring_allgather_bytes(N * (math.ceil(P / 8) + 4), N),  # 1 bit per element + fp32 scale
    "topk": ring_allgather_bytes(N * 8 * K["topk"], N),  # fp32 value + int32 index
    "randomk": ring_allgather_bytes(N * 8 * K["randomk"], N),
    # torch's PowerSGD from step 3: biases and the 1 x 20 weight uncompressed (41), P 20 x 2, Q 10 x 2
    "powersgd": sum(ring_allreduce_bytes(4 * m, N) for m in (41, 20 * 2, 10 * 2)),
}
# DiLoCo with its default outer Nesterov (lr 0.7, momentum 0.9): top-k at 25% and int8 keep up;
# sign (and top-k at 1%) did not, measured; sign is within 5% with plain outer averaging.
PLAIN_OUTER = ["strategy.local_sgd.outer_lr=1.0", "strategy.local_sgd.outer_momentum=0.0",
               "strategy.local_sgd.outer_nesterov=false"]
DILOCO = {"none": [], "topk": ["strategy.compression.codec=topk", "strategy.compression.ratio=0.25"],
          "int8": ["strategy.compression.codec=int8"],
          "plain-none": PLAIN_OUTER, "plain-sign": [*PLAIN_OUTER, "strategy.compression.codec=sign"]}
LOSS_TOL = 0.05  # final eval loss within 5% of uncompressed ddp


def _runs(tmp) -> dict:
    dist.init_process_group("gloo")
    runs = {codec: fit(config(MLP, "strategy.name=ddp", f"strategy.compression.codec={codec}", *sets, *TRAIN,
                              run_dir=tmp / codec))
            for codec, sets in CODECS.items()}
    for name, sets in DILOCO.items():  # H = 4: the pseudo-gradient compressed at each sync
        runs[f"diloco-{name}"] = fit(config(MLP, "strategy.name=diloco", "strategy.local_sgd.sync_every=4", *sets,
                                            *TRAIN, run_dir=tmp / f"diloco-{name}"))
    return {k: v["summary"] for k, v in runs.items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compression")
    return tmp, run_ranks(_runs, N, tmp)


def _step_bytes(run_dir, rank=0) -> list[int]:
    return [r["bytes_sent"] for r in records(run_dir, rank)]


@pytest.mark.parametrize("codec", list(CODECS))
def test_ddp_codec_trains_close_to_uncompressed(two_ranks, codec):
    _, ranks = two_ranks
    base, run = ranks[0]["none"]["eval_loss"], ranks[0][codec]["eval_loss"]
    assert run <= base * (1 + LOSS_TOL), f"{codec}: eval loss {run:.4f} vs uncompressed {base:.4f}"
    assert ranks[0][codec]["eval_loss"] == ranks[1][codec]["eval_loss"]  # replicas agree


@pytest.mark.parametrize("codec", list(CODECS))
def test_ddp_codec_bytes_match_formula(two_ranks, codec):
    tmp, _ = two_ranks
    for rank in range(N):
        steps = _step_bytes(tmp / codec, rank)
        if codec == "powersgd":  # plain all-reduce for the first 2 steps (torch's minimum with error feedback)
            assert steps[:2] == [GRAD_BYTES["none"] + LOSS_BYTES] * 2
            steps = steps[2:]
        assert set(steps) == {GRAD_BYTES[codec] + LOSS_BYTES}


# codec: whose ddp bytes formula applies (top-k at 25% sends as much as random-k at 25%)
@pytest.mark.parametrize("name, base, codec", [("topk", "none", "randomk"), ("int8", "none", "int8"),
                                               ("plain-sign", "plain-none", "sign")])
def test_diloco_compressed_pseudo_gradient(two_ranks, name, base, codec):
    tmp, ranks = two_ranks
    assert ranks[0][f"diloco-{name}"]["eval_loss"] <= ranks[0][f"diloco-{base}"]["eval_loss"] * (1 + LOSS_TOL)
    sync_bytes = [b - SYNC_ROW_BYTES for b in _step_bytes(tmp / f"diloco-{name}") if b > SYNC_ROW_BYTES]
    assert sync_bytes == [GRAD_BYTES[codec]] * (STEPS // 4)  # same payload as a ddp bucket of all P


@pytest.mark.parametrize("codec", list(CODECS))
def test_ddp_compression_ratio_is_reported_per_step(two_ranks, codec):
    # Uncompressed bytes over bytes sent, counted at the codec's call: the logged loss's all-reduce
    # goes uncompressed in both.
    tmp, _ = two_ranks
    steps = records(tmp / codec)
    if codec == "powersgd":
        steps = steps[2:]
    expected = (GRAD_BYTES["none"] + LOSS_BYTES) / (GRAD_BYTES[codec] + LOSS_BYTES)
    assert {round(r["compression_ratio"], 9) for r in steps} == {round(expected, 9)}
