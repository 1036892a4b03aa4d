"""Pipeline parallelism on torch.distributed.pipelining, and the plain layer split it improves on.

The model is cut into consecutive stages (pipeline_split.py), one or more per rank; each step's
batch is cut into m micro-batches that flow through the stages under a schedule:
GPipe (Huang et al., 2019: all forwards, then all backwards), 1F1B (PipeDream-Flush, Narayanan
et al., 2019: one forward, one backward in the steady state, bounding live activations by p),
interleaved 1F1B (Narayanan et al., SC 2021: v virtual stages per rank shrink the bubble by v)
and zero bubble (Qi et al., ICLR 2024: split backward into input-grad and weight-grad to fill
the bubble; `interleaved_zb`, and `zbv` with its V-shaped placement of two stages per rank).
`model_parallel` is the baseline: the same stages, one batch at a time, no micro-batches.

Each rank records when each of its stages ran each micro-batch's forward (F), backward (B) and
weight-gradient (W) work, from which the timeline chart and the measured bubble come.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.pipelining import PipelineStage, schedules

from paratrain import messages
from paratrain.checkpoint import merge_states
from paratrain.config import Config, ConfigError
from paratrain.data import Batch
from paratrain.optim import build_optimizer
from paratrain.strategies import pipeline_split as split
from paratrain.strategies.base import StepStats, Strategy, to_cpu, load_full_state
from paratrain.topology import ParallelDims

SCHEDULES = {"gpipe": schedules.ScheduleGPipe, "1f1b": schedules.Schedule1F1B,
             "interleaved_1f1b": schedules.ScheduleInterleaved1F1B,
             "interleaved_zb": schedules.ScheduleInterleavedZeroBubble, "zbv": schedules.ScheduleZBVZeroBubble}
MULTI_STAGE = {"interleaved_1f1b", "interleaved_zb", "zbv"}


def stages_of_rank(rank: int, pp: int, v: int, schedule: str) -> list[int]:
    if schedule == "zbv":  # V shape: rank r holds stage r and stage 2p-1-r
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(v)]  # looped: rank r holds r, r+p, r+2p, ...


def pipeline_settings(cfg: Config) -> tuple[str, int, int]:
    """(schedule, stages per rank, micro-batches); `model_parallel` is GPipe with one of each."""
    if cfg.strategy.name == "model_parallel":
        return "gpipe", 1, 1
    p = cfg.strategy.pipeline
    return p.schedule, p.virtual_stages, p.microbatches


def check_pipeline(cfg: Config, pp: int, dp: int) -> None:
    """Layout constraints that need no model: one clear line each, before any worker starts."""
    p = cfg.strategy.pipeline
    schedule, v, m = pipeline_settings(cfg)
    if schedule in ("gpipe", "1f1b") and v != 1:
        raise ConfigError(f"strategy.pipeline.virtual_stages = {v}: schedule '{schedule}' takes 1 stage per rank; "
                          "use interleaved_1f1b or interleaved_zb for more")
    if schedule in ("interleaved_1f1b", "interleaved_zb") and v < 2:
        raise ConfigError(f"strategy.pipeline.virtual_stages = {v}: schedule '{schedule}' needs >= 2 stages per rank")
    if schedule == "zbv" and v != 2:
        raise ConfigError(f"strategy.pipeline.virtual_stages = {v}: schedule 'zbv' places exactly 2 stages per rank")
    if schedule in MULTI_STAGE and m % max(1, m // pp):
        raise ConfigError(f"strategy.pipeline.microbatches = {m}: schedule '{schedule}' needs a multiple of "
                          f"{max(1, m // pp)} (rounds of {pp} ranks)")
    if schedule == "1f1b" and m < pp:
        raise ConfigError(f"strategy.pipeline.microbatches = {m}: schedule '1f1b' needs at least one per stage "
                          f"({pp}); use more micro-batches or gpipe")
    local = cfg.training.global_batch_size // dp
    if local % m:
        raise ConfigError(f"strategy.pipeline.microbatches = {m}: must divide the per-rank batch "
                          f"{local} (training.global_batch_size / data-parallel ranks)")
    if cfg.training.grad_accum_steps != 1:
        raise ConfigError(f"training.grad_accum_steps = {cfg.training.grad_accum_steps}: pipelines accumulate over "
                          "micro-batches; set strategy.pipeline.microbatches instead")
    if p.split == "time" and cfg.model.name != "gpt":
        raise ConfigError(f"strategy.pipeline.split = 'time': measures the built-in gpt's blocks only; "
                          f"use 'params' or split_points for model.name = '{cfg.model.name}'")
    if cfg.model.name == "gpt" and pp * v > cfg.model.n_layer:
        raise ConfigError(f"model.n_layer = {cfg.model.n_layer}: fewer blocks than pipeline stages "
                          f"({pp} ranks x {v} virtual stages)")
    if p.split_points:
        split.check_split_points(p.split_points, cfg.model.n_layer if cfg.model.name == "gpt" else 10**9, pp * v)


_WIRE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def send_tensor(x: torch.Tensor, group, dst: int) -> None:
    """Shape header first: gloo aborts the process when a receive buffer is smaller than the message."""
    header = torch.zeros(9, dtype=torch.long)
    header[0], header[1:1 + x.dim()], header[8] = x.dim(), torch.tensor(x.shape), _WIRE_DTYPES.index(x.dtype)
    dist.send(header.to(x.device), dst=dist.get_global_rank(group, dst), group=group)
    dist.send(x.contiguous(), dst=dist.get_global_rank(group, dst), group=group)


def recv_tensor(group, src: int, device: torch.device) -> torch.Tensor:
    header = torch.zeros(9, dtype=torch.long, device=device)
    dist.recv(header, src=dist.get_global_rank(group, src), group=group)
    x = torch.empty(header[1:1 + int(header[0])].tolist(), dtype=_WIRE_DTYPES[int(header[8])], device=device)
    dist.recv(x, src=dist.get_global_rank(group, src), group=group)
    return x


def check_model_split(cfg: Config, model: nn.Module, pp: int) -> None:
    """The model can be cut into pp x v stages (its blocks, any explicit split points)."""
    v = pipeline_settings(cfg)[1]
    num_blocks = len(split.blocks_of(model))
    if pp * v > num_blocks:
        raise ConfigError(f"strategy: {pp * v} pipeline stages ({pp} ranks x {v}) for a model of {num_blocks} blocks")
    if cfg.strategy.pipeline.split_points:
        split.check_split_points(cfg.strategy.pipeline.split_points, num_blocks, pp * v)


class _Optimizers:
    """One optimizer per local stage (torchtitan's OptimizersContainer), driven as one."""

    def __init__(self, cfg, parts: list[nn.Module]):
        self.optimizers = [build_optimizer(cfg.optimizer, part.parameters()) for part in parts]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


class Pipeline(Strategy):
    name = "pipeline"

    @classmethod
    def parallel_dims(cls, cfg: Config, world_size: int) -> ParallelDims:
        check_pipeline(cfg, pp=world_size, dp=1)
        return ParallelDims(pp=world_size)

    def _settings(self) -> tuple[str, int, int]:
        return pipeline_settings(self.cfg)

    def wrap(self, model: nn.Module) -> nn.Module:
        schedule, v, m = self._settings()
        pp, rank = self.topo.size("pp"), self.topo.axis_rank("pp")
        num_stages = pp * v
        check_model_split(self.cfg, model, pp)
        self.starts = self._split(model, num_stages)
        self.stage_ids = stages_of_rank(rank, pp, v, schedule)
        self.rank_of_stage = {s: r for r in range(pp) for s in stages_of_rank(r, pp, v, schedule)}
        self.parts = [split.build_stage(model, self.starts, s).to(self.topo.device) for s in self.stage_ids]
        self.parts = [self.parallelize_stage(part) for part in self.parts]
        # Left to torch: without static input/output/grad shapes, PipelineStage infers them at the
        # first step with send/recv_object_list (pickle) between neighbouring stages. Passing all four
        # shape sets (static mode) would avoid it; not done yet (paratrain.messages).
        self.stages = [PipelineStage(part, s, num_stages, self.topo.device, group=self.topo.group("pp"))
                       for part, s in zip(self.parts, self.stage_ids)]
        self.events: list[tuple] = []
        self.p2p_bytes = 0
        for stage in self.stages:
            self._instrument(stage)
        self.has_first, self.has_last = 0 in self.stage_ids, num_stages - 1 in self.stage_ids
        cls = SCHEDULES[schedule]
        try:
            self.schedule = cls(self.stages if schedule in MULTI_STAGE else self.stages[0], m,
                                loss_fn=self.loss_fn)
        except ValueError as e:  # the schedule's own constraint, in torch's words
            raise ConfigError(f"strategy.pipeline.schedule = '{schedule}': {e}") from None
        return nn.ModuleList(self.parts)

    def parallelize_stage(self, part: nn.Module) -> nn.Module:
        """Hybrid layouts shard each stage further (tensor parallel, ZeRO); plain pipelines do not."""
        return part

    def _split(self, model: nn.Module, num_stages: int) -> list[int]:
        p = self.cfg.strategy.pipeline
        if p.split_points:
            return split.check_split_points(p.split_points, len(split.blocks_of(model)), num_stages)
        if p.split == "params":
            return split.balanced_split(split.param_costs(model), num_stages)
        # Measured on one rank and shared: every rank must cut the model at the same places.
        costs = None
        if self.topo.is_main:
            sample = torch.randint(0, 2, (self.cfg.training.global_batch_size // self._settings()[2],
                                          self.cfg.model.block_size), device=self.topo.device)
            costs = split.time_costs(model, sample)
        if self.topo.world_size > 1:
            costs = messages.broadcast(costs, src=0)
        return split.balanced_split(costs, num_stages)

    def _instrument(self, stage: PipelineStage) -> None:
        """Time every micro-batch's F / B / W on this stage and count the bytes it sends."""
        num_stages, me = stage.num_stages, self.topo.axis_rank("pp")
        sends_forward = stage.stage_index < num_stages - 1 and self.rank_of_stage[stage.stage_index + 1] != me
        sends_backward = stage.stage_index > 0 and self.rank_of_stage[stage.stage_index - 1] != me
        input_bytes, last_input = {}, [0]
        # The schedule hands received activations to the stage, not to forward_one_chunk's args:
        # read the input size where the stage's module sees it.
        stage.submod.register_forward_pre_hook(
            lambda mod, args: last_input.__setitem__(0, sum(a.numel() * a.element_size() for a in args
                                                            if torch.is_tensor(a) and a.is_floating_point())))

        def timed(kind, method):
            def run(chunk, *args, **kwargs):
                t0 = time.perf_counter()
                out = method(chunk, *args, **kwargs)
                self.events.append((kind, stage.stage_index, chunk, t0, time.perf_counter()))
                if kind == "F":
                    input_bytes[chunk] = last_input[0]
                    if sends_forward:
                        self.p2p_bytes += out.numel() * out.element_size()
                elif kind == "B" and sends_backward:
                    self.p2p_bytes += input_bytes.get(chunk, 0)
                return out
            return run

        stage.forward_one_chunk = timed("F", stage.forward_one_chunk)
        stage.backward_one_chunk = timed("B", stage.backward_one_chunk)
        stage.backward_weight_one_chunk = timed("W", stage.backward_weight_one_chunk)

    def make_optimizer(self, params) -> _Optimizers:
        return _Optimizers(self.cfg, self.parts)

    def train_step(self, batch: Batch) -> StepStats:
        self.events.clear()
        t0 = time.perf_counter()
        losses: list[torch.Tensor] = []
        with self.loss_context():
            self.schedule.step(*([batch.inputs] if self.has_first else []),
                               target=batch.targets if self.has_last else None, losses=losses if self.has_last else None)
        t1 = time.perf_counter()
        self.clip_gradients()
        # This stage's own loss (the last stage's; others have none), on the device: NCCL reduces no CPU tensor.
        own_loss = (torch.stack([l.detach().float() for l in losses]).sum() if losses
                    else torch.zeros((), device=self.topo.device))
        finite = self.update_is_finite(own_loss, (p for part in self.parts for p in part.parameters()))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        loss = self._pipeline_loss(losses)
        busy = sum(e[4] - e[3] for e in self.events)
        nbytes, comm_s = self.meter.take()
        nbytes, self.p2p_bytes = nbytes + self.p2p_bytes, 0
        return StepStats(loss, batch.num_samples, batch.num_tokens, compute_s=busy, comm_s=comm_s,
                         optim_s=t2 - t1, wait_s=max(0.0, t1 - t0 - busy), bytes_sent=nbytes,
                         extra={} if finite else {"nonfinite": True})

    def _pipeline_loss(self, losses: list[torch.Tensor]) -> float:
        """The last stage's mean micro-batch loss, shared along the pipeline, then averaged over dp."""
        local = torch.stack([l.detach().float() for l in losses]).mean() if losses else torch.zeros(())
        local = local.to(self.topo.device).reshape(1)
        if self.topo.size("pp") > 1:
            self.meter.all_reduce(local, self.topo.group("pp"))
        return self.mean_over_dp(local.reshape(()))

    def clip_gradients(self) -> None:
        """Clip by the norm over the whole model, not this rank's stages alone."""
        max_norm = self.cfg.optimizer.grad_clip
        if not max_norm:
            return
        grads = [p.grad for part in self.parts for p in part.parameters() if p.grad is not None]
        norm = nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.topo.device)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        sq = (norm.float() ** 2).reshape(1)
        if self.topo.size("pp") > 1:
            dist.all_reduce(sq, group=self.topo.group("pp"))
        params = [p for part in self.parts for p in part.parameters()]
        nn.utils.clip_grads_with_norm_(params, max_norm, sq.sqrt().reshape(()))

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """A plain forward through the stages in order (no schedule: ZBV's cannot run without backward)."""
        group, me = self.topo.group("pp"), self.topo.axis_rank("pp")
        part_of = dict(zip(self.stage_ids, self.parts))
        last = len(self.rank_of_stage) - 1
        for part in self.parts:
            part.eval()
        losses = []
        for b in batches:
            x = b.inputs
            for s in range(last + 1):
                if self.rank_of_stage[s] != me:
                    continue
                if s > 0 and self.rank_of_stage[s - 1] != me:
                    x = recv_tensor(group, self.rank_of_stage[s - 1], self.topo.device)
                x = part_of[s](x)
                if s < last and self.rank_of_stage[s + 1] != me:
                    send_tensor(x, group, self.rank_of_stage[s + 1])
            if self.has_last:
                with self.loss_context():
                    losses.append(self.loss_fn(x, b.targets))
        for part in self.parts:
            part.train()
        return self._pipeline_loss(losses)

    @property
    def module(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict:
        parts = [get_state_dict(part, opt, options=StateDictOptions(full_state_dict=True))
                 for part, opt in zip(self.parts, self.optimizer.optimizers)]
        return merge_states([{"model": to_cpu(m), "optimizer": to_cpu(o)} for m, o in parts])

    def load_state_dict(self, state: dict) -> None:
        for part, opt in zip(self.parts, self.optimizer.optimizers):
            load_full_state(part, opt, state)

    def close(self, run_dir) -> None:
        """The last step's timeline from every pipeline rank: timeline.json and timeline.png."""
        pp = self.topo.size("pp")
        events = [list(self.events)]
        if pp > 1:
            events = messages.all_gather(list(self.events), group=self.topo.group("pp"))
        if self.topo.is_main:
            from paratrain.report.timeline import write_timeline

            schedule, v, m = self._settings()
            write_timeline(events, run_dir, schedule, pp, m, v)


class ModelParallel(Pipeline):
    """Consecutive blocks on consecutive ranks, the whole batch at once: the idle baseline."""

    name = "model_parallel"  # its settings: pipeline_settings
