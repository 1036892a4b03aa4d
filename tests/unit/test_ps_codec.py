"""The parameter server's compressed links without processes: message sizes, the two copies of a
pull staying equal, and error feedback losing nothing (strategies/ps_codec.py)."""
import math

import pytest
import torch

from paratrain.config import CompressionConfig
from paratrain.strategies.parameter_server.codec import Link, ServerLinks, WorkerLinks

N = 241  # the MLP's parameters
PAYLOAD = {"fp16": 2 * N, "bf16": 2 * N, "int8": N + 4, "sign": math.ceil(N / 8) + 4,
           "topk": 8 * math.ceil(0.05 * N), "randomk": 8 * math.ceil(0.05 * N)}


def links(codec: str, num_workers: int = 2, numel: int = N):
    cfg = CompressionConfig(codec=codec, ratio=0.05)
    return (ServerLinks(cfg, 0, numel, torch.float32, num_workers),
            [WorkerLinks(cfg, w, [numel], torch.float32) for w in range(num_workers)])


@pytest.mark.parametrize("codec", list(PAYLOAD))
def test_message_sizes_are_the_codec_payloads(codec):
    server, workers = links(codec)
    assert server.push.empty().numel() == workers[0].reply_buffer(0).numel() == PAYLOAD[codec]
    grad = torch.randn(N)
    assert workers[0].encode_push(0, grad).numel() == PAYLOAD[codec]  # what is sent fits what is posted
    plain, flat = Link(None, N, torch.float32), torch.randn(N)
    assert plain.empty().shape == (N,) and plain.empty().dtype == torch.float32  # no codec: the flat tensor as it is
    assert plain.encode(flat, None) is flat and plain.decode(flat) is flat


@pytest.mark.parametrize("codec", list(PAYLOAD))
def test_pull_copies_stay_equal_and_lose_nothing(codec):
    torch.manual_seed(0)
    params = [torch.randn(N)]
    initial = [params[0].clone()]  # what the workers hold before their first pull
    server, workers = links(codec)
    server.start(params)
    for _step in range(30):
        params[0] += 0.01 * torch.randn(N)  # the server's updates
        for w, worker in enumerate(workers):
            held = worker.apply_pull(0, server.encode_pull(w, params[0]), initial)
            assert torch.equal(held, server.sent[w])  # bit for bit: both add the same decoded bytes
    if codec in ("topk", "randomk", "sign", "int8"):
        assert not torch.equal(server.sent[0], params[0])  # lossy: the copy lags...
    for _ in range(300):  # ...but what a pull dropped is in the next difference: with the parameters
        held = workers[0].apply_pull(0, server.encode_pull(0, params[0]), None)  # still, the copy catches up
    assert torch.allclose(held, params[0], atol=1e-3)


def test_the_worker_copy_starts_from_the_parameters_the_server_starts_from():
    server, workers = links("topk")
    params = [torch.randn(N)]
    server.start(params)
    held = workers[0].apply_pull(0, server.encode_pull(0, params[0]), params)  # nothing changed yet
    assert torch.equal(held, params[0])


@pytest.mark.parametrize("codec", ["topk", "sign", "int8"])
def test_push_error_feedback_loses_nothing(codec):
    server, workers = links(codec)
    sent, decoded = torch.zeros(N), torch.zeros(N)
    for _ in range(10):
        grad = torch.randn(N)
        sent += grad
        decoded += server.decode_push(workers[0].encode_push(0, grad))
    assert torch.allclose(sent, decoded + workers[0].states[0].residual, atol=1e-4)


def test_an_idle_server_codes_nothing():
    server, _ = links("topk", numel=0)  # more servers than tensors: one holds none
    assert not server.compressed and server.push.empty().numel() == 0
    server.start([])
