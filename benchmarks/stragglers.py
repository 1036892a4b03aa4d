"""What one slow worker costs the others: synchronous vs asynchronous and local-update strategies.

Every strategy trains the same GPT (d_model 128, 4 layers, block 64, AdamW, the same per-worker
batch) on 3 processes twice in one spawn of the ranks (`run_ranks`), one strategy after another:
once healthy and once with worker rank 1 slowed 3x. Strategies: ddp; parameter_server BSP, ASP
and SSP (2 workers + 1 server, rank 2; ASP and SSP at lr / 2 as parameter_server.py advises),
and SSP with `strategy.ps.drop_behind` (the straggler drops its late steps instead of holding the
fast worker at the staleness gate); local_sgd and diloco (H = 8), and diloco with time-bounded
rounds (`strategy.local_sgd.deadline = "auto"`: the straggler drops the inner steps it has no time
for); gossip (ring of 3). A row whose config keys this paratrain does not know is left out, with a
note. Evaluation and checkpoints are off until the end, so nothing but the strategy itself
synchronises the ranks. Plain SSP and plain DiLoCo wait for the straggler by definition (at the
gate, at each sync): the goal of >= 80% is theirs with dropping on.

How the straggler is slowed (`--fault`): `delay` (default) sets `[faults] rank=1, delay_s=` twice
rank 1's median step time in that strategy's healthy run, so that each of its steps takes about
3x as long as when healthy. `slowdown` sets `[faults] rank=1, slowdown=3` (it sleeps twice its
measured compute time), which here slows it only ~1.8x: when the other ranks wait for it, it
computes alone on a core and its compute time falls to about half the contended one it had when
healthy (3 processes, 2 cores). `slow kept` below shows how slow the straggler really was.

From each run's per-step JSON lines (metrics/rank<R>.jsonl) it reports:
  * fast kept: samples/s of the unslowed workers (their own samples over their own step time,
    first WARMUP steps dropped, waits included), slowed run / healthy run; `slow kept` is the same for rank 1,
    the straggler itself: a synchronous strategy cannot beat it. A step a straggler dropped counts
    its (short) time and no samples; `dropped` is the fraction of the straggler's steps dropped.
  * loss at equal wall time: each step of rank 0 (always a fast worker) is time-stamped with the
    cumulative step_s; T is the shortest run's total (every run reaches T); the loss is the mean
    of rank 0's last 3 training losses at or before T (the mean over the replicas for ddp and at
    local-SGD / DiLoCo synchronisations; otherwise rank 0's own batch's), with the steps it had
    done by T.

3 processes share 2 cores: a sleeping straggler frees a core, so the others compute faster than
when healthy, and timings move when other work runs on the machine (run it on a quiet one); read ratios, not ms.

    python benchmarks/stragglers.py [--quick] [--fault delay|slowdown] [--steps N] [--batch B] [--out DIR]
                                    [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

SLOW_RANK, WORLD, WARMUP, LOSS_WINDOW = 1, 3, 4, 3
BASE = ["model.name=gpt", "model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.block_size=64",
        "optimizer.name=adamw", "training.eval_every=0", "training.eval_batches=2", "run.progress=off",
        "checkpoint.enabled=false"]
LR = 1e-3
H = ["strategy.local_sgd.sync_every=8"]
# name -> (config sets, number of training workers); ASP / SSP at lr / workers (parameter_server.py).
STRATEGIES = {
    "ddp": (["strategy.name=ddp"], 3),
    "ps bsp": (["strategy.name=parameter_server", "strategy.ps.mode=bsp"], 2),
    "ps asp": (["strategy.name=parameter_server", "strategy.ps.mode=asp", f"optimizer.lr={LR / 2}"], 2),
    "ps ssp s=2": (["strategy.name=parameter_server", "strategy.ps.mode=ssp", "strategy.ps.staleness=2",
                    f"optimizer.lr={LR / 2}"], 2),
    "ps ssp drop": (["strategy.name=parameter_server", "strategy.ps.mode=ssp", "strategy.ps.staleness=2",
                     "strategy.ps.drop_behind=true", f"optimizer.lr={LR / 2}"], 2),
    "local_sgd H=8": (["strategy.name=local_sgd", *H], 3),
    "diloco H=8": (["strategy.name=diloco", *H], 3),
    "diloco deadline": (["strategy.name=diloco", *H, "strategy.local_sgd.deadline=auto"], 3),
    "gossip ring": (["strategy.name=gossip", "strategy.gossip.graph=ring"], 3),
}
# Plain SSP and DiLoCo have no goal of their own here: they wait for the straggler by definition.
GOALS = {"ps asp": ">= 0.80", "ps ssp drop": ">= 0.80", "diloco deadline": ">= 0.80",
         "ddp": "about 1/3", "ps bsp": "about 1/3"}
THIRD = (1 / 3 - 0.1, 1 / 3 + 0.1)  # what "about a third" is taken to mean


def fault_sets(fault: str, healthy_dir: str) -> list[str]:
    """The straggler's [faults]: 3x its healthy step time (`delay`), or 3x its compute (`slowdown`)."""
    if fault == "slowdown":
        return [f"faults.rank={SLOW_RANK}", "faults.slowdown=3"]
    times = sorted(r["step_s"] for r in steps_of(Path(healthy_dir), SLOW_RANK)[WARMUP:] if not r.get("skipped"))
    return [f"faults.rank={SLOW_RANK}", f"faults.delay_s={2 * times[len(times) // 2]:.4f}"]


