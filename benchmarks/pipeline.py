"""Pipeline bubbles, ZeRO model-state bytes and pipeline activation memory, measured against theory.

Everything runs in one spawn of 2 CPU ranks on gloo (one process group; each configuration gets
its own Topology and Trainer on it), and prints three tables:

1. Bubble: for p = 2 ranks, every pipeline schedule and m micro-batches of a fixed size (the
   global batch grows with m, as in Narayanan et al.), each rank records when each of its stages
   ran each micro-batch's forward / backward / weight work (`strategy.events`). The step's
   bubble is `measured_bubble` over both ranks' events (1 - busy / span, averaged over ranks;
   perf_counter is CLOCK_MONOTONIC, shared by the processes of one machine), median over the
   measured steps after warm-up, next to `theory_bubble(p, m, v)` = ((p-1)/v) / (m + (p-1)/v).
   Goal: within 1.2x of theory for m >= p. Zero-bubble schedules may beat that theory: it is the
   interleaved 1F1B formula, and they fill part of the bubble with weight-gradient work. A replay
   of the recorded actions with free communication splits the excess into its causes.
   Each rank is pinned to its own core (as `taskset` would): unpinned, the scheduler moves
   ranks between cores mid-action and action times jitter. Stages of 8 blocks each (4 with
   v = 2), so that the embedding and the head weigh little beside a stage's blocks.
2. Model states: per-rank bytes of parameters, gradients and AdamW state (`state_bytes()`) at
   the two points of a step where they peak: the end of forward (a forward hook on the whole
   model; FSDP2's all-gathered parameters counted beside the shards) and the optimizer step (a
   step pre-hook: after backward, before the update), at the last of 3 steps, when optimizer
   state exists; for ddp and ZeRO 1/2/3 against ZeRO's fp32 Adam formulas. Goal: within 10%.
3. Activations: peak bytes of tensors saved for backward per rank under GPipe and 1F1B
   (`torch.autograd.graph.saved_tensors_hooks` around the step; distinct storages, parameters
   excluded; a weakref.finalize on the packed handle subtracts the bytes when autograd frees
   them). Theory: GPipe keeps all m micro-batches live, 1F1B at most p - rank of them.

    python benchmarks/pipeline.py [--quick] [--warmup 2] [--steps 5] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from paratrain.memory import SavedBytes

P = 2  # pipeline ranks = processes
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_zb", 2), ("zbv", 2)]
BASE = ["model.name=gpt", "model.n_layer=16", "model.n_head=8", "model.d_model=512", "model.block_size=64",
        "training.global_batch_size=32", "training.steps=1000000", "training.eval_every=0",
        "optimizer.name=adamw", "optimizer.lr=1e-3", "run.progress=off", "checkpoint.enabled=false",
        "strategy.pipeline.split=time"]
QUICK = ["model.n_layer=4", "model.d_model=128", "model.n_head=4"]
# glibc malloc: serve activations from the heap and keep freed memory (no mmap / munmap per tensor),
# so that GPipe, which holds every micro-batch's activations, does not pay a page fault per fresh
# page in its forwards (the effect tcmalloc or jemalloc have, as PyTorch's CPU tuning guide advises).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2 ** 30)}


# ---------------------------------------------------------------------------- on each rank


def _trainer(sets: list[str], data, run_dir: str):
    """A Topology on the existing group and a Trainer; ConfigError if the layout is rejected."""
    import paratrain
    from paratrain.strategies import layout
    from paratrain.topology import Topology
    from paratrain.trainer import Trainer

    cfg = paratrain.load_config(None, sets)
    topo = Topology.from_env(cfg.run, lambda n: layout(cfg, n))
    return Trainer(cfg, topo, run_dir, datasets=data)


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
    """Model-state bytes at the two points of a step where they peak: the end of forward and the
    optimizer step (after backward, before the update), at the last of `steps` steps."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from paratrain.strategies.base import state_bytes

    trainer = _trainer(sets, data, run_dir)
    strategy, seen = trainer.strategy, {}
    fsdp = isinstance(strategy.model, FSDPModule)

    def at_forward_end(module, args, output):
        # Runs after FSDP2's own post-forward hook (registered earlier): zero3's blocks are
        # sharded again, zero2's stay all-gathered until their backward. The gathered copies are
        # plain tensors in the module, beside the shards the optimizer holds.
        s = state_bytes(strategy)
        gathered = sum(p.numel() * p.element_size() for p in strategy.model.parameters()
                       if not isinstance(p, DTensor)) if fsdp else 0
        seen["forward_end"] = {**s, "params": s["params"] + gathered}

    strategy.model.register_forward_hook(at_forward_end)
    strategy.optimizer.register_step_pre_hook(lambda *_: seen.update(step=state_bytes(strategy)))
    for _ in range(steps):
        trainer.step()
    trainer.metrics.close()
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


