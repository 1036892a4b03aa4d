"""`paratrain calibrate`: measure this machine as the planner sees it, and store it as TOML.

What one rank achieves with one thread while another rank does the same (paratrain runs a rank
per core, one thread each):
- matmul FLOP/s per dtype (fp32, bf16) of a large square product, and in fp32 at the sizes of a
  small model's products (the rate at each size: `Device.rate` interpolates between them);
- memory bandwidth: a copy of a tensor far larger than the caches (read + write bytes / time);
- an operator's fixed cost, forward (recorded by autograd) and backward, on a tiny tensor, and the
  same through a DTensor (tensor parallelism dispatches every op of its layers through one);
- the built-in GPT's fixed cost under tensor parallelism on the two ranks, whatever its size: a
  tiny GPT of 1 and of 9 blocks split as paratrain splits it, forward and backward with the
  vocabulary-parallel loss, solved for seconds per block and for the ends (embeddings, head,
  loss). DTensor dispatches each of a split layer's operators, and converts and redistributes its
  inputs and outputs: several hundred dispatches a step that no single operator's cost predicts;
  the small all-reduces inside are part of it (cost.py charges their bytes on top);
- seconds per element, forward and backward, of the operators a CPU core spends its arithmetic on
  rather than memory (GeLU's erf, SiLU, tanh, layer norm, softmax; attention's softmax per score,
  past its products at the matmul rate): model.KINDS, on a megabyte of values;
- the cost of each action of a pipeline schedule beyond its compute (torch.distributed.pipelining's
  runtime: the schedule's loop, the stage's input and output handling, the zero-bubble schedules'
  split backward), per schedule: tiny stages, 8 micro-batches, on the two ranks, solved through
  the planner's own simulation of that schedule (schedule.py) with the sends' latency measured
  beside it;
- the built-in GPT's fixed cost under FSDP2 (zero2, zero3, and hybrid's replicated dp axis per
  micro-batch) on the two ranks, per block and at its ends, beyond the same GPT unsharded
  (framework.fsdp_seconds);
- what ZeroRedundancyOptimizer's step costs beyond AdamW on the rank's own share (its broadcasts
  of the updated parameters), per tensor and per byte, on two GPTs' parameters
  (framework.zero1_sync_seconds);
- whole forwards and backwards of two small built-in GPTs (wholestep.step_seconds), over what the
  figures above add up to for them: `compute_factor`, which cost.py scales every model's compute
  by, measured on batches of 8 and of 4 samples (`compute_curve`: cost.py takes the factor at a
  plan's micro-batch, whose smaller products this machine runs more slowly for their work than
  the parts' rates say); the same steps under DDP, whose surplus solves for DDP's cost per step and per gradient
  byte (`ddp`: cost.py charges it to ddp and ZeRO-1 in place of the link's all-reduce); the same
  steps under FSDP2 as zero2 and zero3 shard them, whose surplus beyond the fixed costs above
  solves for a factor on FSDP2's bytes (`fsdp_factor`: cost.py scales its collectives' bytes and
  the copies around them by it on the loopback link); and the
  first GPT under tensor parallelism, beyond the fixed costs above over what the planner adds up
  for the rest: `tp_factor`, which cost.py scales tensor parallelism's arithmetic and bytes by;
  and real two-stage pipelines of it (1F1B at 2 and 8 micro-batches, GPipe at 8) over the
  planner's simulation of the same: `pp_factor`, which cost.py scales a pipeline stage's compute
  by, and each schedule's cost per message between stages (`pipeline_send`), which it adds to
  every send;
- the update as the trainer runs it after backward (gradient clipping, the non-finite check's
  norms, eager AdamW, zero_grad) on many small and on few large parameters (64 MiB of state, more
  than the caches hold), solved for seconds per tensor and per parameter; the same with DTensor
  parameters (FSDP2 and tensor parallelism step on them: each operator goes through DTensor's
  dispatch);
- with twice as many ranks as cores, how much longer a message takes to reach a rank that waits
  for it (the scheduler gives the woken rank a core only later: framework.wake_seconds; machines
  of up to 8 cores); `plan` adds it to every point-to-point message where a run's computing ranks
  outnumber the cores;
- per collective (all-reduce, all-gather, reduce-scatter, broadcast, point-to-point), the link's
  alpha and beta between two local ranks over gloo on the loopback interface: times over message
  sizes from 16 KiB to 16 MiB, fitted by least squares to T(S) = steps x alpha + wire bytes(S) /
  beta with the ring's steps and wire bytes for two ranks (collectives.py), so that `plan`
  predicts those collectives with the same formulas it fitted. With `device = "cuda"`: the same on the GPU, with NCCL.
Each figure is the median of `--repeats` timings (9; fewer: sooner and noisier).
The framework's own costs (tensor parallelism's, the pipeline runtime's) are measured in
framework.py. Written by hand: torch has no calibration of its own; the timing is torch's collectives themselves.
"""
from __future__ import annotations