def bench_rank(healthy_dir: str, slow_dir: str, sets: list[str], fault: str) -> dict:
    """The healthy training, then the slowed one, in one process group; returns wall times and faults."""
    import torch.distributed as dist

    import paratrain

    dist.init_process_group("gloo")  # kept across the trainings: train() leaves a caller's group alone
    out = {}
    for run_dir in (healthy_dir, slow_dir):
        extra = fault_sets(fault, healthy_dir) if run_dir == slow_dir else []
        cfg = paratrain.load_config(None, [*sets, *extra, f"run.dir={json.dumps(run_dir)}"])
        t0 = time.perf_counter()
        paratrain.train(cfg)
        out[run_dir] = time.perf_counter() - t0
        out["faults"] = extra
        dist.barrier()  # every rank's metrics are written before the next run reads them
    return out


def steps_of(run_dir: Path, rank: int) -> list[dict]:
    lines = (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


def samples_per_s(run_dir: Path, ranks) -> float:
    """Sum over `ranks` of each one's own samples / own step time after the warm-up steps. Every
    step counts, the long ones too: a step that waits for the straggler (a synchronisation, the
    SSP gate) is what this measures. Dropped steps (`skipped`) count their time and no samples."""
    total = 0.0
    for rank in ranks:
        recs = steps_of(run_dir, rank)[WARMUP:]
        total += sum(r["samples"] for r in recs) / sum(r["step_s"] for r in recs)
    return total


def dropped_fraction(run_dir: Path, rank: int) -> float:
    recs = steps_of(run_dir, rank)
    return sum(bool(r.get("skipped")) for r in recs) / len(recs)


def loss_at(run_dir: Path, budget_s: float) -> tuple[float, int]:
    """Mean of rank 0's last LOSS_WINDOW losses with cumulative step time <= budget_s (of the steps
    it computed: a dropped step has no loss); steps done."""
    elapsed, losses, steps = 0.0, [], 0
    for r in steps_of(run_dir, 0):
        elapsed += r["step_s"]
        if elapsed > budget_s:
            break
        steps += 1
        if not r.get("skipped"):
            losses.append(r["loss"])
    window = losses[-LOSS_WINDOW:]
    return (sum(window) / len(window) if window else math.nan), steps


def common_sets(sets: list[str], steps: int, batch: int, workers: int) -> list[str]:
    return [*BASE, f"optimizer.lr={LR}", *sets, f"training.steps={steps}",
            f"training.global_batch_size={batch * workers}"]  # the same batch per worker everywhere


def runnable(names: list[str], steps: int, batch: int) -> list[str]:
    """The rows whose config this paratrain accepts (another change may not have landed yet)."""
    import paratrain

    keep = []
    for name in names:
        sets, workers = STRATEGIES[name]
        try:
            paratrain.load_config(None, common_sets(sets, steps, batch, workers))
            keep.append(name)
        except paratrain.ConfigError as e:
            print(f"  {name:<14} left out: {e}", flush=True)
    return keep


def run_all(root: Path, names: list[str], steps: int, batch: int, fault: str) -> dict:
    from paratrain.testing import run_ranks

    results = {}
    for name in names:
        sets, workers = STRATEGIES[name]
        common = common_sets(sets, steps, batch, workers)
        dirs = {kind: str(root / f"{name.replace(' ', '_').replace('=', '')}-{kind}") for kind in ("healthy", "slow")}
        t0 = time.perf_counter()
        out = run_ranks(bench_rank, WORLD, dirs["healthy"], dirs["slow"], common, fault, timeout_s=1200)[0]
        print(f"  {name:<14} healthy {out[dirs['healthy']]:5.1f} s, slowed {out[dirs['slow']]:5.1f} s "
              f"(with start-up {time.perf_counter() - t0:5.1f} s)  {' '.join(out['faults'])}", flush=True)
        fast = [r for r in range(workers) if r != SLOW_RANK]
        h, s = Path(dirs["healthy"]), Path(dirs["slow"])
        results[name] = {
            "dirs": (h, s), "fast_healthy": samples_per_s(h, fast), "fast_slow": samples_per_s(s, fast),
            "slow_kept": samples_per_s(s, [SLOW_RANK]) / samples_per_s(h, [SLOW_RANK]),
            "dropped": dropped_fraction(s, SLOW_RANK),
            "end_s": [sum(r["step_s"] for r in steps_of(d, 0)) for d in (h, s)],
        }
    return results


def verdict(name: str, r: dict) -> str:
    goal, kept = GOALS[name], r["fast_slow"] / r["fast_healthy"]
    met = kept >= 0.80 if goal.startswith(">=") else THIRD[0] <= kept <= THIRD[1]
    band = "" if goal.startswith(">=") else f" ({THIRD[0]:.2f}-{THIRD[1]:.2f})"
    return (f"{name:<14} fast workers keep {kept:.2f} of their healthy throughput (the straggler itself "
            f"{r['slow_kept']:.2f}), goal {goal}{band}: " + ("met" if met else "NOT met"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="24 steps per run, not 64 (~1-2 minutes, not 3-6)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (overrides --quick)")
    p.add_argument("--batch", type=int, default=8, help="samples per worker and step (8: ~40 ms of compute)")
    p.add_argument("--fault", choices=["delay", "slowdown"], default="delay", help="how rank 1 is slowed")
    p.add_argument("--out", default=None, help="keep the run directories here (default: a temporary one)")
    p.add_argument("--only", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES), metavar="NAME",
                   help=f"run only these rows: {', '.join(repr(n) for n in STRATEGIES)}")
    args = p.parse_args()
    steps, batch = args.steps or (24 if args.quick else 64), args.batch

    t0 = time.perf_counter()
    names = runnable(args.only, steps, batch)
    print(f"running {len(names)} strategies x (healthy, rank {SLOW_RANK} slowed 3x) on {WORLD} processes, "
          f"{steps} steps, {batch} samples per worker and step", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        res = run_all(root, names, steps, batch, args.fault)
        budget_s = min(t for r in res.values() for t in r["end_s"])
        for r in res.values():
            r["loss_slow"], r["steps_slow"] = loss_at(r["dirs"][1], budget_s)
            r["loss_healthy"], r["steps_healthy"] = loss_at(r["dirs"][0], budget_s)

    print()
    how = "delay_s = 2 x its healthy step" if args.fault == "delay" else "slowdown = 3"
    print(f"stragglers: GPT d128 x 4 layers, {WORLD} processes, rank {SLOW_RANK} slowed 3x ({how}), {steps} steps, "
          f"{batch} samples/worker/step")
    print("measured: samples/s of the fast (unslowed) workers, slowed run / healthy run, and rank 0's training loss")
    print(f"at equal wall time T = {budget_s:.1f} s (cumulative step time, mean of its last {LOSS_WINDOW} losses)")
    print("goal: ASP, SSP and DiLoCo keep >= 80% of the healthy throughput of the fast workers, where synchronous")
    print("training keeps about a third; SSP and DiLoCo by dropping the straggler's late steps (plain, they wait).")
    print(f"{'strategy':<15} {'fast smp/s':>10} {'slowed':>8} {'fast kept':>9} {'slow kept':>9} {'dropped':>7} "
          f"{'steps@T':>7} {'loss@T':>7} {'healthy: steps@T':>16} {'loss@T':>7}")
    for name, r in res.items():
        kept = r["fast_slow"] / r["fast_healthy"]
        print(f"{name:<15} {r['fast_healthy']:>10.1f} {r['fast_slow']:>8.1f} {kept:>9.2f} {r['slow_kept']:>9.2f} "
              f"{r['dropped']:>7.2f} {r['steps_slow']:>7} {r['loss_slow']:>7.3f} {r['steps_healthy']:>16} "
              f"{r['loss_healthy']:>7.3f}")
    for name in GOALS:
        if name in res:
            print(verdict(name, res[name]))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
