"""The planner's accuracy and speed: predicted against measured, here and at published scale.

    python benchmarks/planner.py               # the local matrix: every strategy on 2 (and 4) ranks, 2 model sizes
    python benchmarks/planner.py --calibrate --repeat 3   # ... calibrated in the same run, each row run 3 times
    python benchmarks/planner.py --published   # Korthikanti et al. 2022, Table 5, on A100-80GB presets
    python benchmarks/planner.py --scale       # one plan on 10,000 devices; the 1T search on 3,072
    python benchmarks/planner.py --testbed 100mbit   # ddp, ddp + PowerSGD, DiLoCo between 2 testbed hosts (root)

--published: the 22B, 175B, 530B and 1T GPTs of "Reducing Activation Recomputation in Large
Transformer Models" (Korthikanti et al. 2022, Table 3: sequence 2048, vocabulary 51200, tp 8, no
data parallelism, the interleaved schedule with 3 stages per rank for 175B and 530B; Table 5: seconds
per iteration with full recomputation, and with sequence parallelism and selective recomputation),
predicted with the a100-80gb preset, whose constants are datasheet figures and published
measurements (src/paratrain/planner/hardware.py names each source); nothing is fitted to the table.
Megatron-LM's scatter-gather pipeline sends are modelled as it runs them. Goal: every row within 10%.

--scale: the time to evaluate one plan on 10,000 devices (cold: its pipeline order built and
simulated for the first time; warm: its simulation cached, as most of a search's plans find it),
and the whole search for a 1T-parameter transformer on 3,072 A100s. Goals: under 10 ms; under 60 s.

The local matrix runs each strategy for a few steps with `paratrain run` on this machine (after
`paratrain calibrate`, whose figures the predictions use), and prints the predicted step time and
peak memory per rank beside the measured ones (the run's summary.json: the mean step past the
first, synchronisations included, and model states at the optimizer step plus the
saved-activation peak, memory.py). Goals: within 20% on time
and 10% on memory; the planner's first choice the fastest measured plan or within 5% of it.
This machine's speed drifts by 10-40% over minutes (the same run twice in a row: 67 and 110 ms a
step; a calibration's compute_factor 0.90 to 1.13 within the hour): `--calibrate` measures it
before each model size of each pass, a few minutes before the runs it predicts, rather than
hours before, and `--repeat N` runs the matrix N times, forward and backward in turn, each row's
measured step the median of its runs and its prediction the median of theirs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from paratrain.planner.cost import estimate  # noqa: E402
from paratrain.planner.hardware import preset  # noqa: E402
from paratrain.planner.model import transformer  # noqa: E402
from paratrain.planner.plan import Plan  # noqa: E402

# Korthikanti et al. 2022, Table 3 (configurations) and Table 5 (seconds per iteration).
PUBLISHED = [  # name, heads, hidden, layers, tp, pp, GPUs, global batch, micro-batch, stages per rank, full, present
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 4, 1, 1.42, 1.10),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 1, 3, 18.13, 13.75),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 1, 3, 49.05, 37.83),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 1, 1, 94.42, 71.49),
]


def published() -> list[dict]:
    rows = []
    for name, heads, hidden, layers, tp, pp, gpus, batch, micro, v, full, present in PUBLISHED:
        model = transformer(layers, hidden, heads, 51200, 2048, bytes_per_value=2)
        cluster = preset("a100-80gb", gpus)
        schedule = "none" if pp == 1 else "interleaved_1f1b" if v > 1 else "1f1b"
        for label, recompute, sp, seconds in (("full recomputation", "full", False, full),
                                              ("sequence parallel + selective", "selective", True, present)):
            plan = Plan(dp=1, pp=pp, tp=tp, microbatches=batch // micro, schedule=schedule, virtual=v,
                        recompute=recompute, sequence_parallel=sp, dtype="bf16", p2p_scatter=True, sp_regather=True)
            est = estimate(plan, model, cluster, batch)
            rows.append({"model": name, "config": label, "gpus": gpus, "published_s": seconds,
                         "predicted_s": est.step_s, "ratio": est.step_s / seconds, "mfu": est.mfu,
                         "memory_gib": est.memory_bytes / 2**30, "compute_s": est.compute_s, "comm_s": est.comm_s,
                         "bubble_s": est.bubble_s})
    return rows


def print_published(rows: list[dict]) -> None:
    print("Korthikanti et al. 2022, Table 5, on the a100-80gb preset (seconds per iteration):\n")
    print("| model | GPUs | configuration | published | predicted | ratio | compute | exposed comm | bubble "
          "| memory/GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['gpus']} | {r['config']} | {r['published_s']:.2f} s | {r['predicted_s']:.2f} s "
              f"| {r['ratio']:.2f} | {r['compute_s']:.2f} s | {r['comm_s']:.2f} s | {r['bubble_s']:.2f} s "
              f"| {r['memory_gib']:.1f} GiB |")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nGoal: every row within 10%. Worst: {worst:.1%} -> {'met' if worst <= 0.10 else 'MISSED'}")


def scale() -> None:
    from paratrain.planner import schedule
    from paratrain.planner.search import search

    model = transformer(96, 12288, 96, 51200, 2048)  # GPT-3 175B
    plan = Plan(dp=50, pp=25, tp=8, microbatches=32, schedule="1f1b", recompute="selective",
                sequence_parallel=True, dtype="bf16")
    cluster = preset("h100", 10_000)
    import torch.distributed.pipelining.schedules  # noqa: F401 - its import is not the plan's cost
    t0 = time.perf_counter()
    est = estimate(plan, model, cluster, 50 * 32)
    cold = time.perf_counter() - t0
    assert est.fits, est.why_not
    schedule._cached.cache_clear()  # the order stays built; the simulation itself runs again
    t0 = time.perf_counter()
    estimate(plan, model, cluster, 50 * 32)
    simulated = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 100
    for _ in range(n):
        estimate(plan, model, cluster, 50 * 32)
    warm = (time.perf_counter() - t0) / n
    print(f"one plan on 10,000 H100s (GPT-3 175B, {plan.describe()}; {est.step_s:.2f} s a step): "
          f"{cold * 1e3:.0f} ms with torch's schedule order built, {simulated * 1e3:.1f} ms simulated afresh, "
          f"{warm * 1e3:.2f} ms cached (goal < 10 ms: {'met' if simulated < 0.01 else 'MISSED'} simulated afresh)")
    t0 = time.perf_counter()
    found = search(transformer(128, 25600, 160, 51200, 2048), preset("a100-80gb", 3072), 1536, "bf16")
    took = time.perf_counter() - t0
    print(f"search, 1T parameters on 3,072 A100-80GB, global batch 1536: {found.considered} plans, "
          f"{sum(found.dropped.values())} dropped (memory), {took:.1f} s (goal < 60 s: "
          f"{'met' if took < 60 else 'MISSED'}); best: {found.best.plan.describe()}, {found.best.step_s:.1f} s a step")


# ---------------------------------------------------------------------------- the local matrix

SMALL = ["model.n_layer=4", "model.d_model=128", "model.n_head=4", "model.block_size=64"]
LARGE = ["model.n_layer=8", "model.d_model=256", "model.n_head=8", "model.block_size=64"]
COMMON = ["training.global_batch_size=16", "training.eval_every=0", "checkpoint.enabled=false",
          "run.progress=off", "optimizer.name=adamw"]
MATRIX = [  # (name, processes, sets)
    ("ddp", 2, ["strategy.name=ddp"]),
    ("zero1", 2, ["strategy.name=zero1"]),
    ("zero2", 2, ["strategy.name=zero2"]),
    ("zero3", 2, ["strategy.name=zero3"]),
    ("model_parallel", 2, ["strategy.name=model_parallel"]),
    ("pipeline gpipe m4", 2, ["strategy.name=pipeline", "strategy.pipeline.schedule=gpipe"]),
    ("pipeline 1f1b m4", 2, ["strategy.name=pipeline", "strategy.pipeline.schedule=1f1b"]),
    ("pipeline interleaved_1f1b v2 m4", 2, ["strategy.name=pipeline", "strategy.pipeline.schedule=interleaved_1f1b",
                                            "strategy.pipeline.virtual_stages=2"]),
    ("pipeline zbv m4", 2, ["strategy.name=pipeline", "strategy.pipeline.schedule=zbv",
                            "strategy.pipeline.virtual_stages=2"]),
    ("tensor", 2, ["strategy.name=tensor"]),
    ("parameter server BSP", 3, ["strategy.name=parameter_server", "strategy.ps.mode=bsp"]),
    ("local SGD H=4", 2, ["strategy.name=local_sgd", "strategy.local_sgd.sync_every=4"]),
    ("DiLoCo H=4", 2, ["strategy.name=diloco", "strategy.local_sgd.sync_every=4"]),
    ("ddp + PowerSGD", 2, ["strategy.name=ddp", "strategy.compression.codec=powersgd"]),
    ("hybrid dp2 x pp2", 4, ["strategy.name=hybrid", "strategy.dp=2", "strategy.pp=2"]),
    ("hybrid dp2 x tp2", 4, ["strategy.name=hybrid", "strategy.dp=2", "strategy.tp=2"]),
]


# Rows that train differently from one process (asynchronous, or compressed): `paratrain plan` ranks
# them in a table of their own, and `auto` does not run them
DIFFERENT = ("parameter server BSP", "local SGD H=4", "DiLoCo H=4", "ddp + PowerSGD")


def local(steps: int, out: Path, only: list[str] | None, repeat: int = 1, calibrate=None) -> list[dict]:
    """Each row's run `repeat` times, the matrix in turn forward and backward (a drift of the
    machine's speed over the benchmark then falls on every row alike); a row's measured step is the
    median of its runs. `calibrate(path)`: calibrate this machine into `path` before each model
    size of each pass (a few minutes before the runs it predicts), each run predicted with the
    calibration made before it; a row's predicted step is the median of its runs' predictions."""
    from statistics import median

    from paratrain.config import load_config
    from paratrain.planner.commands import predict

    todo = [(size, name, n, sets) for size, model in (("small", SMALL), ("large", LARGE))
            for name, n, sets in MATRIX if not only or name in only]
    runs: dict = {}
    calibration, calibrated_for = None, None
    for r in range(repeat):
        for i, (size, name, nproc, sets) in enumerate(todo if r % 2 == 0 else todo[::-1], 1):
            if calibrate is not None and (r, size) != calibrated_for:
                calibration, calibrated_for = out / f"machine-{r}-{size}.toml", (r, size)
                print(f"calibrating before the {size} rows ...", file=sys.stderr, flush=True)
                calibrate(calibration)
            all_sets = [*COMMON, *model_sets(size), *sets, f"training.steps={steps}"]
            run_dir = out / f"{size}-{name}-{r}".replace(" ", "_")
            print(f"[{r * len(todo) + i}/{repeat * len(todo)}] {size} {name} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "paratrain", "run", "--nproc", str(nproc),
                   *[a for s in [*all_sets, f"run.dir={json.dumps(str(run_dir))}"] for a in ("--set", s)]]
            done = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            got = runs.setdefault((size, name), {"sets": all_sets, "nproc": nproc, "steps": [], "error": None,
                                                 "calibrations": []})
            if done.returncode != 0:
                got["error"] = done.stderr.strip().splitlines()[-1]
                continue
            summary = json.loads((run_dir / "summary.json").read_text())
            got["steps"].append(summary["step_s_steady"])
            got["calibrations"].append(calibration)
            got["measured_bytes"] = summary.get("measured_memory_bytes")
    rows = []
    for (size, name), got in runs.items():
        if not got["steps"]:
            rows.append({"size": size, "name": name, "error": got["error"]})
            continue
        predicted = []
        for path in got["calibrations"]:
            if path is not None:
                os.environ["PARATRAIN_CALIBRATION"] = str(path)
            predicted.append(predict(load_config(None, got["sets"]), got["nproc"]))
        rows.append({"size": size, "name": name, "measured_s": median(got["steps"]), "runs_s": got["steps"],
                     "predicted_s": median(p["step_s"] for p in predicted),
                     "predicted_runs_s": [p["step_s"] for p in predicted],
                     "factors": [_factors(path) for path in got["calibrations"] if path is not None],
                     "measured_bytes": got["measured_bytes"], "predicted_bytes": predicted[-1]["memory_bytes"]})
    return rows


def _factors(path: Path) -> dict:
    """A calibration's whole-step figures (wholestep.py), for the record: how much they moved."""
    from paratrain.planner.hardware import Calibration

    cal = Calibration.load(path)
    return {"compute_curve": cal.compute_curve, "tp_factor": cal.tp_factor, "pp_factor": cal.pp_factor,
            "pipeline_send": cal.pipeline_send, "wake_s": cal.wake_s}