import itertools
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from paratrain.planner.hardware import Calibration

SIZES = [2**k for k in range(14, 25, 2)]  # 16 KiB .. 16 MiB
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p")


REPEATS = 9  # timings per figure (`paratrain calibrate --repeats`)


def timings(fn, repeats: int | None = None, before=None) -> list[float]:
    """`repeats` (default REPEATS) timings of `fn()` after one warm-up; `before()`: run untimed
    before each (`evict`)."""
    fn()
    times = []
    for _ in range(repeats or REPEATS):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _median(fn, repeats: int | None = None, before=None) -> float:
    """The median of `timings`. The planner predicts a run's mean step, so each figure is a typical
    call, not the best one: on this machine a collective's median is 1.5 to 2 times its best, with
    the caches and cores shared as in a step. (A whole step is the mean of its timings:
    wholestep.step_seconds.)"""
    times = sorted(timings(fn, repeats, before))
    return times[len(times) // 2]


def matmul_flops(dtype: torch.dtype, device: str = "cpu", m: int = 1024, n: int = 1024, k: int = 1024) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)

    def run():
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * m * n * k / _median(run)


def linear_flops(m: int, n: int, k: int, fixed_s: float = 0.0, device: str = "cpu") -> float:
    """FLOP/s of a linear layer's three products as training runs them: forward (m x k by k x n),
    then backward's input and weight gradients (its operands transposed), through autograd. A CPU
    runs backward's products well below a plain forward product of the same size (seen: 95-110
    GFLOP/s against 155 for the small GPT's shapes on one core), so timing `torch.mm` alone made
    every step look a third faster than it ran. `fixed_s`: the operators' fixed costs inside
    (one forward, one backward), charged apart by cost.py, taken off."""
    x = torch.randn(m, k, device=device, requires_grad=True)
    w = torch.randn(n, k, device=device, requires_grad=True)
    grad = torch.randn(m, n, device=device)

    def run():
        x.grad = w.grad = None
        torch.nn.functional.linear(x, w).backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()

    # each a millisecond or less: three times the timings, whose median moved by a fifth at 9 (seen)
    return 6 * m * n * k / max(_median(run, 3 * REPEATS) - fixed_s, 1e-9)


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

    return 2 * nbytes / _median(run)


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

    fwd = _median(forward)
    return fwd / count, max(0.0, _median(both) - fwd) / count


KIND_INPUTS = {  # kind -> (its function, input shape): 256 Ki values, rows of the widths small models use
    "gelu": (torch.nn.functional.gelu, (512, 512)),
    "silu": (torch.nn.functional.silu, (512, 512)),
    "tanh": (torch.tanh, (512, 512)),
    "sigmoid": (torch.sigmoid, (512, 512)),
    "layer_norm": (lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:]), (2048, 128)),
    "softmax": (lambda x: torch.log_softmax(x, -1), (2048, 128)),
}