def rank_main(jobs: list[tuple], extra: list[str], pin: bool) -> dict:
    """Run every (kind, name, sets, args) job on this rank, one after another, on one process group."""
    import paratrain
    from paratrain.data import build_datasets

    if pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= P:
        # One core per rank (taskset-style), before gloo starts its threads so they inherit it:
        # without it the scheduler moves ranks between cores mid-action, and per-action times jitter.
        os.sched_setaffinity(0, {int(os.environ["RANK"])})
    dist.init_process_group("gloo")  # reused by each job's Topology (a second group per process fails)
    data = build_datasets(paratrain.load_config(None, BASE + extra))
    run = {"bubble": bubble_events, "memory": model_state_bytes, "activation": saved_activation_peak}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, name, sets, args) in enumerate(jobs):
            out[(kind, name)] = run[kind](BASE + extra + sets, data, f"{tmp}/{i}", *args)
    return out


# ---------------------------------------------------------------------------- tables


def replay_bubble(events_by_rank: list[list[tuple]], equal: bool = False) -> float:
    """The bubble the same step would have with free communication: each rank runs its recorded
    actions in the recorded order, each as soon as the rank is free and its input exists (a
    forward after the previous stage's forward of the micro-batch, a backward after the next
    stage's backward, or after its own forward on the last stage; W after B), for as long as it
    took. `equal`: every F (B, W) as long as the mean F (B, W), i.e. the theory's equal stages."""
    events_by_rank = [[tuple(e) for e in events] for events in events_by_rank]
    took = {e[:3]: e[4] - e[3] for events in events_by_rank for e in events}
    if equal:
        kinds = {k: [d for a, d in took.items() if a[0] == k] for k in {a[0] for a in took}}
        took = {a: sum(kinds[a[0]]) / len(kinds[a[0]]) for a in took}
    last = max(a[1] for a in took)
    needs = {"F": lambda s, mb: ("F", s - 1, mb) if s > 0 else None,
             "B": lambda s, mb: ("B", s + 1, mb) if s < last else ("F", s, mb),
             "W": lambda s, mb: ("B", s, mb)}
    queues = [sorted(events, key=lambda e: e[3]) for events in events_by_rank]
    end, free, pos, moved = {}, [0.0] * len(queues), [0] * len(queues), True
    while moved:  # run each rank's queue as far as its inputs allow, until nothing moves
        moved = False
        for r, queue in enumerate(queues):
            while pos[r] < len(queue):
                kind, stage, mb = queue[pos[r]][:3]
                dep = needs[kind](stage, mb)
                if dep is not None and dep not in end:
                    break
                start = max(free[r], end[dep] if dep is not None else 0.0)
                free[r] = end[(kind, stage, mb)] = start + took[(kind, stage, mb)]
                pos[r], moved = pos[r] + 1, True
    span = max(end.values())
    return sum(1 - sum(took[e[:3]] for e in events) / span for events in queues) / len(queues)


