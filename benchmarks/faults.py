"""Real faults, family by family: what a killed, hung or slow worker costs, as `paratrain run` meets it.

For each family (ddp, zero3, pipeline 1F1B, a dp2 x tp2 hybrid mesh, the parameter server under SSP,
DiLoCo, gossip, ddp and DiLoCo as torchft replica groups with min_replicas 1 and 2, hybrid as torchft
replica groups; the asynchronous ones on a tiny GPT for LONGER steps) it runs the same job once
without a fault and once per fault at worker rank 1 (hybrid torchft: rank 3, group 1's second
stage), before step FAULT_AT of STEPS (checkpoints every EVERY steps, `run.timeout_s` = TIMEOUT):
  * kill: `faults.kill_at_step`, SIGKILL from the rank to itself (exit -9, no clean-up);
  * hang: `faults.hang_at_step`, SIGSTOP: alive, silent, its sockets open;
  * slow: `faults.delay_s` added to each of rank 1's steps (a straggler; nothing fails).

From the run's stderr, each line time-stamped as it arrives, and its metrics it prints:
  * detect s: from the fault (the time the rank printed before it) to the first line that names
    the lost rank (a survivor's watchdog line, the parameter server's or DiLoCo's "lost" line);
  * stalled s: the longest gap between two of rank 0's step records after the fault (for the
    synchronous families: detection, the group's restart and its start-up);
  * repeated: steps trained twice (the fault's step minus the checkpoint the restart continued from;
    replica groups: the survivor's steps that were not committed and taken again);
    lost: steps the lost worker never trained (asynchronous families: it is dropped, or for the
    parameter server restarted, and then the steps it missed until it rejoined;
    replica groups: the survivor's steps, or DiLoCo's synchronisations, without every group);
  * loss vs clean: rank 0's final eval loss over the fault-free run's; clean again (asynchronous
    families): a second fault-free run's over the first, what their timing alone moves it by;
    bit-equal: the final parameters equal the fault-free run's (the synchronous families' promise);
  * ckpt lost: checkpoints the fault-free run has and the faulted one does not;
  * healthy lost: workers other than rank 1 that the job lost (the goal is none).
Goals: no healthy worker lost; synchronous families resume bit-equal; asynchronous ones train
through the fault with final loss within 2% of fault-free; detection within run.timeout_s + 5 s.

    python benchmarks/faults.py [--only FAMILY ...] [--faults kill hang slow] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from paratrain.checkpoint import list_checkpoints, read_checkpoint, step_of  # noqa: E402

STEPS, EVERY, FAULT_AT, TIMEOUT, DELAY_S = 200, 20, 110, 10, 0.02
MLP = ["model.name=mlp", "data.name=synthetic", "data.num_samples=4096", "training.global_batch_size=48",
       "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9"]
GPT = ["model.name=gpt", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=16",
       "training.global_batch_size=8", "optimizer.name=adamw", "optimizer.lr=3e-3"]
# The asynchronous families train the tiny GPT: its held-out cross-entropy (about 2 to 3) says what a
# fault costs. The MLP's regression loss nears its noise floor (0.0025) within these steps, where
# one run's final eval loss differed from the next by up to 1.7x with no fault at all.
GPT_ASYNC = [*GPT, "training.global_batch_size=12", "training.eval_batches=16"]
FAMILIES = {  # name -> (processes, config sets, synchronous: restarts bit-equal)
    "ddp": (2, [*MLP, "strategy.name=ddp"], True),
    "zero3": (2, [*MLP, "strategy.name=zero3"], True),
    "pipeline 1f1b": (2, [*GPT, "strategy.name=pipeline", "strategy.pipeline.schedule=1f1b"], True),
    "hybrid dp2xtp2": (4, [*GPT, "strategy.name=hybrid", "strategy.dp=2", "strategy.tp=2"], True),
    # 2 workers and a server; a lost worker (or server) restarts and rejoins (LONGER: back while the job runs)
    "ps ssp": (3, [*GPT_ASYNC, "strategy.name=parameter_server", "strategy.ps.mode=ssp", "optimizer.lr=1e-3"], False),
    "diloco": (3, [*GPT_ASYNC, "strategy.name=diloco", "strategy.local_sgd.sync_every=4",
                   "strategy.local_sgd.outer_lr=0.3"], False),
    "gossip": (4, [*GPT_ASYNC, "strategy.name=gossip"], False),  # a ring of 4: rank 1's neighbours pair up
    # ddp as 2 replica groups (torchft): a lost group restarts alone and recovers from the other.
    # min 1: the survivor trains on alone meanwhile; min 2: it waits, and no step is lost.
    "ddp torchft": (2, [*GPT_ASYNC, "strategy.name=ddp", "fault_tolerance.replica_groups=2"], False),
    "ddp torchft min2": (2, [*MLP, "strategy.name=ddp", "fault_tolerance.replica_groups=2",
                             "fault_tolerance.min_replicas=2"], True),
    # DiLoCo as 2 replica groups (the most it takes): a lost replica is left out, restarts, rejoins;
    # with min 2 the survivor waits for it at the next synchronisation.
    "diloco torchft": (2, [*GPT_ASYNC, "strategy.name=diloco", "strategy.local_sgd.sync_every=4",
                           "strategy.local_sgd.outer_lr=0.3", "fault_tolerance.replica_groups=2"], False),
    "diloco torchft min2": (2, [*GPT_ASYNC, "strategy.name=diloco", "strategy.local_sgd.sync_every=4",
                                "strategy.local_sgd.outer_lr=0.3", "fault_tolerance.replica_groups=2",
                                "fault_tolerance.min_replicas=2"], False),
    # hybrid's dp axis as 2 replica groups, each a 2-stage pipeline; the fault at group 1's second stage.
    "hybrid torchft min2": (4, [*GPT, "strategy.name=hybrid", "strategy.pp=2", "fault_tolerance.replica_groups=2",
                                "fault_tolerance.min_replicas=2"], True),
}
FAULTED = {"hybrid torchft min2": 3}  # the rank faulted, where not rank 1
# Steps, where not STEPS: the asynchronous runs train longer, so that the GPT's loss has flattened
# and a restarted worker (its start-up about 7 s) is back while the job runs.
LONGER = {"ps ssp": 1500, "diloco": 600, "gossip": 600, "ddp torchft": 600, "diloco torchft": 600,
          "diloco torchft min2": 600}
COMMON = [f"training.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=100",
          f"training.eval_every={STEPS}", f"run.timeout_s={TIMEOUT}", "run.progress=off"]
FAULTS = {"kill": [f"faults.kill_at_step={FAULT_AT}"], "hang": [f"faults.hang_at_step={FAULT_AT}"],
          "slow": [f"faults.delay_s={DELAY_S}"]}
NAMES_LOST = (r"rank {r} \(pid \d+.*(died|stopped|killed)|lost worker {r}|lost rank\(s\) \[{r}\]|lost rank {r}|"
              r"replica group 0: step \d+ not committed|"
              r"replica group 0: 1 of \d+ replica groups in the quorum")  # a line naming rank r lost


def common(name: str) -> list[str]:
    n = LONGER.get(name, STEPS)
    return [*COMMON, f"training.steps={n}", f"training.eval_every={n}"]


def run(nproc: int, sets: list[str], run_dir: Path) -> tuple[int, list[tuple[float, str]], float]:
    """`paratrain run`; (exit code, stderr lines with their arrival times, wall seconds)."""
    cmd = [sys.executable, "-m", "paratrain", "run", "--nproc", str(nproc),
           *[a for s in [*sets, f"run.dir={json.dumps(str(run_dir))}"] for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in proc.stderr))
    reader.start()
    code = proc.wait(timeout=900)
    reader.join()
    return code, lines, time.time() - t0


def steps(run_dir: Path, rank: int = 0) -> list[dict]:
    path = run_dir / "metrics" / f"rank{rank}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "step"]


def final_eval(run_dir: Path) -> float:
    path = run_dir / "metrics" / "rank0.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "eval"][-1]["eval_loss"]


def final_params(run_dir: Path) -> dict:
    return read_checkpoint(list_checkpoints(run_dir)[-1])["strategy"]["model"]


def measure(name: str, fault: str, tmp: Path, clean: Path) -> dict:
    nproc, sets, synchronous = FAMILIES[name]
    run_dir = tmp / f"{name}-{fault}".replace(" ", "_")
    code, lines, wall = run(nproc, [*sets, *common(name), f"faults.rank={FAULTED.get(name, 1)}", *FAULTS[fault]],
                            run_dir)
    row = {"family": name, "fault": fault, "exit": code, "wall_s": wall}
    text = "".join(line for _, line in lines)
    if code != 0 or not list_checkpoints(run_dir):
        row["error"] = next((line.strip() for _, line in reversed(lines) if line.startswith("paratrain:")), "?")
        return row
    faulted = FAULTED.get(name, 1)
    fault_line = next((t, line) for t, line in lines if f"faults: rank {faulted}" in line) if fault != "slow" else None
    t_fault = float(fault_line[1].rsplit(" at ", 1)[1]) if fault_line else None
    if t_fault is not None:
        names_lost = re.compile(NAMES_LOST.replace("{r}", str(faulted)))
        named = [t for t, line in lines if names_lost.search(line)]
        row["detect_s"] = named[0] - t_fault if named else None
        after = [r["time"] for r in steps(run_dir) if r["time"] > t_fault]
        gaps = [b - a for a, b in zip([t_fault, *after], after)]
        row["stalled_s"] = max(gaps, default=None)
    resumed = re.search(r"restart 1: continuing from \S*step-(\d+)\.pt", text)
    row["repeated"] = FAULT_AT - int(resumed.group(1)) if resumed else 0
    restarted_from_zero = "restart 1: continuing from step 0" in text
    if restarted_from_zero:
        row["repeated"] = FAULT_AT
    lost_worker = fault != "slow" and not resumed and not restarted_from_zero
    row["lost"] = LONGER.get(name, STEPS) - FAULT_AT if lost_worker else 0
    if any(s.startswith("fault_tolerance.replica_groups") for s in sets):  # replica groups: rank 0 never restarts
        records = steps(run_dir)
        row["repeated"] = sum(not r.get("committed", True) for r in records)  # steps it took again
        full = int(next(s for s in sets if s.startswith("fault_tolerance.replica_groups")).split("=")[1])
        syncs = [r for r in records if "replicas" in r]  # ddp: every step; DiLoCo: each synchronisation
        row["lost"] = sum(r.get("committed", True) and r["replicas"] < full for r in syncs)
    row["loss_ratio"] = final_eval(run_dir) / final_eval(clean)
    a, b = final_params(run_dir), final_params(clean)
    row["bit_equal"] = all(torch.equal(a[k], b[k]) for k in a) if a.keys() == b.keys() else False
    kept = {step_of(p) for p in list_checkpoints(run_dir)}
    row["ckpt_lost"] = len({step_of(p) for p in list_checkpoints(clean)} - kept)
    healthy = {r for r in range(nproc) if r != faulted}
    server = run_dir / "metrics" / f"ps_server{nproc - 1}.json"
    report = json.loads(server.read_text()) if server.exists() else {}
    lost = set(report.get("lost_workers", [])) - set(report.get("rejoined_workers", []))
    if faulted in report.get("rejoined_workers", []):  # restarted and back: the steps it missed meanwhile
        row["lost"] = report["missed_steps"][faulted]
    gone = re.search(r"finished without \d+ lost worker\(s\): ranks \[([\d, ]+)\]", text)
    lost |= {int(r) for r in gone.group(1).split(",")} if gone else set()
    row["healthy_lost"] = len(lost & healthy)
    row["synchronous"] = synchronous
    return row


def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--faults", nargs="*", choices=list(FAULTS), default=list(FAULTS))
    p.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = p.parse_args()
    tmp = args.out or Path(tempfile.mkdtemp(prefix="paratrain-faults-"))
    rows = []
    for i, name in enumerate(args.only):
        nproc, sets, _ = FAMILIES[name]
        clean = tmp / f"{name}-clean".replace(" ", "_")
        code, lines, wall = run(nproc, [*sets, *common(name)], clean)
        if code != 0:
            print(f"{name}: the fault-free run failed: {lines[-1][1].strip() if lines else code}")
            continue
        noise = None
        if not FAMILIES[name][2]:  # asynchronous: how far a second fault-free run lands from the first
            again = tmp / f"{name}-clean-again".replace(" ", "_")
            if run(nproc, [*sets, *common(name)], again)[0] == 0:
                noise = final_eval(again) / final_eval(clean)
        for fault in args.faults:
            print(f"[{i + 1}/{len(args.only)}] {name}: {fault} ...", file=sys.stderr, flush=True)
            rows.append({**measure(name, fault, tmp, clean), "noise": noise})
    elsewhere = "".join(f" ({n}: rank {r})" for n, r in FAULTED.items() if n in args.only)
    longer = "".join(f" ({n}: {k})" for n, k in LONGER.items() if n in args.only)
    print(f"\n{STEPS} steps{longer}, fault at rank 1{elsewhere} before step {FAULT_AT}, checkpoints every {EVERY}, "
          f"run.timeout_s = {TIMEOUT}; slow = +{DELAY_S} s per step\n")
    head = ["family", "fault", "exit", "detect s", "stalled s", "repeated", "lost", "loss vs clean",
            "clean again", "bit-equal", "ckpt lost", "healthy lost", "wall s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "error" in r:
            cells = [r["family"], r["fault"], str(r["exit"]), r["error"][:90], *[""] * 8, f"{r['wall_s']:.0f}"]
            print("| " + " | ".join(cells) + " |")
            continue
        equal = "yes" if r["bit_equal"] else "no"
        print(f"| {r['family']} | {r['fault']} | {r['exit']} | {fmt(r.get('detect_s'))} | {fmt(r.get('stalled_s'))} "
              f"| {r['repeated']} | {r['lost']} | {r['loss_ratio']:.3f} | {fmt(r['noise'], '.3f')} | {equal} "
              f"| {r['ckpt_lost']} "
              f"| {r['healthy_lost']} | {r['wall_s']:.0f} |")
    print("\nGoals: healthy lost 0; synchronous families bit-equal after kill and hang; asynchronous ones within "
          f"2% of fault-free (loss vs clean <= 1.02); detect s <= run.timeout_s + 5 = {TIMEOUT + 5}.")
    failed = [r for r in rows if "error" in r or r["healthy_lost"]
              or (r["synchronous"] and r["fault"] != "slow" and not r["bit_equal"])
              or (not r["synchronous"] and r["loss_ratio"] > 1.02)
              or (r.get("detect_s") is not None and r["detect_s"] > TIMEOUT + 5)]
    print("Missed: " + (", ".join(f"{r['family']} {r['fault']}" for r in failed) if failed else "none"))


if __name__ == "__main__":
    main()
