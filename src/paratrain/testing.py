"""Run a function on N gloo ranks on a free port, as torchrun would: for tests and benchmarks.

Each rank is a fresh process with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, so the
function joins the group exactly as a torchrun worker does (`Topology.from_env`). Ranks are forked
from multiprocessing's fork server, which imports torch and paratrain once (`PRELOAD`): a spawned
process pays about 2 s of imports, 4 s with DDP's torch._dynamo, before it runs a line of the test,
and a test suite starts hundreds. Nothing of the parent's state reaches a rank but what the
fork server loaded before any process group existed, the caller's environment (passed along, as
spawn would inherit it), its working directory and sys.path (multiprocessing's own preparation).
Return values come back through files (torch.save), exceptions with their traceback; when one
rank fails or the time runs out the others are killed instead of waiting on a dead peer.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class RankFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What every rank imports anyway; loaded once in the fork server (no threads, no process groups yet).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.tensor", "torch.distributed.checkpoint.state_dict",
           "torch.distributed.fsdp", "torch.distributed.pipelining", "paratrain.launcher", "paratrain.trainer"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _rank_main(fn, rank: int, world_size: int, port: int, out: str, args: tuple, caller_env: dict,
               env: dict) -> None:
    os.environ.clear()  # the caller's environment, as a spawned process would have it
    os.environ.update(caller_env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": f"test{port}", **env})
    torch.set_num_threads(1)
    try:
        result = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        result = ("error", traceback.format_exc())
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, out)
    if result[0] == "error":
        raise SystemExit(1)  # the parent stops the other ranks at once


LOST = (0, -signal.SIGKILL)  # how a rank lost to faults.leave_at_step / kill_at_step exits


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 180.0,
              env: dict | None = None, allow_missing: bool = False) -> list[Any]:
    """`fn(*args)` on `world_size` ranks; returns each rank's result, rank order.

    `allow_missing`: a rank lost to an injected fault (killed, exit status -9, or left, exit code 0)
    gives None instead of failing the run, and the others go on."""
    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, outs[r], args, dict(os.environ),
                                                      env or {}))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.is_alive() for p in procs):
                lost_ok = LOST if allow_missing else (0,)
                if any(p.exitcode not in (None, *lost_ok) for p in procs) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        results, errors = [], []
        for r, out in enumerate(outs):
            if not Path(out).exists():
                if allow_missing and procs[r].exitcode in LOST:
                    results.append(None)
                    continue
                errors.append(f"rank {r}: exit code {procs[r].exitcode} with no result"
                              + (" (timed out)" if time.monotonic() > deadline else ""))
                continue
            status, value = torch.load(out, weights_only=False)
            (errors if status == "error" else results).append(f"rank {r}:\n{value}" if status == "error" else value)
        if errors:
            raise RankFailed("\n".join(errors))
        return results
