"""Pipeline bubbles, ZeRO model-state bytes and pipeline activation memory, measured against theory.

Everything runs in one spawn of 2 CPU ranks on gloo (one process group; each configuration gets
its own Topology and Trainer on it), and prints three tables:

1. Bubble: for p = 2 ranks, every pipeline schedule and m micro-batches, each rank records when
   each of its stages ran each micro-batch's forward / backward / weight work (`strategy.events`).
   The step's bubble is `measured_bubble` over both ranks' events (1 - busy / span, averaged over
   ranks; perf_counter is CLOCK_MONOTONIC, shared by the processes of one machine), median over
   the measured steps after warm-up, next to `theory_bubble(p, m, v)` = ((p-1)/v) / (m + (p-1)/v).
   Goal: within 1.2x of theory for m >= p. Zero-bubble schedules may beat that theory: it is the
   interleaved 1F1B formula, and they fill part of the bubble with weight-gradient work.
2. Model states: per-rank bytes of parameters, gradients and AdamW state (`state_bytes()`), taken
   by an optimizer step pre-hook (after backward, before the update; at the last of 3 steps, when
   optimizer state exists), for ddp and ZeRO 1/2/3 against ZeRO's fp32 Adam formulas. Goal:
   within 10%. A forward hook on the whole model also takes the parameter bytes resident at the
   end of forward (sharded copies + what FSDP2 has all-gathered), the peak for zero2.
3. Activations: peak bytes of tensors saved for backward per rank under GPipe and 1F1B
   (`torch.autograd.graph.saved_tensors_hooks` around the step; distinct storages, parameters
   excluded; a weakref.finalize on the packed handle subtracts the bytes when autograd frees
   them). Theory: GPipe keeps all m micro-batches live, 1F1B at most p - rank of them.

    python benchmarks/pipeline.py [--quick] [--warmup 2] [--steps 5] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import weakref

import torch
import torch.distributed as dist

P = 2  # pipeline ranks = processes
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_zb", 2), ("zbv", 2)]
BASE = ["model.name=gpt", "model.n_layer=8", "model.n_head=4", "model.d_model=256", "model.block_size=64",
        "training.global_batch_size=32", "training.steps=1000000", "training.eval_every=0",
        "optimizer.name=adamw", "optimizer.lr=1e-3", "run.progress=off", "checkpoint.enabled=false",
        "strategy.pipeline.split=time"]
QUICK = ["model.n_layer=4", "model.d_model=128"]


# ---------------------------------------------------------------------------- on each rank


def _trainer(sets: list[str], data, run_dir: str):
    """A Topology on the existing group and a Trainer; ConfigError if the layout is rejected."""
    import paratrain
    from paratrain.strategies import get_strategy
    from paratrain.topology import Topology
    from paratrain.trainer import Trainer

    cfg = paratrain.load_config(None, sets)
    topo = Topology.from_env(cfg.run, lambda n: get_strategy(cfg.strategy.name).parallel_dims(cfg, n))
    return Trainer(cfg, topo, run_dir, datasets=data)


class SavedBytes:
    """Live and peak bytes of the storages autograd holds for backward (parameters excluded)."""

    class Handle:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor):
            self.tensor = tensor

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage address -> [handles alive, bytes]
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.skip:
            return t
        entry = self.refs.setdefault(ptr, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:  # the same storage saved twice (x in two ops, or a view) counts once
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        handle = SavedBytes.Handle(t)
        weakref.finalize(handle, self._release, ptr)
        return handle

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    @staticmethod
    def unpack(h):
        return h.tensor if isinstance(h, SavedBytes.Handle) else h


def bubble_events(sets, data, run_dir, warmup: int, steps: int) -> list[list[tuple]] | str:
    """This rank's events for each measured step, or the ConfigError's message."""
    from paratrain.config import ConfigError

    try:
        trainer = _trainer(sets, data, run_dir)
    except ConfigError as e:
        return str(e)
    out = []
    for i in range(warmup + steps):
        trainer.step()
        if i >= warmup:
            out.append(list(trainer.strategy.events))
    trainer.metrics.close()
    return out


def model_state_bytes(sets, data, run_dir, steps: int = 3) -> dict:
    """state_bytes() before the last optimizer step, and parameter bytes resident at the end of forward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    trainer = _trainer(sets, data, run_dir)
    strategy, seen = trainer.strategy, {}

    def at_forward_end(module, args, output):
        # Runs after FSDP2's own post-forward hook (registered earlier): zero3's blocks are
        # sharded again (DTensors), zero2's stay all-gathered (plain tensors) until their backward.
        params = list(strategy.model.parameters())
        seen["gathered"] = sum(p.numel() * p.element_size() for p in params if not isinstance(p, DTensor))

    strategy.model.register_forward_hook(at_forward_end)
    strategy.optimizer.register_step_pre_hook(lambda *_: seen.update(strategy.state_bytes()))
    for _ in range(steps):
        trainer.step()
    trainer.metrics.close()
    # A gathered parameter's shard stays allocated beside it: shards of all (state_bytes) + gathered.
    shards = seen["params"] if isinstance(strategy.model, FSDPModule) else 0
    seen["params_forward_end"] = seen.pop("gathered") + shards
    return seen


