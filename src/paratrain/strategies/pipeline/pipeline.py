"""Pipeline parallelism on torch.distributed.pipelining, and the plain layer split it improves on.

The model is cut into consecutive stages (split.py), one or more per rank; each step's
batch is cut into m micro-batches that flow through the stages under a schedule:
GPipe (Huang et al., 2019: all forwards, then all backwards), 1F1B (PipeDream-Flush, Narayanan
et al., 2019: one forward, one backward in the steady state, bounding live activations by p),
interleaved 1F1B (Narayanan et al., SC 2021: v virtual stages per rank shrink the bubble by v)
and zero bubble (Qi et al., ICLR 2024: split backward into input-grad and weight-grad to fill
the bubble; `interleaved_zb`, and `zbv` with its V-shaped placement of two stages per rank).
`model_parallel` is the baseline: the same stages, one batch at a time, no micro-batches.

Each rank records when each of its stages ran each micro-batch's forward (F), backward (B) and
weight-gradient (W) work (instrument.py), from which the timeline chart and the measured bubble come.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, schedules

from paratrain import messages
from paratrain.checkpoint import merge_states
from paratrain.config import ConfigError
from paratrain.data import Batch
from paratrain.evaluation import values
from paratrain.nonfinite import check_update
from paratrain.optim import build_optimizer
from paratrain.strategies.base import StepStats, Strategy, full_state, load_full_state
from paratrain.strategies.layout import (
    MULTI_STAGE,
    check_model_split,
    is_traced,
    pipeline_settings,
    tied_parameters,
)
from paratrain.strategies.pipeline import split
from paratrain.strategies.pipeline.instrument import StageClock
from paratrain.strategies.pipeline.tied import TiedCopies

SCHEDULES = {"gpipe": schedules.ScheduleGPipe, "1f1b": schedules.Schedule1F1B,
             "interleaved_1f1b": schedules.ScheduleInterleaved1F1B,
             "interleaved_zb": schedules.ScheduleInterleavedZeroBubble, "zbv": schedules.ScheduleZBVZeroBubble}


def stages_of_rank(rank: int, pp: int, v: int, schedule: str) -> list[int]:
    if schedule == "zbv":  # V shape: rank r holds stage r and stage 2p-1-r
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(v)]  # looped: rank r holds r, r+p, r+2p, ...


_WIRE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.bool, torch.long]


def send_tensors(xs: tuple[torch.Tensor, ...], group, dst: int) -> None:
    """A stage's outputs (a traced stage's may be several: activations and a mask). A header first
    with each one's rank, shape and dtype: gloo aborts the process when a receive buffer is smaller
    than the message."""
    header = torch.zeros(1 + 10 * len(xs), dtype=torch.long)
    header[0] = len(xs)
    for i, x in enumerate(xs):
        h = header[1 + 10 * i:11 + 10 * i]
        h[0], h[1:1 + x.dim()], h[9] = x.dim(), torch.tensor(x.shape), _WIRE_DTYPES.index(x.dtype)
    dst = dist.get_global_rank(group, dst)
    dist.send(torch.tensor([header.numel()], device=xs[0].device), dst=dst, group=group)
    dist.send(header.to(xs[0].device), dst=dst, group=group)
    for x in xs:
        dist.send(x.contiguous(), dst=dst, group=group)


def recv_tensors(group, src: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    src = dist.get_global_rank(group, src)
    size = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(size, src=src, group=group)
    header = torch.zeros(int(size), dtype=torch.long, device=device)
    dist.recv(header, src=src, group=group)
    xs = []
    for i in range(int(header[0])):
        h = header[1 + 10 * i:11 + 10 * i]
        xs.append(torch.empty(h[1:1 + int(h[0])].tolist(), dtype=_WIRE_DTYPES[int(h[9])], device=device))
        dist.recv(xs[-1], src=src, group=group)
    return tuple(xs)


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


class _Stage(PipelineStage):
    """torch's PipelineStage, except that its shape inference leaves the stage's buffers alone.

    At the first step torch infers the shapes by running each stage's forward once more in
    training mode: the first stage on the first micro-batch, the others on uninitialised tensors
    of the right shape. A BatchNorm layer counts that as a batch and moves its running statistics
    towards it (garbage, past the first stage). Its buffers are put back as they were."""

    def _forward_metadata_inference(self, *args, **kwargs):
        self._buffers_before = [b.detach().clone() for b in self.submod.buffers()]
        return super()._forward_metadata_inference(*args, **kwargs)

    def _post_metadata_inference_cleanup(self) -> None:
        # after the backward inference too: its graph holds the buffers at their forward version
        super()._post_metadata_inference_cleanup()
        with torch.no_grad():
            for b, before in zip(self.submod.buffers(), getattr(self, "_buffers_before", [])):
                b.copy_(before)
        self._buffers_before = []


class Pipeline(Strategy):
    name = "pipeline"

    traces_model = True

    def __init__(self, cfg, topo, model, loss_fn, shard_stage: Callable[[nn.Module], nn.Module] = lambda part: part,
                 loss_context: Callable = nullcontext, example: torch.Tensor | None = None):
        """`shard_stage`: how each stage is sharded further (the hybrid strategy: tensor parallel,
        FSDP); `loss_context`: around the loss (hybrid with tp: the vocabulary-parallel loss);
        `example`: this rank's inputs of one batch (the trainer's), for a model that is traced."""
        super().__init__(cfg, topo, model, loss_fn)
        self.loss_context = loss_context
        schedule, v, m = self.settings = pipeline_settings(cfg)
        pp, rank = topo.size("pp"), topo.axis_rank("pp")
        num_stages = pp * v
        check_model_split(cfg, self.model, pp, topo.size("dp"))
        self.stage_ids = stages_of_rank(rank, pp, v, schedule)
        self.rank_of_stage = {s: r for r in range(pp) for s in stages_of_rank(r, pp, v, schedule)}
        self.traced = num_stages > 1 and is_traced(self.model)
        if num_stages == 1:
            self.parts = [shard_stage(split.whole_model(self.model).to(topo.device))]
        elif self.traced:
            if example is None:
                raise ConfigError(f"model: {type(self.model).__name__} is traced into stages on an example "
                                  "batch, which this strategy was not given (Trainer gives it)")
            stages = split.traced_stages(self.model, self._split(self.model, num_stages), example.tensor_split(m)[0])
            self.parts = [shard_stage(stages[s]) for s in self.stage_ids]
        else:
            starts = self._split(self.model, num_stages)
            self.parts = [shard_stage(split.build_stage(self.model, starts, s).to(topo.device))
                          for s in self.stage_ids]
        self.tied = TiedCopies(tied_parameters(self.model) if num_stages > 1 else [], self.model, self.parts, topo)
        # Left to torch: without static input/output/grad shapes, PipelineStage infers them at the
        # first step with send/recv_object_list (pickle) between neighbouring stages. Passing all four
        # shape sets (static mode) would avoid it; not done yet (paratrain.messages).
        self.stages = [_Stage(part, s, num_stages, topo.device, group=topo.group("pp"))
                       for part, s in zip(self.parts, self.stage_ids)]
        self.events: list[tuple] = []
        self.clock = StageClock(self.events)
        for stage in self.stages:
            i = stage.stage_index
            self.clock.attach(stage, sends_forward=i < num_stages - 1 and self.rank_of_stage[i + 1] != rank,
                              sends_backward=i > 0 and self.rank_of_stage[i - 1] != rank)
        self.has_first, self.has_last = 0 in self.stage_ids, num_stages - 1 in self.stage_ids
        try:
            self.schedule = SCHEDULES[schedule](self.stages if schedule in MULTI_STAGE else self.stages[0], m,
                                                loss_fn=self.loss_fn)
        except ValueError as e:  # the schedule's own constraint, in torch's words
            raise ConfigError(f"strategy.pipeline.schedule = '{schedule}': {e}") from None
        self.model = nn.ModuleList(self.parts)
        self.optimizer = _Optimizers(cfg, self.parts)

    def _split(self, model: nn.Module, num_stages: int) -> list[int]:
        if (starts := split.planned_starts(self.cfg, model, num_stages)) is not None:
            return starts
        # Measured on one rank and shared: every rank must cut the model at the same places.
        costs = None
        if self.topo.is_main:
            sample = torch.randint(0, 2, (self.cfg.training.global_batch_size // self.settings[2],
                                          self.cfg.model.block_size), device=self.topo.device)
            costs = split.time_costs(model, sample)
        if self.topo.world_size > 1:
            costs = messages.broadcast(costs, src=0)
        return split.balanced_split(costs, num_stages)

    def train_step(self, batch: Batch) -> StepStats:
        self.events.clear()
        t0 = time.perf_counter()
        losses: list[torch.Tensor] = []
        with self.loss_context():
            self.schedule.step(*([batch.inputs] if self.has_first else []),
                               target=batch.targets if self.has_last else None,
                               losses=losses if self.has_last else None)
        t1 = time.perf_counter()
        self.tied.sum_gradients(self.meter)
        self.average_gradients()
        self.clip_gradients()
        # This stage's own loss (the last stage's; others have none), on the device: NCCL reduces no CPU tensor.
        own_loss = (torch.stack([loss.detach().float() for loss in losses]).sum() if losses
                    else torch.zeros((), device=self.topo.device))
        finite = check_update(self, own_loss, (p for part in self.parts for p in part.parameters()))
        committed = self.commit()
        if finite and committed:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        loss = self._pipeline_loss(losses)
        busy = sum(e[4] - e[3] for e in self.events)
        nbytes, comm_s = self.meter.take()
        nbytes += self.clock.take_bytes()
        return StepStats(loss, batch.num_samples, batch.num_tokens, compute_s=busy, comm_s=comm_s,
                         optim_s=t2 - t1, wait_s=max(0.0, t1 - t0 - busy), bytes_sent=nbytes,
                         extra=({} if finite else {"nonfinite": True}) | ({} if committed else {"committed": False}))

    def average_gradients(self) -> None:
        """After the schedule's backward: nothing here (the stages' dp axis, if any, is FSDP's); torchft
        replica groups average over the step's quorum (hybrid.FaultTolerantHybrid)."""

    def commit(self) -> bool:
        """Whether the step's update may be applied (torchft: every member of the quorum averaged)."""
        return True

    def _pipeline_loss(self, losses: list[torch.Tensor]) -> float:
        """The last stage's mean micro-batch loss, shared along the pipeline, then averaged over dp."""
        local = torch.stack([loss.detach().float() for loss in losses]).mean() if losses else torch.zeros(())
        local = local.to(self.topo.device).reshape(1)
        if self.topo.size("pp") > 1:
            self.meter.all_reduce(local, self.topo.group("pp"))
        return self.meter.mean(local.reshape(()), self.topo.group("dp"))

    def clip_gradients(self) -> None:
        """Clip by the norm over the whole model, not this rank's stages alone."""
        max_norm = self.cfg.optimizer.grad_clip
        if not max_norm:
            return
        grads = [p.grad for p in self.tied.counted_once([p for part in self.parts for p in part.parameters()])
                 if p.grad is not None]
        norm = nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.topo.device)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        sq = (norm.float() ** 2).reshape(1)
        if self.topo.size("pp") > 1:
            dist.all_reduce(sq, group=self.topo.group("pp"))
        params = [p for part in self.parts for p in part.parameters()]
        nn.utils.clip_grads_with_norm_(params, max_norm, sq.sqrt().reshape(()))

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> list[float]:
        """A plain forward through the stages in order (no schedule: ZBV's cannot run without backward)."""
        group, me = self.topo.group("pp"), self.topo.axis_rank("pp")
        part_of = dict(zip(self.stage_ids, self.parts))
        last = len(self.rank_of_stage) - 1
        for part in self.parts:
            part.eval()
        losses = []
        # A traced stage runs on the micro-batch shape it was traced with: the batch in m pieces.
        pieces = [(x, y) for b in batches for x, y in zip(b.inputs.tensor_split(self.settings[2]),
                                                         b.targets.tensor_split(self.settings[2]))] \
            if self.traced else [(b.inputs, b.targets) for b in batches]
        for inputs, targets in pieces:
            x = (inputs,)
            for s in range(last + 1):
                if self.rank_of_stage[s] != me:
                    continue
                if s > 0 and self.rank_of_stage[s - 1] != me:
                    x = recv_tensors(group, self.rank_of_stage[s - 1], self.topo.device)
                x = part_of[s](*x)
                x = x if isinstance(x, tuple) else (x,)
                if s < last and self.rank_of_stage[s + 1] != me:
                    send_tensors(x, group, self.rank_of_stage[s + 1])
            if self.has_last:
                with self.loss_context():
                    losses.append(values(self.loss_fn, self.metrics, x[0], targets))
        for part in self.parts:
            part.train()
        # the last stage's mean [loss, metric, ...], shared along the pipeline, then averaged over dp
        local = torch.stack(losses).mean(0) if losses else torch.zeros(1 + len(self.metrics))
        local = local.to(self.topo.device)
        if self.topo.size("pp") > 1:
            self.meter.all_reduce(local, self.topo.group("pp"))
        return self.meter.means(local, self.topo.group("dp"))

    def state_dict(self, group=None) -> dict:
        return self.tied.to_checkpoint(merge_states([full_state(part, opt)
                                                     for part, opt in zip(self.parts, self.optimizer.optimizers)]))

    def load_state_dict(self, state: dict) -> None:
        state = self.tied.from_checkpoint(state)
        for part, opt in zip(self.parts, self.optimizer.optimizers):
            load_full_state(part, opt, state)

    def close(self, run_dir) -> None:
        """The last step's timeline from every pipeline rank: timeline.json and timeline.png (every
        rank finished: the summary gathers over the world)."""
        pp = self.topo.size("pp")
        events = [list(self.events)]
        if pp > 1:
            events = messages.all_gather(list(self.events), group=self.topo.group("pp"))
        if self.topo.is_main and any(events):  # none: a restart at the last step trained nothing
            from paratrain.report.timeline import write_timeline

            schedule, v, m = self.settings
            write_timeline(events, run_dir, schedule, pp, m, v)
        return None


class ModelParallel(Pipeline):
    """Consecutive blocks on consecutive ranks, the whole batch at once: the idle baseline."""

    name = "model_parallel"  # its settings: pipeline_settings