def bubble_table(per_rank: list[dict], jobs: list[tuple]) -> None:
    from paratrain.report.timeline import measured_bubble, theory_bubble

    print(f"pipeline bubble, p={P} ranks: measured (median over steps, both ranks) vs theory "
          "((p-1)/v)/(m+(p-1)/v); goal: within 1.2x of theory for m >= p")
    print(f"{'schedule':<17} {'v':>2} {'m':>3} {'measured':>9} {'theory':>7} {'ratio':>6} {'goal':>5} "
          f"{'replay':>7} {'equal':>6} {'step ms':>8} {'busy ms/mb':>10} {'max/min':>7}")
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
        replay = statistics.median(replay_bubble(s) for s in steps)
        equal = statistics.median(replay_bubble(s, equal=True) for s in steps)
        per_rank_busy = [[sum(e[4] - e[3] for e in r) for r in s] for s in steps]
        imbalance = statistics.median(max(b) / min(b) for b in per_rank_busy)
        goal = "-" if m < P else ("ok" if measured <= 1.2 * theory else "over")
        met += [goal == "ok"] if m >= P else []
        print(f"{row} {measured:>9.3f} {theory:>7.3f} {measured / theory:>6.2f} {goal:>5} "
              f"{replay:>7.3f} {equal:>6.3f} {1000 * span:>8.0f} {1000 * busy / m:>10.1f} {imbalance:>7.2f}")
    print(f"m >= p: {sum(met)} of {len(met)} rows within 1.2x of theory.\n"
          "replay: the bubble of the same actions, in the same order and for as long as each took, had communication\n"
          "been free; equal: the same with every F (B, W) as long as their mean, the theory's equal stages. So\n"
          "measured - replay is the cost of sending (send/recv, schedule bookkeeping and, on a CPU whose cores all\n"
          "compute, waiting for a core to move the bytes), replay - equal that of unequal or jittery actions, and\n"
          "equal vs theory checks the schedule itself. step ms: first to last F/B/W of the step (optimizer step\n"
          "excluded). busy ms/mb: one rank's F+B+W per micro-batch (all its stages). max/min: the busier rank's busy\n"
          "time over the other's.")


