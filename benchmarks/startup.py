"""paratrain's start-up against a bare torchrun script, alternating in one run.

What it measures: the wall time from command to exit of a one-step paratrain run on 2 local
workers (A), against torch's launcher starting 2 workers of a bare script that imports torch,
joins a gloo process group, all-reduces one tensor, destroys the group and exits (B). So A - B is
what paratrain adds to torch's own start-up and shut-down: its imports, config checks, the run
directory, building the model and data, one step and its checkpoint.

How: rounds of A, B and C in turn (A B C A B C ...), so drift of the machine hits both alike; each A writes
into a fresh temporary run directory, and everything both write (run directories, torch's
torchelastic_* log directories, via TMPDIR) lies in one temporary directory deleted at the end.
OMP_NUM_THREADS=1 for both. `--imports` adds where paratrain's start-up goes inside one process:
the time of `import torch`, then of each paratrain module on top of it.

    .venv/bin/python benchmarks/startup.py [--rounds 3] [--imports]

The figure is the ratio median(A) / median(B), goal <= 1.3: absolute seconds depend on the machine.
A third command (C), torchrun starting 2 workers that build configs/mlp.toml's model under torch's
DDP and take one SGD step, shows what of A - B is torch's own: DDP's constructor alone imports
torch._dynamo. A / C is then what paratrain adds over the same job written with torch directly.
Exits 0 whatever the ratio (a benchmark, not a test); 1 only when a run itself failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin (not resolved: that would leave the venv)
CONFIG = REPO / "configs" / "mlp.toml"
NPROC = 2
GOAL = 1.3
TIMEOUT_S = 300
IMPORTED = ["paratrain.cli", "paratrain.launcher", "paratrain.trainer", "paratrain.strategies"]

BARE_SCRIPT = """\
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
dist.destroy_process_group()
"""

# C: what torch alone costs for the same job as A: DDP over configs/mlp.toml's model, one SGD step.
# DDP's constructor imports torch._dynamo (torch/nn/parallel/distributed.py reads
# torch._dynamo.utils.get_optimize_ddp_mode()): a second or more on a small machine, that B lacks.
DDP_SCRIPT = """\
import torch
import torch.distributed as dist
import torch.nn as nn

dist.init_process_group("gloo")
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
nn.functional.mse_loss(model(torch.randn(16, 10)), torch.randn(16, 1)).backward()
opt.step()
dist.destroy_process_group()
"""

IMPORT_SNIPPET = ("import time,sys; t=time.perf_counter(); import torch; t1=time.perf_counter(); "
                  "import {mod}; print(t1-t, time.perf_counter()-t1)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict) -> float | None:
    """Wall seconds from start to exit; None (and its output shown) if it failed."""
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {TIMEOUT_S} s: {' '.join(cmd)}", file=sys.stderr)
        return None
    wall = time.perf_counter() - t
    if out.returncode != 0:
        print(f"  exit code {out.returncode}: {' '.join(cmd)}\n{out.stdout[-2000:]}{out.stderr[-4000:]}",
              file=sys.stderr)
        return None
    return wall


def paratrain_cmd(run_dir: Path) -> list[str]:
    return [str(BIN / "paratrain"), "run", str(CONFIG), "--nproc", str(NPROC),
            "--set", "training.steps=1", "--set", f"run.dir={run_dir}", "--set", 'run.progress="off"']


def bare_cmd(script: Path) -> list[str]:
    # Not --standalone: the c10d rendezvous on a 127.0.0.1 endpoint, and --local-addr=127.0.0.1 so
    # the workers' MASTER_ADDR is loopback too. Even so torch's agent stores listen on every
    # interface (measured, torch 2.13: `ss -ltn` shows *:<port> for the endpoint's port and one
    # more, as with --standalone); only paratrain's launcher (topology.loopback_store) avoids that.
    return [str(BIN / "python"), "-m", "torch.distributed.run", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1", "--local-addr=127.0.0.1",
            f"--nproc-per-node={NPROC}", str(script)]


def startup(rounds: int, root: Path, env: dict) -> bool:
    scripts = {}
    for name, text in (("bare", BARE_SCRIPT), ("ddp", DDP_SCRIPT)):
        scripts[name] = root / f"{name}_worker.py"
        scripts[name].write_text(text)
    kinds = {"A": "paratrain", "B": "bare torchrun", "C": "torchrun + DDP step"}
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(1, rounds + 1):
        for kind in kinds:
            run_root = Path(tempfile.mkdtemp(prefix=f"round{i}-", dir=root))
            if kind == "A":
                cmd = paratrain_cmd(run_root / "run")
            else:
                cmd = bare_cmd(scripts["bare" if kind == "B" else "ddp"])
            wall = timed(cmd, env)
            shutil.rmtree(run_root, ignore_errors=True)
            print(f"round {i}  {kind} {kinds[kind]:20} {'failed' if wall is None else f'{wall:6.2f} s'}", flush=True)
            if wall is not None:
                walls[kind].append(wall)
    print()
    med = {k: statistics.median(v) if v else None for k, v in walls.items()}
    print(f"{'':28}median of {rounds} rounds")
    for kind, what in kinds.items():
        print(f"  {kind} {what:30}{'  n/a' if med[kind] is None else f'{med[kind]:6.2f} s'}")

    def ratio(x: str, y: str) -> str:
        return f"{med[x] / med[y]:6.2f}" if med[x] is not None and med[y] else "   n/a"

    print(f"  {'ratio A/B (the figure)':32}{ratio('A', 'B')}    goal <= {GOAL}")
    print(f"  {'ratio C/B (torch DDP alone)':32}{ratio('C', 'B')}")
    print(f"  {'ratio A/C (paratrain over DDP)':32}{ratio('A', 'C')}")
    return all(len(v) == rounds for v in walls.values())


def imports(env: dict) -> None:
    """Where the time goes inside one process: `import torch`, then each module on top of it."""
    print(f"\nimports, each in a fresh process ({BIN / 'python'} -c ...):")
    torch_s: list[float] = []
    rows = []
    for mod in IMPORTED:
        try:
            out = subprocess.run([str(BIN / "python"), "-c", IMPORT_SNIPPET.format(mod=mod)], env=env,
                                 cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
            ok = out.returncode == 0
        except subprocess.TimeoutExpired:
            ok, out = False, None
        if ok:
            try:
                t_torch, t_mod = (float(v) for v in out.stdout.split()[-2:])
                ok = True
            except ValueError:
                ok = False
        if ok:
            torch_s.append(t_torch)
            rows.append(f"  {mod:24}+{t_mod:6.2f} s after torch")
        else:
            why = out.stderr.strip().splitlines()[-1] if out is not None and out.stderr.strip() else "timed out"
            rows.append(f"  {mod:24}(not importable now: {why})")
    print(f"  {'import torch':24} {statistics.median(torch_s):6.2f} s (median of {len(torch_s)})"
          if torch_s else f"  {'import torch':24} n/a")
    print("\n".join(rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="A B pairs (default 3)")
    p.add_argument("--imports", action="store_true", help="also time import torch and paratrain's modules")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    with tempfile.TemporaryDirectory(prefix="paratrain-startup-") as tmp:
        root = Path(tmp)
        # TMPDIR: torch's launcher leaves a torchelastic_* log directory under it on each start.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(root)}
        ok = startup(args.rounds, root, env)
        if args.imports:
            imports(env)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
