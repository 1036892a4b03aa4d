"""Messages between ranks without pickle: what the call sites carry comes back exactly, and bytes
that are not such a message are refused, never unpickled (paratrain/messages.py)."""
import json
import math
import os
import pickle
import random
import struct

import pytest
import torch

from paratrain.messages import MAGIC, MessageError, decode, encode


def roundtrip(tree):
    buf = encode(tree)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    return decode(buf)


def same(a, b) -> bool:
    """Equal values and equal types all the way down (a tuple is not a list, True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(k, kb) and same(a[k], b[kb]) for k, kb in zip(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


def test_nested_trees_with_tensors_of_every_kind_come_back_exactly():
    g = torch.Generator().manual_seed(0)
    tree = {
        "float32": torch.randn(3, 4, generator=g),
        "float64": torch.randn(2, generator=g, dtype=torch.float64),
        "float16": torch.randn(5, generator=g).half(),
        "bfloat16": torch.randn(2, 3, generator=g).bfloat16(),
        "int64": torch.arange(-3, 3),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "scalar": torch.tensor(2.5),  # 0-dim, as an optimizer's "step"
        "bf16_scalar": torch.tensor(-1.0, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous
        "plain": [None, True, False, 0, -7, 2**70, 1.0, -0.0, float("inf"), float("nan"), "", "ünï ✓"],
        "nested": {"list": [[1, 2], (3, [4, (5,)])], "tuple": (), "empty": {}},
        0: "an int key", 1.5: "a float key", (2, "x"): "a tuple key", None: "a None key", True: "a bool key",
    }
    back = roundtrip(tree)
    assert same(back, {**tree, "transposed": tree["transposed"].contiguous()})
    assert back["transposed"].is_contiguous()


def test_parameters_come_back_as_plain_tensors_that_own_their_memory():
    p = torch.nn.Parameter(torch.randn(4, 4))
    buf = encode({"w": p, "b": torch.zeros(2)})
    back = decode(buf)
    assert type(back["w"]) is torch.Tensor and not back["w"].requires_grad and torch.equal(back["w"], p.detach())
    buf.fill_(0)  # the message's buffer reused: the decoded tensors are copies
    assert torch.equal(back["w"], p.detach())
    assert back["w"].untyped_storage().nbytes() == 4 * 4 * 4  # not a view of the whole message


def test_rng_states_restore_the_same_streams():
    random.seed(1234)
    torch.manual_seed(1234)
    gen = torch.Generator().manual_seed(99)
    state = roundtrip({"torch": torch.get_rng_state(), "python": random.getstate(), "gen": gen.get_state()})
    expected = (random.random(), torch.rand(3), torch.rand(2, generator=gen))
    random.setstate(state["python"])  # needs tuples, as random.getstate() made them
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    again = (random.random(), torch.rand(3), torch.rand(2, generator=gen))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1]) and torch.equal(again[2], expected[2])


def test_an_optimizer_state_dict_loads_back():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()  # int-keyed state, param_groups with the betas tuple, None options
    back = roundtrip(sd)
    assert same(back, sd) and back["param_groups"][0]["betas"] == (0.9, 0.95)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3, betas=(0.9, 0.95))
    fresh.load_state_dict(back)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])


@pytest.mark.parametrize("value, where", [({"a": [1, {2, 3}]}, "['a'][1]"), ({"b": b"raw"}, "['b']"),
                                          (object(), "the top"), ({"d": torch.float32}, "['d']")])
def test_what_a_message_cannot_carry_is_refused_by_name(value, where):
    with pytest.raises(MessageError, match="cannot send") as e:
        encode(value)
    assert where in str(e.value)


class _Payload:
    """A pickle that, once loaded, would create a directory: the code a peer chooses."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    target = str(tmp_path / "ran")
    evil = pickle.dumps({"state": _Payload(target)})
    with pytest.raises(MessageError, match="not a paratrain message"):
        decode(_bytes(evil))
    # Behind a valid prefix, as the header: not JSON, refused.
    with pytest.raises(MessageError, match="header is not JSON"):
        decode(_bytes(struct.pack("<4sI", MAGIC, len(evil)) + evil))
    assert not os.path.exists(target)


def test_malformed_messages_are_one_clear_error():
    good = encode({"w": torch.ones(4)})
    with pytest.raises(MessageError, match="truncated"):
        decode(good[:-1])
    with pytest.raises(MessageError, match="1-D uint8"):
        decode(torch.zeros(4))

    def with_header(node, data=b""):
        header = json.dumps(node).encode()
        return _bytes(struct.pack("<4sI", MAGIC, len(header)) + header + data)

    with pytest.raises(MessageError, match="bad message node"):
        decode(with_header({"pickle": "gASVIAAAAAAAAACMBXBvc2l4lIwFbWtkaXKUk5Q="}))
    with pytest.raises(MessageError, match="bad tensor entry"):
        decode(with_header({"tensor": {"dtype": "object", "shape": [1], "offset": 0}}, b"\0" * 8))
    with pytest.raises(MessageError, match="bad tensor entry"):
        decode(with_header({"tensor": {"dtype": "float32", "shape": [-1], "offset": 0}}, b"\0" * 8))
    with pytest.raises(MessageError, match="truncated"):
        decode(with_header({"tensor": {"dtype": "float32", "shape": [3], "offset": 0}}, b"\0" * 8))
    with pytest.raises(MessageError, match="bad dict key"):
        decode(with_header({"dict": [[[1, 2], "a list key"]]}))
