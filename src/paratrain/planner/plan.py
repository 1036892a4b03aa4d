"""A plan, and what the planner predicts for it.

A `Plan` is a layout (dp x pp x tp), micro-batches and schedule, ZeRO stage on the dp axis,
activation recomputation and dtype, or an asynchronous family (local SGD, DiLoCo, parameter
server) with its sync period and codec; it names the paratrain strategy that runs it and the
`--set` assignments that do. An `Estimate` is cost.py's prediction for it: step time and its
parts, memory per device, throughput, MFU, bytes sent and staleness.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    microbatches: int = 1  # per data-parallel rank and step (pp = 1: gradient accumulation)
    schedule: str = "none"  # gpipe, 1f1b, interleaved_1f1b, interleaved_zb, zbv (pp > 1)
    virtual: int = 1  # stages per rank
    zero: int = 0  # ZeRO stage on the dp axis: 0 replicate (ddp), 1, 2, 3
    recompute: str = "none"  # none, selective, full
    sequence_parallel: bool = False
    dtype: str = "fp32"  # fp32, or bf16 (mixed precision: fp32 master weights and moments)
    # Megatron-LM's scatter-gather pipeline sends: each tensor-parallel rank sends 1/tp of the
    # activation and the next stage all-gathers it over NVLink (paratrain's hybrid sends it whole)
    p2p_scatter: bool = False
    # Megatron-LM's sequence parallelism keeps each split linear's input sharded (its memory saving)
    # and all-gathers it again in backward for the weight gradient (Korthikanti et al. 2022, 4.2.2;
    # its LinearWithGradAccumulationAndAsyncCommunication); torch's DTensor SequenceParallel, which
    # paratrain's tensor strategy uses, keeps the gathered input instead
    sp_regather: bool = False
    family: str = "sync"  # sync, local_sgd, diloco, parameter_server
    sync_every: int = 1  # local SGD / DiLoCo: H
    codec: str = "none"
    servers: int = 0  # parameter server
    mode: str = "bsp"  # parameter server: bsp, asp, ssp

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.tp + self.servers

    def strategy(self) -> str:
        """paratrain's strategy.name for this plan."""
        if self.family != "sync":
            return self.family
        axes = sum(n > 1 for n in (self.dp, self.pp, self.tp))
        if axes > 1:
            return "hybrid"
        if self.pp > 1:
            return "model_parallel" if self.microbatches == 1 and self.schedule == "gpipe" else "pipeline"
        if self.tp > 1:
            return "tensor"
        return ("ddp", "zero1", "zero2", "zero3")[self.zero] if self.dp > 1 else "single"

    def describe(self) -> str:
        if self.family == "parameter_server":
            return f"parameter server {self.mode.upper()}, {self.dp} workers + {self.servers} server(s)" + self._codec()
        if self.family in ("local_sgd", "diloco"):
            return f"{self.family} dp{self.dp}, H={self.sync_every}" + self._codec()
        parts = [f"dp{self.dp}" + (f" ZeRO-{self.zero}" if self.zero and self.dp > 1 else ""),
                 f"pp{self.pp}" + (f" {self.schedule}" + (f" v{self.virtual}" if self.virtual > 1 else "")
                                   + f" m{self.microbatches}" if self.pp > 1 else ""),
                 f"tp{self.tp}" + (" sp" if self.sequence_parallel else "")]
        extra = [f"{self.recompute} recompute"] if self.recompute != "none" else []
        extra += [self.dtype] if self.dtype != "fp32" else []
        extra += [f"{self.microbatches} accum"] if self.pp == 1 and self.microbatches > 1 else []
        return " x ".join(parts) + (", " + ", ".join(extra) if extra else "") + self._codec()

    def _codec(self) -> str:
        return f", {self.codec}" if self.codec != "none" else ""

    def config_sets(self) -> list[str]:
        """`--set` assignments that run this plan with paratrain (strategy.* keys)."""
        name = self.strategy()
        sets = [f"strategy.name={name}"]
        if name == "hybrid":
            sets += [f"strategy.dp={self.dp}", f"strategy.pp={self.pp}", f"strategy.tp={self.tp}",
                     f"strategy.dp_mode={'shard' if self.zero == 3 else 'replicate'}"]
        if self.pp > 1:
            sets += [f"strategy.pipeline.schedule={self.schedule}",
                     f"strategy.pipeline.microbatches={self.microbatches}",
                     f"strategy.pipeline.virtual_stages={self.virtual}"]
        elif name == "hybrid":  # one stage: the schedule's micro-batches are its accumulation
            sets += [f"strategy.pipeline.microbatches={self.microbatches}"]
        elif self.microbatches > 1:
            sets += [f"training.grad_accum_steps={self.microbatches}"]
        if self.tp > 1 and self.sequence_parallel:
            sets += ["strategy.tensor.sequence_parallel=true"]
        if self.family in ("local_sgd", "diloco"):
            sets += [f"strategy.local_sgd.sync_every={self.sync_every}"]
        if self.family == "parameter_server":
            sets += [f"strategy.ps.servers={self.servers}", f"strategy.ps.mode={self.mode}"]
        if self.codec != "none":
            sets += [f"strategy.compression.codec={self.codec}"]
        if self.dtype == "bf16" and name in ("zero2", "zero3"):
            sets += ["strategy.zero.mixed_precision=bf16"]
        return sets


@dataclass
class Estimate:
    plan: Plan
    step_s: float = 0.0
    compute_s: float = 0.0  # forward + backward on the busiest device, recomputation included
    comm_s: float = 0.0  # exposed communication: not hidden behind compute
    bubble_s: float = 0.0  # pipeline idle time
    optimizer_s: float = 0.0
    memory: dict = field(default_factory=dict)  # bytes per device: params, grads, optimizer, activations, buffers
    fits: bool = True
    why_not: str = ""
    samples_per_s: float = 0.0
    model_flops: float = 0.0  # per step (6 x params x tokens-like count: forward + backward, no recomputation)
    mfu: float = 0.0  # model FLOPs per second over the devices' datasheet peak
    bytes_per_step: float = 0.0  # what a device sends a step (dp axis, pipeline sends, tensor parallel), averaged
    staleness: float = 0.0  # updates between a gradient's read of the parameters and its application

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = {**asdict(self.plan), "describe": self.plan.describe(), "strategy": self.plan.strategy()}
        d["memory_bytes"] = self.memory_bytes
        return d
