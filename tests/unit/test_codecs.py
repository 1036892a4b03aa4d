"""Codecs without processes: round-trip error bounds, payload sizes, error-feedback invariant."""
import math

import pytest
import torch

from paratrain.compression.codecs import CodecState, Int8, RandomK, Sign, TopK, make_codec, pack, unpack
from paratrain.config import ConfigError
from paratrain.strategies import layout
from tests.helpers import MLP, config

NUMEL = 1001  # not a multiple of 8: the sign codec pads its last byte


def _x(seed=0, numel=NUMEL):
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def _roundtrip(codec, x):
    payload = codec.compress(x, CodecState())
    return payload, codec.decompress(payload, x.shape)


@pytest.mark.parametrize("name, rel", [("fp16", 2 ** -11), ("bf16", 2 ** -8)])
def test_cast_relative_error(name, rel):
    x = _x()
    payload, y = _roundtrip(make_codec(name, error_feedback=False), x)
    assert ((y - x).abs() <= rel * x.abs()).all()
    assert make_codec(name).payload_bytes(payload) == 2 * NUMEL


def test_int8_error_below_one_level_and_unbiased():
    x = _x()
    codec = Int8(error_feedback=False)
    payload, y = _roundtrip(codec, x)
    scale = x.abs().max()
    assert torch.equal(payload[0], scale.reshape(1))
    assert ((y - x).abs() <= scale / 127 * (1 + 1e-6)).all()
    assert codec.payload_bytes(payload) == NUMEL + 4
    state = CodecState()  # stochastic rounding: the mean of many decodings approaches x
    mean = sum(codec.decompress(codec.compress(x, state), x.shape) for _ in range(400)) / 400
    assert (mean - x).abs().max() < 0.25 * scale / 127


def test_topk_keeps_exactly_the_k_largest():
    x = _x()
    codec = TopK(0.05, error_feedback=False)
    payload, y = _roundtrip(codec, x)
    k = math.ceil(0.05 * NUMEL)
    kept = y.ne(0)
    assert kept.sum() == k
    assert x.abs()[kept].min() >= x.abs()[~kept].max()
    assert torch.equal(y[kept], x[kept])
    assert codec.payload_bytes(payload) == 8 * k  # fp32 values + int32 indices


def test_randomk_keeps_k_values_exactly():
    x = _x()
    payload, y = _roundtrip(RandomK(0.1, error_feedback=False), x)
    kept = y.ne(0)
    assert kept.sum() == math.ceil(0.1 * NUMEL) and torch.equal(y[kept], x[kept])


def test_sign_recovers_sign_and_scale_in_one_bit_per_element():
    x = _x()
    codec = Sign(error_feedback=False)
    payload, y = _roundtrip(codec, x)
    assert torch.equal(y.sign(), torch.where(x >= 0, 1.0, -1.0))
    assert torch.allclose(y.abs(), x.abs().mean().expand_as(y))
    assert payload[1].dtype == torch.uint8 and codec.payload_bytes(payload) == math.ceil(NUMEL / 8) + 4


@pytest.mark.parametrize("name", ["fp16", "bf16", "topk", "randomk", "sign", "int8"])
def test_error_feedback_residual_is_exactly_what_was_not_sent(name):
    codec, state = make_codec(name, ratio=0.05), CodecState()
    true_sum, sent_sum = torch.zeros(NUMEL, dtype=torch.float64), torch.zeros(NUMEL, dtype=torch.float64)
    residual_norms = []
    for step in range(30):
        g = _x(seed=step)
        sent = codec.decompress(codec.compress(g, state), g.shape)
        true_sum += g.double()
        sent_sum += sent.double()
        # sum(true) - sum(sent) = residual, at every step, up to fp32 rounding
        assert torch.allclose(true_sum - sent_sum, state.residual.double(), atol=1e-4)
        residual_norms.append(state.residual.norm().item())
    # bounded: the residual does not grow like the sum of 30 gradients (~ sqrt(30) |g|)
    assert max(residual_norms[10:]) < 2 * max(residual_norms[:10]) + 1e-3


def test_pack_unpack_roundtrip():
    payload = Sign().compress(_x(), CodecState()) + TopK(0.1).compress(_x(1), CodecState())
    back = unpack(pack(payload), payload)
    assert all(torch.equal(a, b) for a, b in zip(payload, back))


@pytest.mark.parametrize("sets", [["strategy.name=zero2"], ["strategy.name=tensor"], ["strategy.name=hogwild"],
                                  ["strategy.name=diloco", "strategy.compression.codec=powersgd"],
                                  ["strategy.name=gossip", "strategy.compression.codec=powersgd"]])
def test_config_rejects_compression_where_unsupported(sets):
    codec = [] if any("codec" in s for s in sets) else ["strategy.compression.codec=topk"]
    with pytest.raises(ConfigError, match="strategy.compression.codec"):
        layout(config(MLP, *sets, *codec), 2)


def test_config_accepts_compression():
    cfg = config(MLP, "strategy.compression.codec=topk", "strategy.compression.ratio=0.1")
    assert cfg.strategy.compression.ratio == 0.1
    with pytest.raises(ConfigError, match="ratio"):
        config(MLP, "strategy.compression.ratio=0")