def saved_activation_peak(sets, data, run_dir, warmup: int = 1) -> int:
    trainer = _trainer(sets, data, run_dir)
    for _ in range(warmup):
        trainer.step()
    saved = SavedBytes(trainer.strategy.model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        trainer.step()
    trainer.metrics.close()
    return saved.peak


def rank_main(jobs: list[tuple], extra: list[str]) -> dict:
    """Run every (kind, name, sets, args) job on this rank, one after another, on one process group."""
    import paratrain
    from paratrain.data import build_datasets

    dist.init_process_group("gloo")  # reused by each job's Topology (a second group per process fails)
    data = build_datasets(paratrain.load_config(None, BASE + extra))
    run = {"bubble": bubble_events, "memory": model_state_bytes, "activation": saved_activation_peak}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, name, sets, args) in enumerate(jobs):
            out[(kind, name)] = run[kind](BASE + extra + sets, data, f"{tmp}/{i}", *args)
    return out


# ---------------------------------------------------------------------------- tables


def idle_while_ready(events_by_rank: list[list[tuple]]) -> float:
    """Share of the step a rank sat idle although its next action's input was there (mean over ranks).

    An action is ready when this rank's previous action ended and, for a forward (backward) whose
    previous (next) stage is on another rank, that stage's work on the micro-batch ended. Time from
    ready to start is overhead the theory counts as zero: send/recv, schedule bookkeeping, and
    waiting for a CPU core.
    """
    rank_of = {e[1]: r for r, events in enumerate(events_by_rank) for e in events}
    end = {e[:3]: e[4] for events in events_by_rank for e in events}
    span = max(end.values()) - min(e[3] for events in events_by_rank for e in events)
    idle = []
    for r, events in enumerate(events_by_rank):
        events = sorted(events, key=lambda e: e[3])
        total = 0.0
        for prev, (kind, stage, mb, start, _) in zip(events, events[1:]):
            pred = (kind, stage - 1 if kind == "F" else stage + 1, mb)
            remote = kind != "W" and pred in end and rank_of[pred[1]] != r
            total += max(0.0, start - max(prev[4], end[pred] if remote else prev[4]))
        idle.append(total / span)
    return sum(idle) / len(idle)