def kind_seconds(curve: list, device: str = "cpu") -> dict:
    """kind -> [forward, backward] seconds per element (attention: per score, its products' FLOPs
    at `curve`'s rate (the matmul rates just measured) taken off, as cost.py charges them). Each
    call on the next of several inputs, 32 MiB in all: in training an activation comes from memory,
    not from the cache the same input stays in when timed over and over (seen: GeLU at 0.55 ns an
    element on one input, 0.95 ns going round 64 of them)."""
    from paratrain.planner.hardware import _interpolate

    out = {}
    for kind, (fn, shape) in KIND_INPUTS.items():
        x = _rotating(lambda shape=shape: torch.randn(*shape, device=device, requires_grad=True))
        grad = torch.ones(*shape, device=device)
        fwd = _median(lambda fn=fn, x=x: fn(x()))
        both = _median(lambda fn=fn, x=x, grad=grad: fn(x()).backward(grad))
        numel = grad.numel()
        out[kind] = [fwd / numel, max(0.0, both - fwd) / numel]
    b, h, s, d = 8, 4, 128, 32
    qkv = _rotating(lambda: [torch.randn(b, h, s, d, device=device, requires_grad=True) for _ in range(3)])
    flops = 4 * b * h * s * s * d  # QK^T and the product with V
    products = flops / _interpolate(curve, flops)

    def attend():
        return torch.nn.functional.scaled_dot_product_attention(*qkv(), is_causal=True)

    fwd = _median(attend)
    both = _median(lambda: attend().sum().backward())
    scores = b * h * s * s
    out["attention"] = [max(0.0, fwd - products) / scores, max(0.0, both - fwd - 2 * products) / scores]
    return out


