"""The pure logic of two strategies' additions, with no processes: local SGD's time-bounded rounds
(deadline.py) on a simulated clock, and CHOCO-SGD's compressed gossip (choco.py) on a simulated ring."""
import math

import pytest
import torch

from paratrain.compression.codecs import CodecState, make_codec, pack
from paratrain.strategies.gossip.choco import ChocoGossip
from paratrain.strategies.local_sgd.deadline import RoundDeadline


def _round(deadline: RoundDeadline, step_s: float, steps: int, pause_after: dict | None = None) -> list[bool]:
    """One round of `steps` steps on a simulated clock: a computed step takes `step_s`, a dropped
    one nothing; `pause_after[j]` seconds of evaluation follow step j. Returns which were dropped."""
    now, dropped = 100.0, []
    for j in range(steps):
        dropped.append(deadline.skip(now))
        now += 0.0 if dropped[-1] else step_s
        if pause_after and j in pause_after:
            now += pause_after[j]
            deadline.pause(pause_after[j])
    return dropped


def test_first_round_has_no_budget_then_the_straggler_drops_what_would_overrun():
    fast, slow = RoundDeadline(slack=0.1), RoundDeadline(slack=0.1)
    assert _round(fast, 1.0, 4) == [False] * 4 and _round(slow, 2.5, 4) == [False] * 4  # no budget yet
    # Step times are measured from one step's start to the next's, the sync step left out.
    assert fast.own_median_s() == pytest.approx(1.0) and slow.own_median_s() == pytest.approx(2.5)
    fastest = min(fast.own_median_s(), slow.own_median_s())
    for d in (fast, slow):
        d.next_round(fastest, 4)
        assert d.budget_s == pytest.approx(4.4)  # 4 steps x 1.0 s x 1.1: the same on every rank
    assert _round(fast, 1.0, 4) == [False] * 4  # finishes at 4.0 <= 4.4
    assert _round(slow, 2.5, 4) == [False, True, True, True]  # 2.5 + 2.5 > 4.4: stops at 2.5
    assert (fast.skipped, slow.skipped, slow.computed) == (0, 3, 1)


def test_evaluation_time_is_not_the_rounds():
    d = RoundDeadline(slack=0.1)
    _round(d, 1.0, 4)
    d.next_round(d.own_median_s(), 4)
    # 10 s of evaluation (fast ranks waiting for a slow one there) after step 1: nothing dropped.
    assert _round(d, 1.0, 4, pause_after={0: 10.0}) == [False] * 4
    assert d.own_median_s() == pytest.approx(1.0)
    # Evaluation after the sync step, before the next round's first step: not subtracted from that round.
    d.next_round(1.0, 4)
    d.pause(10.0)
    assert _round(d, 2.0, 4) == [False, False, True, True]  # 2 + 2 + 2 > 4.4 after two steps


def test_a_rank_that_dropped_a_whole_round_measures_itself_again():
    d = RoundDeadline(slack=0.1)
    _round(d, 10.0, 4)
    d.next_round(1.0, 4)
    assert _round(d, 10.0, 4) == [True] * 4  # one step of it exceeds the whole budget
    d.next_round(1.0, 4)
    assert _round(d, 1.0, 4) == [False] * 4  # the probe: it computes its first step, then is fast again
    assert d.own_median_s() == pytest.approx(1.0)
    d.next_round(math.inf, 4)  # nobody measured anything: no budget
    assert d.budget_s is None and _round(d, 10.0, 4) == [False] * 4


def _ring(nodes: list[ChocoGossip], x: list[torch.Tensor]) -> list[torch.Tensor]:
    """One CHOCO gossip round on a ring, messages handed over in memory."""
    n, messages = len(nodes), [node.message(xi) for node, xi in zip(nodes, x)]
    return [nodes[r].mix(x[r], {p: messages[p] for p in ((r - 1) % n, (r + 1) % n)})[0] for r in range(n)]


def test_choco_with_an_exact_message_and_step_1_is_plain_gossip():
    # Small integers are exact in fp16: q = x - 0 arrives whole, and gamma = 1 is D-PSGD's mixing.
    x = [torch.arange(6.0) * (r + 1) - r for r in range(4)]
    nodes = [ChocoGossip("fp16", 0.01, consensus_step=1.0, rank=r) for r in range(4)]
    mixed = _ring(nodes, x)
    for r in range(4):
        assert torch.allclose(mixed[r], (x[r - 1] + x[r] + x[(r + 1) % 4]) / 3, atol=1e-6)


# gamma must shrink as compression grows (the paper tunes it per codec); tolerances 7x to 70x the measured.
@pytest.mark.parametrize("codec, ratio, gamma, rounds, tol", [("int8", 0.01, 0.5, 100, 1e-4),
                                                            ("topk", 0.1, 0.2, 200, 1e-4),  # 5 of 50 values
                                                            ("sign", 0.01, 0.5, 400, 1e-3)])
def test_choco_reaches_the_exact_average_with_compressed_messages(codec, ratio, gamma, rounds, tol):
    torch.manual_seed(0)
    x = [torch.randn(50) * 3 for _ in range(4)]
    average = torch.stack(x).mean(0)
    nodes = [ChocoGossip(codec, ratio, consensus_step=gamma, rank=r) for r in range(4)]
    for _ in range(rounds):
        x = _ring(nodes, x)
        # Every consensus step preserves the average (symmetric mixing), whatever the codec dropped.
        assert (torch.stack(x).mean(0) - average).abs().max().item() < 1e-5
    assert max((xi - average).abs().max().item() for xi in x) < tol
    payload = nodes[0].codec.compress(torch.randn(50), nodes[0].state)
    assert pack(payload).numel() == {"int8": 50 + 4, "topk": 8 * 5, "sign": 7 + 4}[codec]  # bytes per message


def test_mixing_compressed_replicas_directly_loses_the_average():
    # What CHOCO fixes: plain gossip of top-k compressed parameters never agrees on the average.
    torch.manual_seed(0)
    x = [torch.randn(50) * 3 for _ in range(4)]
    average = torch.stack(x).mean(0)
    codec = make_codec("topk", 0.1, error_feedback=False)
    for _ in range(200):
        sent = [codec.decompress(codec.compress(xi, CodecState()), xi.shape) for xi in x]
        x = [(x[r] + sent[r - 1] + sent[(r + 1) % 4]) / 3 for r in range(4)]
    assert max((xi - average).abs().max().item() for xi in x) > 0.5