def bubble_table(per_rank: list[dict], jobs: list[tuple]) -> None:
    from paratrain.report.timeline import measured_bubble, theory_bubble

    print(f"pipeline bubble, p={P} ranks: measured (median over steps, both ranks) vs theory "
          "((p-1)/v)/(m+(p-1)/v); goal: within 1.2x of theory for m >= p")
    print(f"{'schedule':<17} {'v':>2} {'m':>3} {'measured':>9} {'theory':>7} {'ratio':>6} {'goal':>5} "
          f"{'step ms':>8} {'busy ms/mb':>10} {'max/min':>7} {'idle-ready':>10}")
    met = []
    for kind, name, _, _ in jobs:
        if kind != "bubble":
            continue
        schedule, v, m = name
        row = f"{schedule:<17} {v:>2} {m:>3}"
        results = [r[(kind, name)] for r in per_rank]  # per rank: one list of events per measured step
        if isinstance(results[0], str):
            print(f"{row} {'n/a':>9}   ({results[0].split(': ', 1)[-1][:90]})")
            continue
        steps = [[r[i] for r in results] for i in range(len(results[0]))]
        measured, theory = statistics.median(measured_bubble(s) for s in steps), theory_bubble(P, m, v)
        span = statistics.median(max(e[4] for r in s for e in r) - min(e[3] for r in s for e in r) for s in steps)
        busy = statistics.median(sum(e[4] - e[3] for r in s for e in r) / P for s in steps)
        ready = statistics.median(idle_while_ready(s) for s in steps)
        per_rank_busy = [[sum(e[4] - e[3] for e in r) for r in s] for s in steps]
        imbalance = statistics.median(max(b) / min(b) for b in per_rank_busy)
        goal = "-" if m < P else ("ok" if measured <= 1.2 * theory else "over")
        met += [goal == "ok"] if m >= P else []
        print(f"{row} {measured:>9.3f} {theory:>7.3f} {measured / theory:>6.2f} {goal:>5} "
              f"{1000 * span:>8.0f} {1000 * busy / m:>10.1f} {imbalance:>7.2f} {ready:>10.3f}")
    print(f"m >= p: {sum(met)} of {len(met)} rows within 1.2x of theory.\n"
          "step ms: first to last F/B/W of the step (optimizer step excluded). busy ms/mb: one rank's F+B+W per\n"
          "micro-batch (all its stages). max/min: the busier rank's busy time over the other's (the theory assumes\n"
          "equal stages). idle-ready: share of the step a rank sat idle although its next action's input was there\n"
          "(send/recv, schedule bookkeeping, waiting for a core); the theory counts it as zero, and it grows with\n"
          "the number of actions, m x v.")


def memory_table(per_rank: list[dict]) -> None:
    ddp = per_rank[0][("memory", "ddp")]
    num_params, n = ddp["params"] // 4, P
    # ZeRO (Rajbhandari et al., 2020), fp32 Adam: parameters, gradients, optimizer state, bytes per rank.
    formula = {"ddp": (4, 4, 8), "zero1": (4, 4, 8 / n), "zero2": (4, 4 / n, 8 / n), "zero3": (4 / n, 4 / n, 8 / n)}
    mib = 2 ** 20
    print(f"\nmodel states per rank, {n} ranks, AdamW fp32, P = {num_params:,} parameters: state_bytes() "
          "between backward and optimizer step vs ZeRO's formula; goal: within 10%")
    print(f"{'strategy':<8} {'rank':>4} {'params':>8} {'grads':>8} {'optim':>8} {'total MiB':>9} "
          f"{'formula':>8} {'ratio':>6}   {'params at fwd end':>17} {'ZeRO':>6}")
    for name, (fp, fg, fo) in formula.items():
        for rank, r in enumerate(per_rank):
            s = r[("memory", name)]
            total, expect = s["params"] + s["grads"] + s["optimizer"], (fp + fg + fo) * num_params
            print(f"{name:<8} {rank:>4} {s['params'] / mib:>8.2f} {s['grads'] / mib:>8.2f} "
                  f"{s['optimizer'] / mib:>8.2f} {total / mib:>9.2f} {expect / mib:>8.2f} {total / expect:>6.3f}"
                  f"   {s['params_forward_end'] / mib:>17.2f} {fp * num_params / mib:>6.2f}")
    zero2 = per_rank[0][("memory", "zero2")]
    zero2_vs_zero3 = (zero2["params"] + zero2["grads"] + zero2["optimizer"]) / (16 * num_params / n)
    print("formulas (ZeRO, fp32 Adam): ddp 16P, zero1 4P+4P+8P/N, zero2 4P+12P/N, zero3 16P/N.\n"
          "zero2: FSDP2 keeps only its parameter shard between steps (its zero2 differs from zero3 only in not\n"
          "resharding after forward), so at the optimizer step it holds 4P/N of parameters where ZeRO-2 counts 4P:\n"
          f"its total is {zero2_vs_zero3:.3f}x of 16P/N. Its parameters peak from the end of forward to each "
          "block's backward:\n'params at fwd end' = gathered 4P + its own shard 4P/N, held side by side ('ZeRO': "
          "the formula's\n"
          "parameter term); zero3 has resharded everything by then. Optimizer state includes AdamW's step counters;\n"
          "zero1 splits whole tensors greedily, so its two ranks differ slightly.")


