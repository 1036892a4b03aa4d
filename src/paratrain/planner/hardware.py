"""What a device computes and moves per second: presets with their sources, or this machine calibrated.

A `Device` is one accelerator (or one CPU rank): its achieved matmul FLOP/s per dtype, the FLOP/s
of other (elementwise) work, its memory and memory bandwidth. A `Link` is alpha (seconds per
message step) and beta (bytes per second each way) between two devices. A `Cluster` places N
devices on nodes of `per_node`, with one link inside a node and another between nodes.

Achieved, not datasheet, throughput is what a step takes: the presets carry each datasheet peak
(for MFU) and published measurements of what the device and its links achieve (matmul, memory
copy, NCCL bus bandwidth), each with its source below. Nothing here is fitted to a training run's
published time. This machine's figures come from
`paratrain calibrate` (calibrate.py), stored as TOML.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Link:
    alpha_s: float  # seconds per message step (latency)
    beta_Bps: float  # bytes per second, each way, per device
    name: str = ""
    # (collective, alpha_s, beta_Bps) where a collective was measured apart (calibrate.py): gloo's
    # all-gather, reduce-scatter and point-to-point each reach their own bandwidth
    per: tuple = ()
    # A point-to-point message's wait for its receiver to get a core back, where more ranks compute
    # than there are cores (Calibration.wake_s; 0 elsewhere): a pipeline stage waiting for its input
    # has given its core away. The ranks of a collective compute the same work and arrive together.
    wake_s: float = 0.0

    def ab(self, collective: str) -> tuple[float, float]:
        """(alpha, beta) for this collective."""
        alpha, beta = next(((a, b) for c, a, b in self.per if c == collective), (self.alpha_s, self.beta_Bps))
        return alpha + (self.wake_s if collective == "p2p" else 0.0), beta


@dataclass(frozen=True)
class Device:
    name: str
    matmul_flops: dict  # dtype -> achieved FLOP/s of large matmuls
    peak_flops: dict  # dtype -> datasheet peak (for MFU)
    memory_bytes: float
    memory_Bps: float  # achieved memory bandwidth (elementwise work is bound by it)
    source: str = ""
    sms: int = 0  # streaming multiprocessors (GPU): matmul tiles run in waves of this many; 0: no waves
    matmul_curve: tuple = ()  # ((FLOPs of a product, FLOP/s), ...): calibrated fp32 rates by size
    # Seconds each operator costs whatever its size, forward and backward: eager PyTorch's dispatch
    # and autograd on a CPU, plain and through a DTensor (calibrated); on the GPU presets 0, their
    # kernels being large enough that launches hide behind them.
    op_s: float = 0.0
    op_backward_s: float = 0.0
    dtensor_op_s: float = 0.0
    dtensor_op_backward_s: float = 0.0
    # Calibrated CPU only: seconds per element of the operators whose arithmetic, not their bytes,
    # sets their time (model.KINDS): kind -> (forward, backward); attention's per score.
    kind_s: dict = field(default_factory=dict)
    # The update after backward as the trainer runs it (gradient clipping, the non-finite check's
    # norms, eager AdamW): (seconds per parameter tensor, per parameter), plain and with
    # DTensor parameters (FSDP2, tensor parallelism). (0, 0): memory-bound (cost.ADAM_BYTES).
    update_s: tuple = (0.0, 0.0)
    dtensor_update_s: tuple = (0.0, 0.0)
    # Calibrated CPU only: the built-in GPT's fixed cost under tensor parallelism on 2 ranks
    # (calibrate.tensor_parallel_seconds): (ends forward, ends backward, per block forward, backward),
    # the latency of the small all-reduces inside included. (): counted per operator (dtensor_op_s).
    tp_fixed_s: tuple = ()
    # Calibrated CPU only: schedule -> seconds each pipeline action costs beyond its compute
    # (calibrate.pipeline_action_seconds); absent: none.
    pipeline_action_s: dict = field(default_factory=dict)
    # Calibrated CPU only: a zero-bubble schedule's backward split in two, beyond one whole backward
    # (calibrate.split_backward_seconds): (seconds per block, share of the backward); (): none.
    split_backward_s: tuple = ()
    # Calibrated CPU only: a whole model's forward and backward over what its calibrated parts add
    # up to (wholestep.compute_factor); cost.py scales compute by it
    compute_factor: float = 1.0
    # Calibrated CPU only: ((tokens in a forward, compute_factor), ...): the same at two sizes of a
    # forward (wholestep.compute_curve); (): compute_factor whatever the size
    compute_curve: tuple = ()
    # Calibrated CPU only: the same under tensor parallelism, for what its fixed costs (tp_fixed_s)
    # leave: arithmetic, bytes and the all-reduces' bytes (wholestep.tp_factor)
    tp_factor: float = 1.0
    # Calibrated CPU only: a pipeline stage's forward and backward as a real pipeline runs them over
    # the planner's simulation of it (wholestep.pp_factor)
    pp_factor: float = 1.0
    # Calibrated CPU only: schedule -> seconds each message between pipeline stages costs beyond the
    # link's latency and bytes, as a real pipeline's step pays it (wholestep.pipeline_costs); a
    # schedule not measured pays 1F1B's
    pipeline_send_s: dict = field(default_factory=dict)
    # Calibrated CPU only: what DDP's gradient all-reduce adds to a forward and backward
    # (wholestep.ddp_cost): (seconds a step, per gradient byte); (): the link's all-reduce
    ddp_s: tuple = ()
    # Calibrated CPU only: what ZeroRedundancyOptimizer's step costs beyond AdamW on the rank's share,
    # its broadcasts of the updated parameters (framework.zero1_sync_seconds): (seconds per tensor,
    # per byte); (): a broadcast per tensor at the link's figures
    zero1_sync_s: tuple = ()
    # Calibrated CPU only: the built-in GPT's fixed cost of a forward and backward under FSDP2
    # (framework.fsdp_seconds): "zero2"/"zero3" -> (ends, per block), collectives' start-up included;
    # "replicate" (hybrid's dp axis) -> (ends, per block, each further micro-batch's ends, per block)
    fsdp_fixed_s: dict = field(default_factory=dict)
    # Calibrated only: what whole steps under FSDP2 pay for its bytes (the collectives' and the copies
    # around them) over what cost.py adds up from the link, on the link it was measured on
    # (wholestep.fsdp_factors): "zero2"/"zero3" -> factor; missing: 1
    fsdp_factor: dict = field(default_factory=dict)

    def matmul_efficiency(self, m: float, n: float) -> float:
        """The share of the achieved matmul rate an (m x n) output gets under wave quantization:
        cuBLAS computes it in 256 x 128 tiles, one per SM at a time, so the last wave may run part
        empty (NVIDIA, "Matrix Multiplication Background User's Guide", §3.2 Wave Quantization).
        MAMF's best shape fills its waves, so the two multiply."""
        if not self.sms:
            return 1.0
        tiles = math.ceil(m / 256) * math.ceil(n / 128)
        return tiles / (math.ceil(tiles / self.sms) * self.sms)

    def factor(self, tokens: float) -> float:
        """`compute_factor` for a forward of `tokens` tokens (a micro-batch's)."""
        return _interpolate(self.compute_curve, tokens) if self.compute_curve and tokens else self.compute_factor

    def flops(self, dtype: str) -> float:
        return self.matmul_flops.get(dtype) or self.matmul_flops["fp32"]

    def rate(self, work: float, dtype: str, rows: float = 0, cols: float = 0) -> float:
        """FLOP/s of one matrix product of `work` FLOPs with a rows x cols output: on a calibrated CPU
        the measured rate at that size (small products run far below large ones), interpolated in
        log(work); on a GPU the achieved rate under wave quantization."""
        base = self.flops(dtype)
        if self.matmul_curve and dtype == "fp32":
            base = _interpolate(self.matmul_curve, work)
        return base * (self.matmul_efficiency(rows, cols) if rows and cols else 1.0)

    def peak(self, dtype: str) -> float:
        return self.peak_flops.get(dtype) or self.flops(dtype)


