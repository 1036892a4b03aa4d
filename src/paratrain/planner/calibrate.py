"""`paratrain calibrate`: measure this machine as the planner sees it, and store it as TOML.

What one rank achieves with one thread while another rank does the same (paratrain runs a rank
per core, one thread each):
- matmul FLOP/s per dtype (fp32, bf16) of a large square product, and in fp32 at the sizes of a
  small model's products (the rate at each size: `Device.rate` interpolates between them);
- memory bandwidth: a copy of a tensor far larger than the caches (read + write bytes / time);
- an operator's fixed cost, forward (recorded by autograd) and backward, on a tiny tensor, and the
  same through a DTensor (tensor parallelism dispatches every op of its layers through one);
- per collective (all-reduce, all-gather, reduce-scatter, point-to-point), the link's alpha and
  beta between two local ranks over gloo on the loopback interface: times over message sizes from
  16 KiB to 16 MiB, fitted by least squares to T(S) = steps x alpha + wire bytes(S) / beta with the
  ring's steps and wire bytes for two ranks (collectives.py), so that `plan` predicts those
  collectives with the same formulas it fitted. With `device = "cuda"`: the same on the GPU, with NCCL.
Written by hand: torch has no calibration of its own; the timing is torch's collectives themselves.
"""
from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from paratrain.planner.hardware import Calibration

SIZES = [2**k for k in range(14, 25, 2)]  # 16 KiB .. 16 MiB
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


def _best(fn, repeats: int = 5) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(dtype: torch.dtype, device: str = "cpu", m: int = 1024, n: int = 1024, k: int = 1024) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)

    def run():
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * m * n * k / _best(run)


# (m, n, k) of the products a small model's layers make (tokens x width x width or 4 x width), up to
# the large square one: on a CPU the rate climbs by several times across them.
SHAPES_MK = [(64, 64, 64), (256, 128, 128), (512, 128, 512), (1024, 256, 256), (1024, 512, 512),
             (2048, 512, 1024), (1024, 1024, 1024)]