def memory_table(per_rank: list[dict]) -> None:
    ddp = per_rank[0][("memory", "ddp")]["step"]
    num_params, n = ddp["params"] // 4, P
    # ZeRO (Rajbhandari et al., 2020), fp32 Adam: parameters, gradients, optimizer state, bytes per rank.
    formula = {"ddp": 16, "zero1": 8 + 8 / n, "zero2": 4 + 12 / n, "zero3": 16 / n}
    mib = 2 ** 20
    print(f"\nmodel states per rank, {n} ranks, AdamW fp32, P = {num_params:,} parameters: peak of the bytes held at "
          "the end of forward and at the optimizer step, vs ZeRO's formula; goal: within 10%")
    print(f"{'strategy':<8} {'rank':>4} {'at fwd end: params':>18} {'grads':>6} {'optim':>6} {'| at step: params':>17} "
          f"{'grads':>6} {'optim':>6} {'| peak MiB':>10} {'formula':>8} {'ratio':>6}")
    total = lambda s: s["params"] + s["grads"] + s["optimizer"]  # noqa: E731
    for name, per_param in formula.items():
        for rank, r in enumerate(per_rank):
            f, s = r[("memory", name)]["forward_end"], r[("memory", name)]["step"]
            peak, expect = max(total(f), total(s)), per_param * num_params
            print(f"{name:<8} {rank:>4} {f['params'] / mib:>18.2f} {f['grads'] / mib:>6.2f} "
                  f"{f['optimizer'] / mib:>6.2f} {s['params'] / mib:>17.2f} {s['grads'] / mib:>6.2f} "
                  f"{s['optimizer'] / mib:>6.2f} "
                  f"{peak / mib:>10.2f} {expect / mib:>8.2f} {peak / expect:>6.3f}")
    print("formulas (ZeRO, fp32 Adam): ddp 16P, zero1 4P+4P+8P/N, zero2 4P+12P/N, zero3 16P/N. Transients of\n"
          "one block (zero3's gathered block, a block's unsharded gradients before reduce-scatter) are not counted.\n"
          "zero2 is FSDP2 without resharding after forward: it holds the full parameters (4P, all-gathered) from\n"
          "forward to each block's backward, beside its own fp32 shard (4P/N) and the sharded optimizer state;\n"
          "gradients are reduce-scattered block by block and the gathered parameters freed as backward goes, so its\n"
          "peak is at the end of forward, 4P + 4P/N + 8P/N = ZeRO-2's 4P + 12P/N (the shard takes the place of\n"
          "ZeRO-2's gradient shard). Between steps it keeps only shards, as zero3 does. Optimizer state includes\n"
          "AdamW's step counters; zero1 splits whole tensors greedily, so its two ranks differ slightly.")


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
    p.add_argument("--quick", action="store_true",
                   help="smaller model, fewer steps: half a minute; a smoke run, too little work per action "
                        "for the bubble goal")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 2, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per bubble row (default 5, quick 3)")
    p.add_argument("--microbatch-size", type=int, default=8, help="sequences per micro-batch in the bubble rows")
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="m of the bubble rows")
    p.add_argument("--only", choices=["bubble", "memory", "activation"], nargs="+", default=None,
                   help="run only these tables")
    p.add_argument("--schedules", nargs="+", default=[s for s, _ in SCHEDULES], help="schedules of the bubble rows")
    p.add_argument("--no-pin", action="store_true", help="do not pin each rank to its own core")
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (3 if args.quick else 5)
    ms = args.microbatches
    extra = (QUICK if args.quick else []) + args.set

    pipe = lambda s, v, m: ["strategy.name=pipeline", f"strategy.pipeline.schedule={s}",  # noqa: E731
                            f"strategy.pipeline.virtual_stages={v}", f"strategy.pipeline.microbatches={m}"]
    tables = args.only or ["bubble", "memory", "activation"]
    jobs = []
    if "bubble" in tables:  # a fixed micro-batch size: the global batch grows with m, as in Narayanan et al.
        mb = args.microbatch_size
        jobs += [("bubble", ("model_parallel", 1, 1), ["strategy.name=model_parallel",
                                                       f"training.global_batch_size={mb}"], (warmup, steps))]
        jobs += [("bubble", (s, v, m), pipe(s, v, m) + [f"training.global_batch_size={mb * m}"], (warmup, steps))
                 for s, v in SCHEDULES if s in args.schedules for m in ms]
    if "memory" in tables:
        jobs += [("memory", s, [f"strategy.name={s}"], ()) for s in ("ddp", "zero1", "zero2", "zero3")]
    act_ms = [8] if args.quick else [4, 8]
    if "activation" in tables:
        jobs += [("activation", (s, m), pipe(s, 1, m), ()) for m in act_ms for s in ("gpipe", "1f1b")]

    import paratrain
    from paratrain.testing import run_ranks

    cfg = paratrain.load_config(None, BASE + extra)  # bad --set values fail here, before any rank starts
    os.environ.update(MALLOC)  # read by each spawned rank's C library at start-up
    t0 = time.perf_counter()
    per_rank = run_ranks(rank_main, P, jobs, extra, not args.no_pin, timeout_s=1800)
    m = cfg.model
    print(f"GPT n_layer={m.n_layer} d_model={m.d_model} n_head={m.n_head} block_size={m.block_size}, "
          f"stages split by {cfg.strategy.pipeline.split}; bubble rows: {args.microbatch_size} sequences per "
          f"micro-batch (global batch = m x that), ranks pinned to a core each: {not args.no_pin}; other tables: "
          f"global batch {cfg.training.global_batch_size}; "
          f"{warmup} warm-up + {steps} measured steps per bubble row; {P} ranks on gloo, 1 thread each\n")
    if "bubble" in tables:
        bubble_table(per_rank, jobs)
    if "memory" in tables:
        memory_table(per_rank)
    if "activation" in tables:
        activation_table(per_rank, act_ms)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
