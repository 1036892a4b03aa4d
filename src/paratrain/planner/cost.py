"""One plan's predicted step: compute, exposed communication, pipeline bubble, optimizer, memory.

`estimate(plan, model, cluster, batch)` (a `Plan` of plan.py) predicts:
- compute: each stage's forward and backward of one micro-batch from its blocks' FLOPs at the
  device's achieved matmul rate plus their other operations' bytes at its memory bandwidth
  (roofline per block: the two add, since the matmuls and the elementwise kernels run one after
  the other); backward is twice the forward; on a calibrated CPU the operators whose arithmetic
  sets their time (GeLU, layer norm, softmax, attention's scores) at their measured seconds per
  element instead, and every operator's fixed dispatch cost; full recomputation adds a forward,
  selective its attention; on a calibrated CPU all of it scaled by what a whole model's forward
  and backward measured over its parts (`compute_factor`, at the micro-batch's size: a forward of
  fewer tokens runs more slowly for its work); tensor parallelism splits the matmuls
  and the split part of the traffic and adds two all-reduces per layer each way (Megatron: not
  overlapped);
- the pipeline: schedule.simulate with those times, the point-to-point sends between stages and,
  on a calibrated CPU, the schedule runtime's cost per action;
- data parallelism: the gradient all-reduce (ddp, ZeRO-1) or reduce-scatter and all-gathers
  (ZeRO-2/3), hidden behind backward as far as the device overlaps communication with compute
  (`Cluster.overlap`: 1 on GPUs, which move bytes on their own engines; 0 on a CPU whose cores
  all compute) except the last bucket's or block's; ZeRO-1 broadcasts the updated parameters;
  on a calibrated CPU, FSDP2's fixed cost per block and ZeroRedundancyOptimizer's step beyond
  AdamW's as measured (framework.py);
- PowerSGD's own products, orthogonalisation and error feedback, and its three all-reduces;
- the update: AdamW reads and writes parameters, gradients and two moments (memory-bound), or on
  a calibrated CPU the trainer's whole update (clipping, the non-finite check, eager AdamW) at its
  measured cost per parameter tensor and per parameter, through DTensor where FSDP2 or tensor
  parallelism made the parameters DTensors;
- memory per device: footprint.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from paratrain.planner import collectives as cc
from paratrain.planner.footprint import memory, param_bytes
from paratrain.planner.hardware import Cluster
from paratrain.planner.model import Block, ModelProfile
from paratrain.planner.plan import Estimate, Plan
from paratrain.planner.schedule import simulate, stage_rank

# The parameters' bytes a local SGD / DiLoCo sync reads and writes around its all-reduce
# (local_sgd.py), in units of the parameters' bytes: local SGD flattens them (2), clones the flat
# vector for the all-reduce (2), divides by the replicas (2), copies the mean back (2) and
# measures the replicas' distance from it (6); DiLoCo flattens the anchor and the parameters and
# subtracts them (7), clones and divides (4), steps the outer Nesterov SGD (about 11), copies the
# anchor back (2) and measures the distance (6).
SYNC_PASSES = {"local_sgd": 14, "diloco": 30}
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket (strategy.ddp.bucket_mb)
# Bytes on the wire per value, per codec, as paratrain's codecs send them (compression/codecs.py):
# fp16/bf16 half; int8 a byte plus a scale per tensor; top-k 8 bytes per kept value (index + value)
# at the default ratio 0.01; sign a bit. PowerSGD: `codec_fraction`.
CODEC_FRACTION = {"none": 1.0, "fp16": 0.5, "bf16": 0.5, "int8": 0.25, "topk": 2 * 0.01, "sign": 1 / 32}
POWERSGD_RANK = 4  # strategy.compression.rank's default
SPLIT_BACKWARD = ("interleaved_zb", "zbv")  # schedules whose backward is split into I and W


def codec_fraction(codec: str, model: ModelProfile) -> float:
    """The share of the gradient's bytes a codec sends. PowerSGD (Vogels et al. 2019, torch's DDP hook)
    sends (rows + cols) x rank per weight matrix of rows x cols and every vector whole."""
    if codec != "powersgd":
        return CODEC_FRACTION.get(codec, 1.0)
    matrices = [(n, k) for b in model.blocks for n, k, _ in b.gemms] + [(n, k) for n, k, _ in model.last.gemms]
    if not matrices or not model.params:
        return 1.0
    dense = sum(n * k for n, k in matrices)
    sent = sum(min(n * k, (n + k) * POWERSGD_RANK) for n, k in matrices)
    return (sent + model.params - dense) / model.params
ADAM_BYTES = 4 * (1 + 1 + 2) * 2  # parameter, gradient, two moments: read and written once each (fp32)


def _stages(model: ModelProfile, stages: int) -> list[list[Block]]:
    """Consecutive blocks per stage, as many per stage as can be (paratrain splits by parameters or
    time: for a stack of equal layers both give this cut); first and last ride with the ends."""
    n = len(model.blocks)
    cuts = [round(i * n / stages) for i in range(stages + 1)]
    out = [list(model.blocks[cuts[i]:cuts[i + 1]]) for i in range(stages)]
    out[0] = [model.first, *out[0]]
    out[-1] = [*out[-1], model.last]
    return out


@dataclass
class _Layout:
    """What a plan puts on each device: stages, micro-batch size, links."""
    plan: Plan
    model: ModelProfile
    cluster: Cluster
    mb: float  # samples per micro-batch
    stages: list
    rank_stages: list  # per pipeline rank, the stages it holds
    local_params: float  # the busiest rank's parameters (its tensor-parallel share)
    local_tensors: int = 0  # ... and how many parameter tensors they are

    @classmethod
    def of(cls, plan: Plan, model: ModelProfile, cluster: Cluster, global_batch: int) -> "_Layout":
        mb = global_batch / plan.dp / plan.microbatches
        stages = _stages(model, plan.pp * plan.virtual)
        where = stage_rank(plan.schedule, plan.pp, plan.virtual) if plan.pp > 1 else [0]
        rank_stages = [[s for s in range(len(stages)) if where[s] == r] for r in range(plan.pp)]
        busiest = max(rank_stages, key=lambda st: sum(b.params for s in st for b in stages[s]))
        local = sum(b.params for s in busiest for b in stages[s]) / plan.tp
        tensors = sum(b.tensors for s in busiest for b in stages[s])
        return cls(plan, model, cluster, mb, stages, rank_stages, local, tensors)


def estimate(plan: Plan, model: ModelProfile, cluster: Cluster, global_batch: int,
             slowdown: float = 1.0) -> Estimate:
    """The plan's memory per device, then (if it fits) its step; `slowdown`: one device computes
    that many times slower (a straggler: the synchronous families wait for it, ASP and SSP's
    other workers do not)."""
    model = model.in_dtype(2 if plan.dtype == "bf16" else 4)
    lay = _Layout.of(plan, model, cluster, global_batch)
    est = Estimate(plan)
    est.memory = memory(lay)
    if est.memory_bytes > cluster.device.memory_bytes:
        est.fits = False
        est.why_not = f"needs {_gib(est.memory_bytes)} of {_gib(cluster.device.memory_bytes)}"
        return est
    _time(lay, est, slowdown)
    est.samples_per_s = global_batch / est.step_s if est.step_s else 0.0
    if plan.family == "parameter_server" and plan.mode != "bsp" and slowdown > 1:
        # the others keep their pace: the straggler contributes 1/slowdown of a worker's samples
        est.samples_per_s *= (plan.dp - 1 + 1 / slowdown) / plan.dp
    est.model_flops = 3 * model.flops * global_batch
    peak = cluster.device.peak("bf16" if plan.dtype == "bf16" else "fp32") * plan.devices
    est.mfu = est.model_flops / est.step_s / peak if est.step_s and peak else 0.0
    return est


def _time(lay: _Layout, est: Estimate, slowdown: float = 1.0) -> None:
    plan, model, cluster = lay.plan, lay.model, lay.cluster
    dev, mb = cluster.device, lay.mb
    tp, pp, v = plan.tp, plan.pp, plan.virtual
    flops_rate = dev.flops("bf16" if plan.dtype == "bf16" else "fp32")
    tp_link = cluster.link(tp)
    pp_link = cluster.link(tp * pp) if pp > 1 else cluster.intra
    dp_link = cluster.link(plan.dp * pp * tp)
    overlap = cluster.overlap
    tokens = mb * max(1, model.seq)

    dtype = "bf16" if plan.dtype == "bf16" else "fp32"

    def products(b: Block) -> tuple[float, float]:
        """Forward and backward seconds of one micro-batch's matrix products in `b`: each weight
        product at its own size's rate (outputs tokens x n forward; tokens x k and k x n backward),
        attention and the rest at the rate of their total."""
        total, fwd, bwd = b.flops * mb / tp, 0.0, 0.0
        for n, k, split in b.gemms:
            n, k = (n / tp, k) if split == "n" else (n, k / tp)
            work = 2 * tokens * n * k
            total -= work
            fwd += work / dev.rate(work, dtype, tokens, n)
            bwd += work / dev.rate(work, dtype, tokens, k) + work / dev.rate(work, dtype, k, n)
        rest = total / dev.rate(total, dtype) if total > 0 else 0.0
        return fwd + rest, bwd + 2 * rest

    def forward(blocks: list[Block]) -> tuple[float, float, float]:
        """(forward compute seconds, its backward's, tensor-parallel seconds) of one micro-batch
        through `blocks`; the other operations' bytes at memory bandwidth, twice over backward."""
        fwd, bwd = (sum(x) for x in zip(*map(products, blocks)))
        # Operators a calibrated CPU times by kind (per element) rather than by their bytes
        timed = [(kind, e, nbytes) for b in blocks for kind, e, nbytes in b.kinds if kind in dev.kind_s]
        kind_f = sum(e * dev.kind_s[k][0] for k, e, _ in timed) * mb / tp
        kind_b = sum(e * dev.kind_s[k][1] for k, e, _ in timed) * mb / tp
        share = 1 - sum(nbytes for _, _, nbytes in timed) / max(1.0, sum(b.traffic for b in blocks))
        split = sum(b.traffic * b.tp_split for b in blocks) * share
        whole = sum(b.traffic * (1 - b.tp_split) for b in blocks) * share
        t_bytes = (split / tp + whole / (tp if plan.sequence_parallel else 1)) * mb / dev.memory_Bps
        comm = sum(2 * tp_all_reduce(b.tp_bytes * mb) for b in blocks if b.tp_bytes) if tp > 1 else 0.0
        if tp > 1 and dev.tp_fixed_s and any(b is model.first for b in blocks):
            comm += tp_all_reduce(model.blocks[0].boundary * mb if model.blocks else 0.0)  # the embedding's sum
        return fwd + t_bytes + kind_f, bwd + 2 * t_bytes + kind_b, comm

    def tp_all_reduce(nbytes: float) -> float:
        """A tensor-parallel all-reduce; where the device's tensor-parallel fixed costs were calibrated,
        the two-rank latency is in them (`fixed`): only the bytes and any further ring steps here."""
        seconds = cc.all_reduce(nbytes, tp, tp_link)
        return max(0.0, seconds - 2 * tp_link.ab("all_reduce")[0]) if dev.tp_fixed_s and seconds else seconds

    def fixed(blocks: list[Block]) -> tuple[float, float]:
        """Each operator's cost whatever its size (forward, backward): dispatch and autograd on a CPU;
        under tensor parallelism every operator of a split layer goes through a DTensor."""
        ops = sum(b.ops for b in blocks)
        if tp > 1 and dev.tp_fixed_s:  # calibrated on the built-in GPT: per block, and half the ends each end
            ends_f, ends_b, block_f, block_b = dev.tp_fixed_s
            layers = sum(b in model.blocks for b in blocks)
            ends = sum(b is model.first or b is model.last for b in blocks) / 2
            return layers * block_f + ends * ends_f, layers * block_b + ends * ends_b
        if tp > 1:
            return ops * dev.dtensor_op_s, ops * dev.dtensor_op_backward_s
        return ops * dev.op_s, ops * dev.op_backward_s

    # A straggler holds the first stage (pipelines) or is one of the data-parallel ranks: everyone
    # who synchronises with it waits; ASP and SSP parameter-server workers do not.
    waits = slowdown if not (plan.family == "parameter_server" and plan.mode != "bsp") else 1.0
    # hybrid's dp axis replicating through FSDP2: its hooks in every micro-batch's forward and
    # backward (calibrated: each further micro-batch's cost; the first's surplus is charged below)
    hsdp = dev.fsdp_fixed_s.get("replicate") if plan.strategy() == "hybrid" and plan.zero == 0 and plan.dp > 1 else ()
    f_times, b_times, tp_total = [], [], 0.0
    for i, blocks in enumerate(lay.stages):
        fc, bc, fcomm = forward(blocks)
        fixed_f, fixed_b = fixed(blocks)
        if hsdp:
            hooks = hsdp[2] + hsdp[3] * sum(b in model.blocks for b in blocks)
            fixed_f, fixed_b = fixed_f + hooks / 2, fixed_b + hooks / 2
        # what a whole model pays beyond its calibrated parts (tensor parallelism's fixed costs were
        # measured on a whole model already)
        k = dev.factor(tokens)  # at this micro-batch's size
        if tp > 1 and dev.tp_fixed_s:  # and what a whole tensor-parallel model pays beyond those fixed costs
            k, fcomm = k * dev.tp_factor, fcomm * dev.tp_factor
        fc, bc = fc * k, bc * k
        if not (tp > 1 and dev.tp_fixed_s):
            fixed_f, fixed_b = fixed_f * k, fixed_b * k
        recompute = 0.0
        if plan.recompute == "full":
            recompute = fc + fcomm
        elif plan.recompute == "selective":  # attention's scores again: its FLOPs and its s x s traffic
            attn = sum(b.attn_flops for b in blocks) * mb / tp / flops_rate
            recompute = attn + sum(b.attn_traffic for b in blocks) * mb / tp / dev.memory_Bps
        slow = waits if i == 0 or pp == 1 else 1.0
        if plan.schedule in SPLIT_BACKWARD and dev.split_backward_s:  # torch's I and W: two graph walks
            per_block, share = dev.split_backward_s
            fixed_b += per_block * sum(b in model.blocks for b in blocks) + share * bc
        # backward's collectives mirror forward's; Megatron's sequence parallelism adds an all-gather
        # of each split linear's input (half an all-reduce each: half of forward's again)
        bcomm = 1.5 * fcomm if plan.sequence_parallel and plan.sp_regather else fcomm
        # a pipeline stage's compute as a real pipeline runs it (calibrated: pp_factor)
        slow = slow * (dev.pp_factor if pp > 1 else 1.0)
        f_times.append((fc + fixed_f) * slow + fcomm)
        b_times.append((bc + recompute + fixed_b) * slow + bcomm)
        tp_total += fcomm + bcomm

    if pp > 1:
        def send_s(nbytes: float) -> float:
            if plan.sequence_parallel:
                return cc.p2p(nbytes / tp, pp_link)
            if plan.p2p_scatter:
                return cc.p2p(nbytes / tp, pp_link) + cc.all_gather(nbytes, tp, tp_link)
            return cc.p2p(nbytes, pp_link)

        # what each message costs beyond the link as a real pipeline pays it (calibrated per schedule)
        extra = dev.pipeline_send_s.get(plan.schedule, dev.pipeline_send_s.get("1f1b", 0.0))
        send = [send_s(stage[-1].boundary * mb) + extra for stage in lay.stages]
        est.bytes_per_step += 2 * plan.microbatches * sum(stage[-1].boundary * mb for stage in lay.stages) / pp
        sim = simulate(plan.schedule, pp, plan.microbatches, v, f_times, b_times, send,
                       dev.pipeline_action_s.get(plan.schedule, 0.0))
        pipeline_s = sim.makespan
        est.compute_s = max(sim.busy)
        est.bubble_s = pipeline_s - est.compute_s
    else:
        # hybrid runs a pipeline schedule even of one stage (1F1B's runtime): two actions per micro-batch
        runtime = 2 * dev.pipeline_action_s.get("1f1b", 0.0) if plan.strategy() == "hybrid" else 0.0
        pipeline_s = est.compute_s = plan.microbatches * (f_times[0] + b_times[0] + runtime)
    # Tensor parallelism's all-reduces run inside the busiest rank's actions: said as communication.
    tp_share = tp_total * plan.microbatches * (v / (pp * v) if pp > 1 else 1)
    est.compute_s -= tp_share

    p_bytes = param_bytes(plan.dtype)[0]
    local = lay.local_params
    dp_comm = 0.0
    if plan.family == "sync" and plan.dp > 1:
        n = plan.dp
        grad_wire = local * 4 * codec_fraction(plan.codec, model)
        if plan.zero <= 1:
            # DDP's buckets all-reduce as backward produces them; pipelines reduce after their last backward
            window = overlap * plan.microbatches * b_times[0] if pp == 1 else 0.0
            total = cc.all_reduce(grad_wire, n, dp_link)
            last = cc.all_reduce(min(grad_wire, BUCKET_BYTES), n, dp_link)
            dp_comm = max(last, total - window)
            ddp_s = dev.ddp_s if dp_link.name == "loopback" else ()  # on the link it was measured on
            if ddp_s and plan.strategy() in ("ddp", "zero1") and plan.codec == "none":
                # as calibrated: DDP's all-reduce in backward, a step's and a gradient byte's cost
                # (its hook's division, its threads on the cores backward computes on)
                dp_comm = ddp_s[0] + local * 4 * ddp_s[1]
            if hsdp:  # the first micro-batch's hooks and each unit's all-reduce start-up, beyond a further one's
                layers = sum(b in model.blocks for st in lay.rank_stages[0] for b in lay.stages[st])
                dp_comm += (hsdp[0] - hsdp[2]) + (hsdp[1] - hsdp[3]) * layers
            if plan.codec == "powersgd":
                dp_comm += _powersgd_s(model, dev, dp_link, n, tp)
            if ddp_s and plan.strategy() == "ddp" and plan.codec != "none":
                # a codec's hook replaces DDP's all-reduce, not the reducer around it: DDP's
                # calibrated cost a step, less the all-reduce's start-up it includes
                dp_comm += max(0.0, ddp_s[0] - 2 * (n - 1) * dp_link.ab("all_reduce")[0])
            if plan.zero == 1:  # the updated shards to every rank after the step: torch's
                # ZeroRedundancyOptimizer broadcasts each parameter tensor from its owner, one
                # broadcast after another, each paying the link's start-up
                if dev.zero1_sync_s:  # as calibrated: its step beyond AdamW's, per tensor and per byte
                    dp_comm += lay.local_tensors * dev.zero1_sync_s[0] + local * p_bytes * dev.zero1_sync_s[1]
                else:
                    dp_comm += lay.local_tensors * cc.broadcast(local * p_bytes / max(1, lay.local_tensors), n,
                                                                dp_link)
        else:
            # FSDP2 gathers each block's parameters for every micro-batch's forward (and again for its
            # backward under ZeRO-3, which frees them after forward), prefetching the next block's
            # behind this one's compute; gradients are reduce-scattered once, after the last micro-batch
            # One collective per FSDP unit (each block, and the root's own parameters), each with its
            # start-up; around each, FSDP2 copies the shard in and the gathered tensors out (and the
            # gradients in, the reduced shard out): memory traffic of the unit's bytes (1 + 1/n).
            units = [b.params / tp for st in lay.rank_stages[0] for b in lay.stages[st] if b in model.blocks]
            units.append(max(0.0, local - sum(units)))
            gathers = (2 if plan.zero == 3 else 1) * plan.microbatches
            rs = sum(cc.reduce_scatter(u * 4, n, dp_link) for u in units)
            ag = gathers * sum(cc.all_gather(u * p_bytes, n, dp_link) for u in units)
            copies = (gathers * p_bytes + 4) * local * (1 + 1 / n) / dev.memory_Bps
            hidden = overlap * plan.microbatches * (sum(f_times) + sum(b_times)) / pp
            one_block = cc.all_gather(max(units) * p_bytes, n, dp_link) + cc.reduce_scatter(max(units) * 4, n, dp_link)
            fixed_s = 0.0
            if fixed := dev.fsdp_fixed_s.get(f"zero{plan.zero}"):
                # calibrated on the built-in GPT: FSDP2's fixed cost per block and at the ends, its
                # collectives' start-up included, per micro-batch; the collectives' bytes on top
                ends, per_block = fixed
                fixed_s = plan.microbatches * (ends + per_block * (len(units) - 1))
                ag_start, rs_start = (n - 1) * dp_link.ab("all_gather")[0], (n - 1) * dp_link.ab("reduce_scatter")[0]
                rs, ag = rs - len(units) * rs_start, ag - gathers * len(units) * ag_start
                one_block -= ag_start + rs_start
            if dp_link.name == "loopback":  # as whole steps under FSDP2 paid for its bytes (calibrated)
                paid = dev.fsdp_factor.get(f"zero{plan.zero}", 1.0)
                rs, ag, copies, one_block = rs * paid, ag * paid, copies * paid, one_block * paid
            dp_comm = max(one_block, rs + ag - hidden) + copies + fixed_s
    elif plan.family in ("local_sgd", "diloco"):  # one all-reduce of the parameters every H steps
        wire = local * 4 * codec_fraction(plan.codec, model)
        dp_comm = (cc.all_reduce(wire, plan.dp, dp_link)
                   + SYNC_PASSES[plan.family] * local * 4 / dev.memory_Bps) / plan.sync_every
    elif plan.family == "parameter_server":
        # each worker pushes its gradient and pulls the parameters, split over the servers; a
        # server's link carries every worker's share: the slower of the two sets the pace
        wire = local * 4 * codec_fraction(plan.codec, model)
        link = cluster.link(plan.devices)
        dp_comm = max(2 * plan.servers * cc.p2p(wire / plan.servers, link),
                      2 * plan.dp * cc.p2p(wire / plan.servers, link))
        # and the protocol's copies (server.py, worker.py), read and written at memory bandwidth:
        # a worker flattens its gradient into one message and copies the parameters it pulls into
        # its own; a BSP server copies the first gradient, adds each further one, averages them
        # and flattens its parameters for the replies (ASP and SSP: that last alone, per push)
        shard = local * 4 / plan.servers
        server = (2 + 3 * (plan.dp - 1) + 2 + 2) if plan.mode == "bsp" else 2
        dp_comm += (2 * 2 * local * 4 + server * shard) / dev.memory_Bps
    est.bytes_per_step += _dp_bytes(plan, model, local)
    if tp > 1:  # 4 all-reduces per layer and micro-batch (2 forward, 2 backward), ring bytes
        est.bytes_per_step += plan.microbatches * sum(
            4 * cc.wire_bytes_all_reduce(b.tp_bytes * mb, tp) for st in lay.rank_stages[0] for b in lay.stages[st])
    est.staleness = {"local_sgd": plan.sync_every - 1, "diloco": plan.sync_every - 1}.get(plan.family, 0.0)
    if plan.family == "parameter_server" and plan.mode != "bsp":  # the other workers' pushes since this one pulled
        est.staleness = (plan.dp - 1) * slowdown
    est.comm_s = dp_comm + tp_share
    # the optimizer on this device's shard (ZeRO-1/2/3 split it); a parameter server's workers wait
    # for a server's update of its shard before they pull
    if plan.family == "parameter_server":
        shard, tensors = local / plan.servers, lay.local_tensors / plan.servers
    else:
        shard, tensors = local / (plan.dp if plan.zero and plan.dp > 1 else 1), lay.local_tensors
    est.optimizer_s = _update_s(plan, dev, tensors, shard)
    if plan.family == "sync" and plan.devices > 1 and any(dev.update_s):
        # paratrain's trainer, as calibrated: every rank steps together, agreeing over the world on
        # the non-finite check and on whether to stop, the loss shared along the pipeline and
        # averaged over dp: all-reduces of a few floats, each a step
        small = [(plan.devices, 2), (plan.dp, plan.dp > 1), (plan.pp, plan.pp > 1)]
        est.optimizer_s += sum(k * cc.all_reduce(8.0 * n, n, cluster.link(n)) for n, k in small)
    est.step_s = pipeline_s + dp_comm + est.optimizer_s


def _powersgd_s(model: ModelProfile, dev, link, n: int, tp: int) -> float:
    """PowerSGD's own work in torch's hook, beyond its bytes (Vogels et al. 2019, Algorithm 1 with
    error feedback): per compressed n x k gradient, P = MQ, Q = M^T P and the approximation PQ^T
    (2nkr FLOPs each at that product's rate), P's Gram-Schmidt (per column: a norm and a division,
    and against each earlier column a dot product and a subtraction); over every gradient the error
    added in, the copy and the new error (about 40 bytes a value). Its three all-reduces (the
    uncompressed tensors, then P, then Q) each pay the link's start-up; `codec_fraction` counts
    their bytes."""
    r = POWERSGD_RANK
    seconds, ops = 0.0, 0
    for rows, cols, split in [g for b in model.blocks for g in b.gemms] + list(model.last.gemms):
        rows, cols = (rows / tp, cols) if split == "n" else (rows, cols / tp)
        if (rows + cols) * r >= rows * cols:
            continue
        work = 2 * rows * cols * r
        seconds += 3 * work / dev.rate(work, "fp32")
        ops += 6 + 2 * r + 2 * r * (r - 1) // 2
    params = model.params / tp
    alpha = link.ab("all_reduce")[0]
    return seconds + ops * dev.op_s + 40 * params / dev.memory_Bps + 2 * 2 * (n - 1) * alpha


def _update_s(plan: Plan, dev, tensors: int, shard: float) -> float:
    """The update after backward on `shard` parameters: on a calibrated CPU, a cost per tensor (eager
    AdamW's operators, clipping's and the non-finite check's norms) and per parameter, through
    DTensor's dispatch where the parameters are DTensors (FSDP2: ZeRO-2/3; tensor parallelism);
    ZeroRedundancyOptimizer (ZeRO-1) steps on its share of the tensors. Elsewhere memory-bound."""
    # hybrid's dp axis is FSDP2 even where it replicates: its parameters are DTensors too
    dtensor = plan.tp > 1 or (plan.dp > 1 and (plan.zero >= 2 or plan.strategy() == "hybrid"))
    per_tensor, per_param = dev.dtensor_update_s if dtensor else dev.update_s
    if not (per_tensor or per_param):
        return shard * ADAM_BYTES / dev.memory_Bps
    if plan.zero == 1 and plan.dp > 1:
        tensors = tensors / plan.dp
    return tensors * per_tensor + shard * per_param


def _dp_bytes(plan: Plan, model: ModelProfile, local: float) -> float:
    """Bytes a device sends a step on the data-parallel axis (ring all-reduce: 2(n-1)/n of the
    gradient; ZeRO: the all-gathers and the reduce-scatter; local SGD once every H steps; a
    parameter-server worker its gradient and, back, the parameters)."""
    n, grad = plan.dp, local * 4 * codec_fraction(plan.codec, model)
    if plan.family == "parameter_server":
        return 2 * grad
    if n <= 1:
        return 0.0
    ring = (n - 1) / n
    if plan.family in ("local_sgd", "diloco"):
        return 2 * ring * grad / plan.sync_every
    p_bytes = param_bytes(plan.dtype)[0]
    if plan.zero <= 1:
        return 2 * ring * grad + (ring * local * p_bytes if plan.zero == 1 else 0.0)
    gathers = (2 if plan.zero == 3 else 1) * plan.microbatches
    return ring * (local * 4 + gathers * local * p_bytes)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"