def memory_bandwidth(device: str = "cpu", nbytes: int = 256 * 2**20) -> float:
    src = torch.empty(nbytes // 4, device=device)
    src.fill_(1.0)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * nbytes / _best(run)


def op_seconds(x: torch.Tensor, count: int = 500) -> tuple[float, float]:
    """The fixed cost of one operator as training pays it, on a tiny tensor: (forward, recorded by
    autograd; its backward). `x` may be a DTensor: tensor parallelism dispatches each op through it."""
    x = x.detach().requires_grad_(True)

    def forward():
        y = x
        for _ in range(count):
            y = y * 1.0001
        return y

    def both():
        forward().sum().backward()

    fwd = _best(forward)
    return fwd / count, max(0.0, _best(both) - fwd) / count


def _ops(device: str, rank: int, size: int) -> dict:
    """The four collectives on `size` bytes, as paratrain's strategies call them (FSDP2 gathers and
    reduce-scatters into flat tensors; pipelines send and receive)."""
    import torch.distributed as dist

    x = torch.ones(size // 4, device=device)  # `size` bytes: the whole tensor of each collective
    half = torch.empty(x.numel() // 2, device=device)  # a rank's part of it
    peer = 1 - rank

    def p2p():  # a round trip: each rank sends once and receives once
        for send_first in (rank == 0, rank != 0):
            dist.send(x, peer) if send_first else dist.recv(x, peer)

    return {"all_reduce": lambda: dist.all_reduce(x), "all_gather": lambda: dist.all_gather_single(x, half),
            "reduce_scatter": lambda: dist.reduce_scatter_single(half, x), "p2p": p2p}


def _rank(device: str) -> dict:
    """On each of two ranks at once, as a run's ranks share the machine: compute first (both ranks
    computing, each with one thread), then seconds per collective and size; rank 0's are returned."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    dist.barrier()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    op_s, op_backward_s = op_seconds(torch.ones(8, device=device))
    mesh = init_device_mesh(device, (2,))
    dtensor_op_s, dtensor_op_backward_s = op_seconds(distribute_tensor(torch.ones(8, device=device), mesh,
                                                                       [Replicate()]), count=100)
    curve = [[2.0 * m * n * k, matmul_flops(torch.float32, device, m, n, k)] for m, n, k in SHAPES_MK]
    compute = {"matmul_flops": {"fp32": matmul_flops(torch.float32, device),
                                "bf16": matmul_flops(torch.bfloat16, device)}, "matmul_curve": curve,
               "memory_Bps": memory_bandwidth(device), "op_s": op_s, "op_backward_s": op_backward_s,
               "dtensor_op_s": dtensor_op_s, "dtensor_op_backward_s": dtensor_op_backward_s}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times = _link_times(device, rank, SIZES, sync)
    dist.destroy_process_group()
    return {**compute, "times": times}


def _link_times(device: str, rank: int, sizes: list[int], sync=lambda: None, repeats: int = 5) -> dict:
    """Seconds of each collective at each size between the two ranks of the current group."""
    import torch.distributed as dist

    times: dict = {c: [] for c in COLLECTIVES}
    for size in sizes:
        for name, op in _ops(device, rank, size).items():
            dist.barrier()
            seconds = _best(lambda op=op: (op(), sync()), repeats)
            times[name].append(seconds / 2 if name == "p2p" else seconds)  # a round trip is two sends
    return times


TESTBED_SIZES = SIZES[:-1]  # up to 4 MiB: at 100 Mbit/s a 16 MiB message takes 1.3 s


def testbed_rank() -> None:
    """One host of `calibrate_testbed`: the collectives over the testbed's link; rank 0 prints them."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    times = _link_times("cpu", dist.get_rank(), TESTBED_SIZES, repeats=3)
    if dist.get_rank() == 0:
        print(json.dumps(times))
    dist.destroy_process_group()


def calibrate_testbed(rate: str, into: Calibration) -> Calibration:
    """`into` with the link between two testbed hosts at `rate` (network namespaces joined by
    tbf-limited links, testbed.py; needs root), measured as the loopback link is, as "testbed-<rate>"."""
    import json
    import subprocess
    import sys
    from dataclasses import replace

    from paratrain.testbed import RDZV_PORT, Testbed, TestbedError

    with Testbed(2, rate) as bed:
        env = {"WORLD_SIZE": "2", "MASTER_ADDR": bed.addrs[0], "MASTER_PORT": str(RDZV_PORT)}
        code = "from paratrain.planner.calibrate import testbed_rank; testbed_rank()"
        ranks = [bed.exec(i, [sys.executable, "-c", code], {**env, "RANK": str(i)}, stdout=subprocess.PIPE,
                          text=True) for i in range(2)]
        out = [r.communicate(timeout=600)[0] for r in ranks]
        if any(r.returncode for r in ranks):
            codes = [r.returncode for r in ranks]
            raise TestbedError(f"calibrate --testbed: the measurement failed (exit codes {codes})")
    times = json.loads(out[0])
    per = {c: list(fit(TESTBED_SIZES, times[c], *SHAPES[c])) for c in COLLECTIVES}
    return replace(into, links={**into.links, f"testbed-{rate}": per})


def fit(sizes: list[int], seconds: list[float], steps: float, wire: float) -> tuple[float, float]:
    """alpha, beta of T = steps x alpha + wire x S / beta, least squares (alpha >= 0)."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(seconds) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sum((x - mx) ** 2 for x in sizes)
    intercept = max(0.0, my - slope * mx)
    return intercept / steps, wire / slope if slope > 0 else float("inf")


# For two ranks (collectives.py): (steps, wire bytes per byte of S)
SHAPES = {"all_reduce": (2, 1.0), "all_gather": (1, 0.5), "reduce_scatter": (1, 0.5), "p2p": (1, 1.0)}


def calibrate(device: str = "cpu") -> Calibration:
    from paratrain.testing import run_ranks

    got = run_ranks(_rank, 2, device)[0]
    per = {c: list(fit(SIZES, got["times"][c], *SHAPES[c])) for c in COLLECTIVES}
    return Calibration(device=device, cores=os.cpu_count() or 1, matmul_flops=got["matmul_flops"],
                       matmul_curve=got["matmul_curve"],
                       memory_Bps=got["memory_Bps"], memory_bytes=_memory_bytes(device), op_s=got["op_s"],
                       op_backward_s=got["op_backward_s"], dtensor_op_s=got["dtensor_op_s"],
                       dtensor_op_backward_s=got["dtensor_op_backward_s"], links={"loopback": per},
                       measured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


def _memory_bytes(device: str) -> float:
    if device == "cuda":
        return float(torch.cuda.get_device_properties(0).total_memory)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return float(line.split()[1]) * 1024
    return 0.0


def save(cal: Calibration, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(cal.to_toml())
    os.replace(tmp, path)
    return path
