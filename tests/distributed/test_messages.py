"""paratrain.messages' collectives on 3 gloo ranks, each sending a message of another size
(gloo aborts a process whose receive buffer is too small, so the sizes must be exact)."""
import torch
import torch.distributed as dist

from paratrain import messages
from paratrain.testing import run_ranks


def _mine(rank: int):
    return {"rank": rank, "rows": torch.arange(rank * 5.0).reshape(rank, 5), "betas": (0.9, rank)}


def _exchange() -> dict:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    odd = dist.new_group([1, 2])  # a subgroup: dst / src are global ranks, as in torch
    got = {"all": messages.all_gather(_mine(rank)),
           "gather": messages.gather(_mine(rank), dst=1),
           "bcast": messages.broadcast(_mine(rank) if rank == 2 else None, src=2)}
    if rank in (1, 2):
        got["sub"] = messages.gather(_mine(rank), dst=2, group=odd)
    if rank == 0:
        got["sent"] = messages.send(_mine(0), dst=2, size_tag=7, payload_tag=8)
    if rank == 2:
        got["recv"] = messages.recv(0, size_tag=7, payload_tag=8)
    return got


def _same(a, b) -> bool:
    return (a["rank"] == b["rank"] and a["betas"] == b["betas"] and isinstance(b["betas"], tuple)
            and torch.equal(a["rows"], b["rows"]))


def test_collectives_carry_messages_of_different_sizes():
    got = run_ranks(_exchange, 3, timeout_s=120)
    for rank, g in enumerate(got):
        assert all(_same(_mine(r), x) for r, x in zip(range(3), g["all"]))
        assert (g["gather"] is None) == (rank != 1)
        assert _same(_mine(2), g["bcast"])
    assert [_same(_mine(r), x) for r, x in enumerate(got[1]["gather"])] == [True] * 3
    assert got[1]["sub"] is None and [x["rank"] for x in got[2]["sub"]] == [1, 2]
    assert got[0]["sent"] == 8 + messages.encode(_mine(0)).numel() and _same(_mine(0), got[2]["recv"])