def _interpolate(curve: tuple, work: float) -> float:
    """Piecewise linear in log(work) between measured points; the ends held flat."""
    points = sorted(curve)
    if work <= points[0][0]:
        return points[0][1]
    for (w0, r0), (w1, r1) in zip(points, points[1:]):
        if work <= w1:
            t = (math.log(work) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return r0 + t * (r1 - r0)
    return points[-1][1]


@dataclass(frozen=True)
class Cluster:
    device: Device
    devices: int
    per_node: int  # devices per node (sharing the fast link)
    intra: Link  # within a node
    inter: Link  # between nodes, per device
    price_per_hour: float = 0.0  # per device, for cost sweeps
    # How much of a collective the device hides behind its own compute: a GPU moves bytes on its
    # copy engines and NICs while its SMs compute (1); a CPU whose cores all compute moves them on
    # one of those cores (gloo), so nothing is hidden (0; the README's pipeline measurements).
    overlap: float = 1.0

    @property
    def nodes(self) -> int:
        return -(-self.devices // self.per_node)

    def link(self, span: int) -> Link:
        """The slowest link a group of `span` consecutive devices crosses."""
        return self.intra if span <= self.per_node else self.inter

    def with_devices(self, n: int) -> "Cluster":
        return replace(self, devices=n)


# ---------------------------------------------------------------------------- presets
# Every figure is a datasheet peak or a published measurement, with its source; none is fitted to a
# training run's published time.
# Datasheet peaks (dense, no sparsity): NVIDIA A100 datasheet and Ampere architecture whitepaper
# (A100 SXM4: bf16/fp16 tensor 312 TFLOP/s, tf32 156, fp32 19.5; 40 GB HBM2 at 1,555 GB/s, 80 GB
# HBM2e at 2,039 GB/s); NVIDIA H100 page and Hopper whitepaper (H100 SXM5: bf16 989 TFLOP/s, tf32
# 494.7, fp32 67; 80 GB HBM3 at 3.35 TB/s); NVIDIA H200 page (the H100 SXM's compute, 141 GB HBM3e at
# 4.8 TB/s).
# Achieved matmul (MAMF, the best large bf16 matmul; github.com/stas00/ml-engineering,
# compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS comparison table"): A100 SXM
# 267.9 TFLOP/s, H100 SXM 792.1; the H200's compute is the H100's, so its MAMF is taken as the
# H100's (the same page's H100/H200 row: 794.5).
# Achieved memory bandwidth (BabelStream Triad, Azure/AI-benchmarking-guide, Azure_Results/
# ND_A100_v4_results.md and ND_H100_v5_results.md, "HBM Bandwidth"): A100 80GB 1.70 TB/s (83% of
# 2,039), H100 2.97 TB/s (89% of 3.35); the A100 40GB and the H200 at those same fractions.
# NVLink (inside a node), NCCL all-reduce bus bandwidth for large messages (nccl-tests busbw =
# algbw x 2(n-1)/n, the ring's bytes per device over time, i.e. our beta): 8x A100 about 230 GB/s
# (NCCL lead in NVIDIA/nccl-tests#149; 234.89 GB/s at 16 GiB in ml-engineering network/README.md);
# 8x H100 about 370 GB/s with the ring (NVIDIA/nccl-tests#212, NVIDIA/nccl#1442; 367.61 on H200 in
# ml-engineering). InfiniBand, per GPU: DGX A100 (8x 200 Gb/s HDR) 192 GB/s all-reduce bus bandwidth
# per node across nodes, 24 GB/s a GPU (NVIDIA, NVIDIA/nccl#812); DGX H100 (8x 400 Gb/s NDR) 48 GB/s
# per NIC (NVIDIA, NVIDIA/nccl-tests#267).
# Link alpha, per ring step: NCCL's own cost model (NVIDIA/nccl src/graph/tuning.cc, ring, Simple
# protocol: 3.4 us per step over NVLink, 14 us over the network; a model constant, not a measurement).
TF = 1e12
NVLINK_ALPHA, NET_ALPHA = 3.4e-6, 14e-6


def _gpu(name, peak_bf16, mamf_bf16, tf32, fp32, mem_gb, mem_GBps, mem_fraction, sms, source):
    fraction = mamf_bf16 / peak_bf16  # tf32 and fp32 matmuls: the same share of their peak (none published)
    return Device(name, {"bf16": mamf_bf16 * TF, "fp16": mamf_bf16 * TF, "tf32": tf32 * fraction * TF,
                         "fp32": fp32 * fraction * TF},
                  {"bf16": peak_bf16 * TF, "fp16": peak_bf16 * TF, "tf32": tf32 * TF, "fp32": fp32 * TF},
                  mem_gb * GB, mem_GBps * GB * mem_fraction, source, sms)


# SMs: A100 108 (Ampere whitepaper; the same guide's wave-quantization example), H100 SXM 132 (Hopper whitepaper).
DEVICES = {
    "a100-40gb": _gpu("a100-40gb", 312, 267.9, 156, 19.5, 40, 1555, 0.83, 108, "A100 SXM4 40GB"),
    "a100-80gb": _gpu("a100-80gb", 312, 267.9, 156, 19.5, 80, 2039, 0.83, 108, "A100 SXM4 80GB"),
    "h100": _gpu("h100", 989, 792.1, 494.7, 67, 80, 3350, 0.89, 132, "H100 SXM5 80GB"),
    "h200": _gpu("h200", 989, 792.1, 494.7, 67, 141, 4800, 0.89, 132, "H200 SXM 141GB"),
}
ALIASES = {"a100": "a100-80gb", "a100-80": "a100-80gb", "a100-40": "a100-40gb", "h100-80gb": "h100",
           "h200-141gb": "h200"}
NVLINK_GBps = {"a100-40gb": 230, "a100-80gb": 230, "h100": 370, "h200": 370}  # all-reduce bus bandwidth
IB_GBps = {"a100-40gb": 24, "a100-80gb": 24, "h100": 48, "h200": 48}  # per GPU, across nodes
PER_NODE = 8  # DGX / HGX: 8 GPUs on one NVSwitch


def preset(name: str, devices: int, per_node: int = PER_NODE, price_per_hour: float = 0.0) -> Cluster:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DEVICES:
        raise ValueError(f"device {name!r}: must be one of {', '.join(sorted(DEVICES))}")
    intra = Link(NVLINK_ALPHA, NVLINK_GBps[key] * GB, "NVLink")
    inter = Link(NET_ALPHA, IB_GBps[key] * GB, "InfiniBand")
    return Cluster(DEVICES[key], devices, min(per_node, devices), intra, inter, price_per_hour)


# ---------------------------------------------------------------------------- this machine


def _floats(values) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in values) + "]"


def calibration_path() -> Path:
    """Where `paratrain calibrate` writes and `plan` reads ($PARATRAIN_CALIBRATION overrides)."""
    if env := os.environ.get("PARATRAIN_CALIBRATION"):
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "paratrain" / "machine.toml"


@dataclass(frozen=True)
class Calibration:
    """This machine as `paratrain calibrate` measured it (one rank's share of it)."""
    device: str = "cpu"
    cores: int = 1
    matmul_flops: dict = field(default_factory=dict)  # dtype -> FLOP/s, one rank (one thread)
    matmul_curve: list = field(default_factory=list)  # [[FLOPs of a product, FLOP/s], ...] fp32, by size
    memory_Bps: float = 0.0
    memory_bytes: float = 0.0
    op_s: float = 0.0  # one small operator, forward (recorded by autograd), and its backward
    op_backward_s: float = 0.0
    dtensor_op_s: float = 0.0  # the same through a DTensor
    dtensor_op_backward_s: float = 0.0
    kinds: dict = field(default_factory=dict)  # kind -> [forward, backward] seconds per element
    update: list = field(default_factory=list)  # [seconds per parameter tensor, per parameter]
    dtensor_update: list = field(default_factory=list)
    tensor_parallel: list = field(default_factory=list)  # [ends fwd, ends bwd, block fwd, block bwd] seconds
    pipeline_action: dict = field(default_factory=dict)  # schedule -> seconds per action beyond compute
    split_backward: list = field(default_factory=list)  # [seconds per block, share of the backward]
    compute_factor: float = 1.0  # a whole forward and backward over its calibrated parts (wholestep.py)
    compute_curve: list = field(default_factory=list)  # [[tokens in a forward, compute_factor], ...]
    tp_factor: float = 1.0  # the same under tensor parallelism, beyond its fixed costs (framework.py)
    pp_factor: float = 1.0  # a pipeline's stages, as a real pipeline runs them (wholestep.py)
    pipeline_send: dict = field(default_factory=dict)  # schedule -> seconds per send beyond the link's
    zero1_sync: list = field(default_factory=list)  # ZeRO-1's step beyond AdamW's: [per tensor, per byte]
    ddp: list = field(default_factory=list)  # DDP's all-reduce in a step: [seconds, per gradient byte]
    fsdp: dict = field(default_factory=dict)  # "zero2"/"zero3"/"replicate" -> seconds (framework.fsdp_seconds)
    fsdp_factor: dict = field(default_factory=dict)  # "zero2"/"zero3" -> whole steps' bytes over cost.py's
    wake_s: float = 0.0  # a message's wait for its receiver's core, more ranks than cores (framework.py)
    # link name -> {collective -> [alpha_s, beta_Bps]}: "loopback" measured between local ranks
    links: dict = field(default_factory=dict)
    measured_at: str = ""

    def to_toml(self) -> str:
        lines = ["# paratrain calibrate: this machine as measured (one rank per core, one thread each)",
                 f'device = "{self.device}"', f"cores = {self.cores}", f"memory_Bps = {self.memory_Bps:.6g}",
                 f"memory_bytes = {self.memory_bytes:.6g}", f"op_s = {self.op_s:.6g}",
                 f"op_backward_s = {self.op_backward_s:.6g}", f"dtensor_op_s = {self.dtensor_op_s:.6g}",
                 f"dtensor_op_backward_s = {self.dtensor_op_backward_s:.6g}",
                 f"compute_factor = {self.compute_factor:.6g}", f"tp_factor = {self.tp_factor:.6g}",
                 f"pp_factor = {self.pp_factor:.6g}", f"wake_s = {self.wake_s:.6g}",
                 f'measured_at = "{self.measured_at}"', "",
                 "[matmul_flops]"]
        lines += [f"{k} = {v:.6g}" for k, v in self.matmul_flops.items()]
        lines[lines.index("[matmul_flops]"):lines.index("[matmul_flops]")] = [
            "matmul_curve = [" + ", ".join(f"[{w:.6g}, {r:.6g}]" for w, r in self.matmul_curve) + "]",
            *(["compute_curve = [" + ", ".join(f"[{t:.6g}, {f:.6g}]" for t, f in self.compute_curve) + "]"]
              if self.compute_curve else []),
            *[f"{name} = [{v[0]:.6g}, {v[1]:.6g}]"
              for name, v in (("update", self.update), ("dtensor_update", self.dtensor_update)) if v],
            *([f"tensor_parallel = {_floats(self.tensor_parallel)}"] if self.tensor_parallel else []),
            *([f"split_backward = [{self.split_backward[0]:.6g}, {self.split_backward[1]:.6g}]"]
              if self.split_backward else []),
            *([f"zero1_sync = {_floats(self.zero1_sync)}"] if self.zero1_sync else []),
            *([f"ddp = {_floats(self.ddp)}"] if self.ddp else []), ""]
        if self.kinds:
            lines += ["", "[kinds]"] + [f"{k} = [{f:.6g}, {b:.6g}]" for k, (f, b) in self.kinds.items()]
        if self.fsdp:
            lines += ["", "[fsdp]"] + [f"{k} = {_floats(v)}" for k, v in self.fsdp.items()]
        if self.pipeline_action:
            lines += ["", "[pipeline_action]"] + [f"{k} = {v:.6g}" for k, v in self.pipeline_action.items()]
        if self.pipeline_send:
            lines += ["", "[pipeline_send]"] + [f"{k} = {v:.6g}" for k, v in self.pipeline_send.items()]
        if self.fsdp_factor:
            lines += ["", "[fsdp_factor]"] + [f"{k} = {v:.6g}" for k, v in self.fsdp_factor.items()]
        for link, per in self.links.items():
            lines += ["", f"[links.{link}]"]
            lines += [f"{c} = [{a:.6g}, {b:.6g}]" for c, (a, b) in per.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        raw = tomllib.loads(path.read_text())
        return cls(**{k: raw[k] for k in asdict(cls()) if k in raw})

    def link(self, name: str = "loopback") -> Link:
        per = self.links.get(name, {})
        alpha, beta = per.get("all_reduce") or next(iter(per.values()), (1e-4, 1e9))
        return Link(alpha, beta, name, tuple((c, a, b) for c, (a, b) in per.items()))

    def cluster(self, devices: int, link: str = "loopback", computing: int | None = None) -> Cluster:
        # More ranks than cores share them: each computes (and dispatches) at cores / ranks of the
        # rate one rank per core was measured at. `computing`: the ranks that do (a parameter
        # server's servers wait on their workers' messages most of a step).
        share = min(1.0, self.cores / (computing or devices)) if self.device == "cpu" else 1.0
        flops = {k: v * share for k, v in self.matmul_flops.items()}
        device = Device(f"{self.device} (calibrated)", flops, flops, self.memory_bytes / max(1, devices),
                        self.memory_Bps * share, f"paratrain calibrate, {self.measured_at}",
                        matmul_curve=tuple((w, r * share) for w, r in self.matmul_curve),
                        op_s=self.op_s / share, op_backward_s=self.op_backward_s / share,
                        dtensor_op_s=self.dtensor_op_s / share,
                        dtensor_op_backward_s=self.dtensor_op_backward_s / share,
                        kind_s={k: (f / share, b / share) for k, (f, b) in self.kinds.items()},
                        update_s=tuple(x / share for x in self.update) if self.update else (0.0, 0.0),
                        dtensor_update_s=(tuple(x / share for x in self.dtensor_update) if self.dtensor_update
                                          else (0.0, 0.0)),
                        tp_fixed_s=tuple(x / share for x in self.tensor_parallel),
                        pipeline_action_s={k: v / share for k, v in self.pipeline_action.items()},
                        split_backward_s=((self.split_backward[0] / share, self.split_backward[1])
                                          if self.split_backward else ()),
                        compute_factor=self.compute_factor, tp_factor=self.tp_factor,
                        compute_curve=tuple(tuple(p) for p in self.compute_curve),
                        pp_factor=self.pp_factor,
                        # a message's wait for gloo's thread to get a core: where ranks outnumber the
                        # cores, the link's wake_s, measured so, takes it in
                        pipeline_send_s=dict(self.pipeline_send) if share == 1.0 else {},
                        zero1_sync_s=tuple(x / share for x in self.zero1_sync),
                        ddp_s=tuple(x / share for x in self.ddp),
                        fsdp_fixed_s={k: tuple(x / share for x in v) for k, v in self.fsdp.items()},
                        fsdp_factor=dict(self.fsdp_factor))
        net = self.link(link)
        if share < 1.0:  # a rank that waits for a message has given its core away: it runs again later
            net = replace(net, wake_s=self.wake_s)
        return Cluster(device, devices, devices, net, net, overlap=1.0 if self.device == "cuda" else 0.0)
