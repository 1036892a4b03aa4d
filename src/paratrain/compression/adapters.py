"""Where codecs meet communication: a DDP comm hook per codec, PowerSGD, and DiLoCo deltas.

One exchange, `exchange_mean`, averages a flat tensor over a group through a codec:

- "allreduce" codecs (fp16, bf16): every rank encodes its 1/n share (so the sum cannot
  overflow more than the mean does) and the payloads are all-reduced in the codec's dtype.
  Bytes: the ring all-reduce of the payload, 2 (n-1)/n * payload_bytes per rank.
- "gather" codecs (topk, randomk, sign, int8): payloads differ in indices or scales and cannot
  be summed, so each rank's payload (packed into one uint8 buffer, equal size on every rank:
  fixed k per tensor, fixed bit count) is all-gathered, every payload decoded and the results
  averaged. Bytes: ring all-gather of the n payloads, (n-1)/n * n * payload_bytes =
  (n-1) * payload_bytes per rank (each rank's payload travels to its n-1 peers).
  int8 is gathered too: summing int8 codes with per-rank scales would be wrong (and overflow).

PowerSGD (Vogels et al., "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization", NeurIPS 2019) is torch's own `powerSGD_hook` (error feedback, warm start); we
only count its bytes, replaying its choice of which gradients to compress: the uncompressed
ones, then P, then Q are three ring all-reduces. Its first `start_powerSGD_iter` = 2 steps
(torch's minimum with error feedback / warm start) are plain all-reduces.
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.

import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from paratrain.comm import CommMeter, counted, ring_allgather_bytes, ring_allreduce_bytes
from paratrain.compression.codecs import Codec, CodecState, pack, unpack

POWERSGD_START_ITER = 2


def exchange_mean(codec: Codec, state: CodecState, flat: torch.Tensor, group,
                  meter: CommMeter) -> torch.futures.Future:
    """Asynchronously average `flat` (1-D fp32) over `group` through `codec`; counts bytes and time."""
    n, t0 = dist.get_world_size(group), time.perf_counter()
    plain = ring_allreduce_bytes(flat.numel() * 4, n)  # the fp32 all-reduce it replaces
    if codec.collective == "allreduce":
        payload = codec.compress(flat / n, state)
        nbytes = ring_allreduce_bytes(codec.payload_bytes(payload), n)
        fut = dist.all_reduce(payload[0], group=group, async_op=True).get_future()

        def decode(f):
            f.value()  # re-raises a failed collective
            return codec.decompress(payload, flat.shape)
    else:
        payload = codec.compress(flat, state)
        mine = pack(payload)
        gathered = [torch.empty_like(mine) for _ in range(n)]
        nbytes = ring_allgather_bytes(n * mine.numel(), n)
        fut = dist.all_gather(gathered, mine, group=group, async_op=True).get_future()

        def decode(f):
            f.value()  # re-raises a failed collective
            return sum(codec.decompress(unpack(buf, payload), flat.shape) for buf in gathered) / n

    return counted(meter, nbytes, t0, fut, decode, uncompressed=plain)


class CodecHookState:
    """Per-DDP-bucket codec states (residuals), keyed by bucket index.

    DDP rebuilds its buckets after the first step; a residual whose size no longer matches its
    bucket is dropped (`Codec.compress` ignores it), which loses at most one step's residual.
    """

    def __init__(self, codec: Codec, group, meter: CommMeter):
        self.codec, self.group, self.meter = codec, group, meter
        self.rank = dist.get_rank(group)
        self.states: dict[int, CodecState] = {}

    def state(self, index: int) -> CodecState:
        if index not in self.states:  # random-k / QSGD draws: independent per rank and bucket
            self.states[index] = CodecState.seeded(self.rank, index)
        return self.states[index]


def codec_hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged through the codec."""
    buf = bucket.buffer()

    def write_back(f):
        buf.copy_(f.value().to(buf.dtype))
        return buf

    return exchange_mean(state.codec, state.state(bucket.index()), buf.reshape(-1).float(),
                         state.group, state.meter).then(write_back)


class PowerSGDHookState:
    def __init__(self, group, meter: CommMeter, rank: int, error_feedback: bool):
        self.group, self.meter, self.world = group, meter, dist.get_world_size(group)
        self.powersgd = torch_powersgd.PowerSGDState(
            process_group=group, matrix_approximation_rank=rank, start_powerSGD_iter=POWERSGD_START_ITER,
            use_error_feedback=error_feedback, warm_start=True, random_seed=0)


def powersgd_bytes(ps: torch_powersgd.PowerSGDState, bucket: dist.GradBucket, n: int) -> int:
    """Bytes per rank of torch's powerSGD_hook on this bucket at this step (before it runs)."""
    buf = bucket.buffer()
    if ps.iter < ps.start_powerSGD_iter:
        return ring_allreduce_bytes(buf.numel() * buf.element_size(), n)
    uncompressed = ps_numel = qs_numel = 0
    for grad in bucket.gradients():
        rows, cols = grad.shape[0], grad.numel() // grad.shape[0]
        rank = min(rows, cols, ps.matrix_approximation_rank)
        if torch_powersgd._should_compress(rows, cols, rank, ps.min_compression_rate)[0]:
            ps_numel, qs_numel = ps_numel + rows * rank, qs_numel + cols * rank
        else:
            uncompressed += grad.numel()
    return sum(ring_allreduce_bytes(numel * buf.element_size(), n) for numel in (uncompressed, ps_numel, qs_numel))


def powersgd_hook(state: PowerSGDHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's powerSGD_hook, plus bytes and launch-to-completion time."""
    t0 = time.perf_counter()
    nbytes = powersgd_bytes(state.powersgd, bucket, state.world)
    buf = bucket.buffer()
    plain = ring_allreduce_bytes(buf.numel() * buf.element_size(), state.world)
    return counted(state.meter, nbytes, t0, torch_powersgd.powerSGD_hook(state.powersgd, bucket), uncompressed=plain)


class DeltaCompressor:
    """Compressed averaging of one flat tensor per sync (DiLoCo's pseudo-gradient), with its
    error-feedback residual carried from sync to sync."""

    def __init__(self, codec: Codec, rank: int):
        self.codec = codec
        self.state = CodecState.seeded(rank)

    def mean(self, flat: torch.Tensor, group, meter: CommMeter) -> torch.Tensor:
        if group is None or dist.get_world_size(group) == 1:
            return flat.clone()
        return exchange_mean(self.codec, self.state, flat, group, meter).wait()