def _rotating(make, nbytes: int = 32 * 2**20):
    """A function that returns the next of as many of `make()`'s tensors as fill `nbytes`."""
    first = make()
    size = sum(t.numel() * t.element_size() for t in (first if isinstance(first, list) else [first]))
    items = [first] + [make() for _ in range(max(0, nbytes // size - 1))]
    turn = itertools.count()
    return lambda: items[next(turn) % len(items)]


def _ops(device: str, rank: int, size: int) -> dict:
    """The collectives on `size` bytes, as paratrain's strategies call them (FSDP2 gathers and
    reduce-scatters into flat tensors; ZeroRedundancyOptimizer broadcasts each updated parameter
    from its owner; pipelines send and receive)."""
    import torch.distributed as dist

    x = torch.ones(size // 4, device=device)  # `size` bytes: the whole tensor of each collective
    half = torch.empty(x.numel() // 2, device=device)  # a rank's part of it
    peer = 1 - rank

    def p2p():  # a round trip: each rank sends once and receives once
        for send_first in (rank == 0, rank != 0):
            dist.send(x, peer) if send_first else dist.recv(x, peer)

    return {"all_reduce": lambda: dist.all_reduce(x), "all_gather": lambda: dist.all_gather_single(x, half),
            "reduce_scatter": lambda: dist.reduce_scatter_single(half, x),
            "broadcast": lambda: dist.broadcast(x, 0), "p2p": p2p}


def _rank(device: str, repeats: int = REPEATS) -> dict:
    """On each of two ranks at once, as a run's ranks share the machine: compute first (both ranks
    computing, each with one thread), then seconds per collective and size; rank 0's are returned."""
    import torch.distributed as dist

    global REPEATS
    REPEATS = repeats  # this process is a rank of its own: the caller's setting comes as an argument
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    dist.barrier()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    op_s, op_backward_s = op_seconds(torch.ones(8, device=device))
    mesh = init_device_mesh(device, (2,))
    dtensor_op_s, dtensor_op_backward_s = op_seconds(distribute_tensor(torch.ones(8, device=device), mesh,
                                                                       [Replicate()]), count=100)
    from paratrain.planner import framework as fw
    from paratrain.planner import wholestep as ws

    step_s = ws.step_seconds(device)
    tensor_parallel = fw.tensor_parallel_seconds(mesh, device)
    tp_step_s = ws.tensor_parallel_step_seconds(mesh, device)
    pp_step_s = ws.pipeline_gpt_seconds(device)
    fsdp = fw.fsdp_seconds(mesh, device)
    pipeline_steps = fw.pipeline_step_seconds(device)
    split_backward = fw.split_backward_seconds(device)
    if device == "cpu":  # a product's rate by size, as forward and backward run it together
        curve = [[2.0 * m * n * k, linear_flops(m, n, k, op_s + op_backward_s)] for m, n, k in SHAPES_MK]
    else:
        curve = [[2.0 * m * n * k, matmul_flops(torch.float32, device, m, n, k)] for m, n, k in SHAPES_MK]
    plain = fw.update_seconds(lambda shapes: [torch.nn.Parameter(torch.zeros(n, device=device)) for n in shapes])
    dtensor = fw.update_seconds(lambda shapes: [
        torch.nn.Parameter(distribute_tensor(torch.zeros(n, device=device), mesh, [Shard(0)])) for n in shapes])
    compute = {"kinds": kind_seconds(curve, device), "update": plain, "dtensor_update": dtensor,
               "matmul_flops": {"fp32": matmul_flops(torch.float32, device),
                                "bf16": matmul_flops(torch.bfloat16, device)}, "matmul_curve": curve,
               "memory_Bps": memory_bandwidth(device), "op_s": op_s, "op_backward_s": op_backward_s,
               "dtensor_op_s": dtensor_op_s, "dtensor_op_backward_s": dtensor_op_backward_s,
               "tensor_parallel": tensor_parallel, "pipeline_steps": pipeline_steps,
               "split_backward": split_backward, "step_s": step_s, "tp_step_s": tp_step_s, "pp_step_s": pp_step_s,
               "zero1_sync": fw.zero1_sync_seconds(device),
               "fsdp": fsdp}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times = _link_times(device, rank, SIZES, sync)
    dist.destroy_process_group()
    return {**compute, "times": times}


def _link_times(device: str, rank: int, sizes: list[int], sync=lambda: None, repeats: int | None = None) -> dict:
    """Seconds of each collective at each size between the two ranks of the current group."""
    import torch.distributed as dist

    times: dict = {c: [] for c in COLLECTIVES}
    for size in sizes:
        for name, op in _ops(device, rank, size).items():
            dist.barrier()
            seconds = _median(lambda op=op: (op(), sync()), repeats)
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
SHAPES = {"all_reduce": (2, 1.0), "all_gather": (1, 0.5), "reduce_scatter": (1, 0.5), "broadcast": (1, 1.0),
          "p2p": (1, 1.0)}


def calibrate(device: str = "cpu", repeats: int = REPEATS) -> Calibration:
    from paratrain.planner import framework as fw
    from paratrain.planner import wholestep as ws
    from paratrain.testing import run_ranks

    got = run_ranks(_rank, 2, device, repeats)[0]
    per = {c: list(fit(SIZES, got["times"][c], *SHAPES[c])) for c in COLLECTIVES}
    cal = Calibration(device=device, cores=os.cpu_count() or 1, matmul_flops=got["matmul_flops"],
                       matmul_curve=got["matmul_curve"],
                       memory_Bps=got["memory_Bps"], memory_bytes=_memory_bytes(device), op_s=got["op_s"],
                       op_backward_s=got["op_backward_s"], dtensor_op_s=got["dtensor_op_s"],
                       dtensor_op_backward_s=got["dtensor_op_backward_s"], kinds=got["kinds"],
                       update=got["update"], dtensor_update=got["dtensor_update"],
                       tensor_parallel=got["tensor_parallel"], split_backward=got["split_backward"],
                       zero1_sync=got["zero1_sync"], fsdp=got["fsdp"],
                       wake_s=fw.wake_seconds(os.cpu_count() or 1, repeats) if device == "cpu" else 0.0,
                       pipeline_action=fw.pipeline_action_seconds(got["pipeline_steps"]),
                       links={"loopback": per},
                       measured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return ws.solve(cal, got) if device == "cpu" else cal


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