def activation_table(per_rank: list[dict], ms: list[int]) -> None:
    mib = 2 ** 20
    print(f"\npeak activation memory (tensors saved for backward) per rank, p={P}: 1F1B vs GPipe; "
          "goal: 1F1B/GPipe = micro-batches live, min(m, p-rank)/m")
    print(f"{'m':>3} {'rank':>4} {'gpipe MiB':>10} {'1f1b MiB':>9} {'1f1b/gpipe':>11} {'theory':>7}")
    for m in ms:
        for rank, r in enumerate(per_rank):
            g, o = r[("activation", ("gpipe", m))], r[("activation", ("1f1b", m))]
            print(f"{m:>3} {rank:>4} {g / mib:>10.2f} {o / mib:>9.2f} {o / g:>11.3f} {min(m, P - rank) / m:>7.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller model, fewer steps: about a minute")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 2, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per bubble row (default 5, quick 3)")
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (3 if args.quick else 5)
    ms = [1, 2, 4, 8, 16]
    extra = (QUICK if args.quick else []) + args.set

    pipe = lambda s, v, m: ["strategy.name=pipeline", f"strategy.pipeline.schedule={s}",  # noqa: E731
                            f"strategy.pipeline.virtual_stages={v}", f"strategy.pipeline.microbatches={m}"]
    jobs = [("bubble", ("model_parallel", 1, 1), ["strategy.name=model_parallel"], (warmup, steps))]
    jobs += [("bubble", (s, v, m), pipe(s, v, m), (warmup, steps)) for s, v in SCHEDULES for m in ms]
    jobs += [("memory", s, [f"strategy.name={s}"], ()) for s in ("ddp", "zero1", "zero2", "zero3")]
    act_ms = [8] if args.quick else [4, 8]
    jobs += [("activation", (s, m), pipe(s, 1, m), ()) for m in act_ms for s in ("gpipe", "1f1b")]

    import paratrain
    from paratrain.testing import run_ranks

    cfg = paratrain.load_config(None, BASE + extra)  # bad --set values fail here, before any rank starts
    t0 = time.perf_counter()
    per_rank = run_ranks(rank_main, P, jobs, extra, timeout_s=1800)
    m = cfg.model
    print(f"GPT n_layer={m.n_layer} d_model={m.d_model} n_head={m.n_head} block_size={m.block_size}, "
          f"global batch {cfg.training.global_batch_size}, stages split by {cfg.strategy.pipeline.split}; "
          f"{warmup} warm-up + {steps} measured steps per bubble row; {P} ranks on gloo, 1 thread each\n")
    bubble_table(per_rank, jobs)
    memory_table(per_rank)
    activation_table(per_rank, act_ms)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
