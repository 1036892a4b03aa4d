"""When each stage ran each micro-batch's work, and the bytes it sent to its neighbours.

torch.distributed.pipelining gives no per-action timing or byte count, and the schedules call
the stage's methods directly, so `StageClock` wraps three methods of one `PipelineStage`
instance (not its class: other stages and other runs are untouched):

    forward_one_chunk          F: a micro-batch's forward; its output goes to the next stage
    backward_one_chunk         B: its backward (input gradients; with zero bubble, weights later)
    backward_weight_one_chunk  W: the weight-gradient half of a split backward (zero bubble)

plus a forward pre-hook on the stage's module, where the received activations are visible (the
schedule hands them to the stage, not to forward_one_chunk's arguments): their size is what B
sends back. Bytes count only what crosses to another rank (a neighbour stage on the same rank,
as in interleaved and V schedules, sends nothing). Events are (kind, stage, micro-batch, start,
end) in perf_counter seconds: the timeline chart and the measured bubble come from them.
"""
from __future__ import annotations

import time

import torch

KINDS = {"F": "forward_one_chunk", "B": "backward_one_chunk", "W": "backward_weight_one_chunk"}


class StageClock:
    def __init__(self, events: list[tuple]):
        self.events = events  # shared by every stage of this rank
        self.p2p_bytes = 0

    def attach(self, stage, sends_forward: bool, sends_backward: bool) -> None:
        """Time `stage`'s F / B / W and count what it sends to other ranks."""
        input_bytes: dict[int, int] = {}
        last_input = [0]

        def seen(module, args) -> None:
            floats = (a for a in args if torch.is_tensor(a) and a.is_floating_point())
            last_input[0] = sum(a.numel() * a.element_size() for a in floats)

        stage.submod.register_forward_pre_hook(seen)
        for kind, attr in KINDS.items():
            setattr(stage, attr, self._timed(kind, stage.stage_index, getattr(stage, attr), input_bytes, last_input,
                                             sends_forward, sends_backward))

    def _timed(self, kind, index, method, input_bytes, last_input, sends_forward, sends_backward):
        def run(chunk, *args, **kwargs):
            t0 = time.perf_counter()
            out = method(chunk, *args, **kwargs)
            self.events.append((kind, index, chunk, t0, time.perf_counter()))
            if kind == "F":
                input_bytes[chunk] = last_input[0]
                if sends_forward:  # a traced stage may send several tensors (activations and a mask)
                    outs = out if isinstance(out, tuple) else (out,)
                    self.p2p_bytes += sum(t.numel() * t.element_size() for t in outs if torch.is_tensor(t))
            elif kind == "B" and sends_backward:
                self.p2p_bytes += input_bytes.get(chunk, 0)
            return out
        return run

    def take_bytes(self) -> int:
        nbytes, self.p2p_bytes = self.p2p_bytes, 0
        return nbytes