TESTBED = [("ddp", ["strategy.name=ddp"]),
           ("ddp + PowerSGD", ["strategy.name=ddp", "strategy.compression.codec=powersgd"]),
           ("DiLoCo H=4", ["strategy.name=diloco", "strategy.local_sgd.sync_every=4"])]


def testbed(steps: int, out: Path, rate: str) -> list[dict]:
    """The 2-host testbed (network namespaces, tbf at `rate`; needs root): each strategy through
    `paratrain testbed run`, predicted with the link `paratrain calibrate --testbed RATE` measured."""
    from paratrain.config import load_config
    from paratrain.planner.commands import load_calibration, plan_of, profile_config, run_step_s

    link = f"testbed-{rate}"
    cal = load_calibration()
    if link not in cal.links:
        sys.exit(f"no calibrated link {link}: run 'paratrain calibrate --testbed {rate}' first")
    state = out / "testbed.json"
    base = [sys.executable, "-m", "paratrain", "testbed"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([*base, "up", "--hosts", "2", "--rate", rate, "--state", str(state)], check=True, env=env,
                   capture_output=True)
    rows = []
    try:
        for size in ("small", "large"):
            for name, sets in TESTBED:
                all_sets = [*COMMON, *model_sets(size), *sets, f"training.steps={steps}"]
                run_dir = out / f"testbed-{size}-{name}".replace(" ", "_")
                print(f"testbed {rate}: {size} {name} ...", file=sys.stderr, flush=True)
                done = subprocess.run([*base, "run", "--state", str(state), "--nproc-per-host", "1",
                                       *[a for x in [*all_sets, f"run.dir={json.dumps(str(run_dir))}"]
                                         for a in ("--set", x)]], capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    rows.append({"size": size, "name": f"{name} at {rate}", "error": done.stderr.strip()[-200:]})
                    continue
                summary = json.loads((run_dir / "summary.json").read_text())
                cfg = load_config(None, all_sets)
                profile, cluster = profile_config(cfg), cal.cluster(2, link)
                est = estimate(plan_of(cfg, 2), profile, cluster, cfg.training.global_batch_size)
                rows.append({"size": size, "name": f"{name} at {rate}", "measured_s": summary["step_s_steady"],
                             "predicted_s": run_step_s(cfg, est, profile, cluster),
                             "measured_bytes": summary.get("measured_memory_bytes"),
                             "predicted_bytes": est.memory_bytes})
    finally:
        subprocess.run([*base, "down", "--state", str(state)], env=env, capture_output=True)
    return rows


def model_sets(size: str) -> list[str]:
    return SMALL if size == "small" else LARGE


def print_local(rows: list[dict]) -> None:
    print("| model | strategy | measured step | predicted | time error | measured memory | predicted | memory error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['name']} | failed: {r['error'][:80]} | | | | | |")
            continue
        mem = r["measured_bytes"]
        runs = r.get("runs_s", [])
        spread = f" ({', '.join(f'{x * 1e3:.0f}' for x in runs)})" if len(runs) > 1 else ""
        print(f"| {r['size']} | {r['name']} | {r['measured_s'] * 1e3:.1f} ms{spread} | {r['predicted_s'] * 1e3:.1f} ms "
              f"| {r['predicted_s'] / r['measured_s'] - 1:+.0%} | {mem / 2**20:.1f} MiB | "
              f"{r['predicted_bytes'] / 2**20:.1f} MiB | {r['predicted_bytes'] / mem - 1:+.0%} |")
    ok = [r for r in rows if "error" not in r]
    time_ok = sum(abs(r["predicted_s"] / r["measured_s"] - 1) <= 0.2 for r in ok)
    mem_ok = sum(r["measured_bytes"] and abs(r["predicted_bytes"] / r["measured_bytes"] - 1) <= 0.1 for r in ok)
    print(f"\nWithin 20% on time: {time_ok} of {len(ok)}; within 10% on memory: {mem_ok} of {len(ok)}.")
    two = [m for m, n, _ in MATRIX if n == 2]
    for size in ("small", "large"):
        # every 2-rank row; then those that train as one process would (strategy.name = "auto" runs one of them)
        for label, names in (("2 ranks", two), ("2 ranks, synchronous", [m for m in two if m not in DIFFERENT])):
            mine = [r for r in ok if r["size"] == size and r["name"] in names]
            if mine:
                fastest = min(mine, key=lambda r: r["measured_s"])
                chosen = min(mine, key=lambda r: r["predicted_s"])
                print(f"{size}, {label}: the planner's first is {chosen['name']} ({chosen['measured_s'] * 1e3:.1f} ms "
                      f"measured); the fastest measured is {fastest['name']} ({fastest['measured_s'] * 1e3:.1f} ms): "
                      f"{chosen['measured_s'] / fastest['measured_s'] - 1:+.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--published", action="store_true")
    p.add_argument("--scale", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--testbed", default="", metavar="RATE", help="the 2-host testbed rows at this rate (root)")
    p.add_argument("--repeat", type=int, default=1, help="runs per row (the matrix forward, then backward, ...)")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="keep the runs and calibrations in DIR (default: a temporary folder, removed)")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate this machine in this run, into files of its own (the predictions use them): "
                        "before each model size of each pass of the local matrix; once for --testbed")
    args = p.parse_args()
    if args.published:
        rows = published()
        print(json.dumps(rows, indent=1)) if args.json else print_published(rows)
        return
    if args.scale:
        scale()
        return
    def calibrate(path: Path) -> None:
        os.environ["PARATRAIN_CALIBRATION"] = str(path)
        link = ["--testbed", args.testbed] if args.testbed else []
        cmd = [sys.executable, "-m", "paratrain", "calibrate", *link]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})

    if args.keep and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        # its runs' folders and calibrations keep their names from one benchmark to the next
        print(f"--keep {args.keep}: not an empty folder; name a new or empty one", file=sys.stderr)
        sys.exit(2)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(
            prefix="paratrain-planner-") as tmp:
        # the predictions from figures measured minutes, not hours, before the runs
        if args.testbed:
            if args.calibrate:
                print("calibrating ...", file=sys.stderr, flush=True)
                calibrate(Path(tmp) / "machine.toml")
            rows = testbed(args.steps, Path(tmp), args.testbed)
        else:
            rows = local(args.steps, Path(tmp), args.only, args.repeat, calibrate if args.calibrate else None)
    print(json.dumps(rows, indent=1)) if args.json else print_local(rows)


if __name__ == "__main__":
    main()
