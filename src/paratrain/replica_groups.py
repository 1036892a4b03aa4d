"""Fault-tolerant replica groups on one machine: torchft's Lighthouse and one torchrun job per group.

Per-step fault tolerance (torchft; strategies/data_parallel/ft.py) needs every replica group to
be a failure domain of its own: torch's elastic agent ends all of its workers when one fails, so
one agent per group restarts that group alone (`run.max_restarts`) while the others train on.
`paratrain run` with `fault_tolerance.replica_groups = G` starts here:
- torchft's Lighthouse, the quorum server, in this process on 127.0.0.1 (unless
  `fault_tolerance.lighthouse` names one elsewhere);
- G torchrun jobs (`python -m torch.distributed.run`) of processes / G workers each (one for
  ddp, local SGD and DiLoCo; a pp x tp mesh for hybrid), each with its own rendezvous store hosted
  here on 127.0.0.1, as launcher.py hosts the one job's, and REPLICA_GROUP_ID / TORCHFT_LIGHTHOUSE
  in its environment. On several machines the same commands are typed by hand (README).

It then watches them: a group that runs out of restarts is named and the others go on; a worker
that is stopped (SIGSTOP: a hang) and silent for `run.timeout_s` gets SIGKILL, since torchft's
quorum has left it out by then and its agent can only restart it once it is dead; SIGTERM and
Ctrl-C are forwarded to the agents once (the workers stop at a step boundary), a second time as
SIGKILL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from paratrain import watchdog
from paratrain.config import Config
from paratrain.topology import LIGHTHOUSE_ENV, REPLICA_ENV, loopback_store

POLL_S = 0.2
# The Lighthouse forms a quorum once min_replicas are in it and either every group it has heard
# from has joined or this long has passed: long enough for groups that start together to meet.
JOIN_TIMEOUT_MS = 10_000
HEARTBEAT_TIMEOUT_MS = 5_000  # a group silent this long is left out of the next quorum (torchft's default),
# or run.timeout_s where that is shorter: by then its peers' collective has failed anyway


def run_replica_groups(cfg: Config, nproc: int, worker: list[str], run_dir: Path,
                       grace_s: float) -> tuple[int, int | None]:
    """Run `worker` as cfg.fault_tolerance.replica_groups torchrun jobs of nproc / groups processes;
    (exit code, signal that stopped the run or None). 0 when at least one group finished."""
    ft = cfg.fault_tolerance
    groups, per_group = ft.replica_groups, nproc // ft.replica_groups
    lighthouse, address = None, ft.lighthouse
    if not address:
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs each quorum at "info"
        from torchft.coordination import LighthouseServer

        lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=ft.min_replicas,
                                      join_timeout_ms=JOIN_TIMEOUT_MS,
                                      heartbeat_timeout_ms=min(HEARTBEAT_TIMEOUT_MS, int(cfg.run.timeout_s * 1000)))
        address = f"http://127.0.0.1:{lighthouse.address().rsplit(':', 1)[1]}"
    stores = [loopback_store() for _ in range(groups)]  # each group's rendezvous, outliving its workers
    agents: dict[int, subprocess.Popen] = {}
    for g, store in enumerate(stores):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{store.port}", f"--rdzv-id={uuid.uuid4()}", "--rdzv-conf=is_host=false",
               "--nnodes=1", "--local-addr=127.0.0.1", f"--nproc-per-node={per_group}",
               f"--max-restarts={cfg.run.max_restarts}", f"--shutdown-timeout={grace_s}", *worker]
        env = {**os.environ, REPLICA_ENV: str(g), LIGHTHOUSE_ENV: address,
               "LOGLEVEL": os.environ.get("LOGLEVEL", "ERROR"),  # torch's agent: one line per restart is ours
               "RUST_LOG": os.environ.get("RUST_LOG", "warn")}  # torchft's Lighthouse and Managers: no quorum chatter
        agents[g] = subprocess.Popen(cmd, env=env)
    codes: dict[int, int] = {}
    signalled, pending = None, []  # signals arrive in a handler; the loop below forwards them
    previous = {s: signal.signal(s, lambda n, _: pending.append(n)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while len(codes) < groups:
            if pending:
                sig = signal.SIGKILL if signalled else pending[-1]
                signalled = signalled or pending[-1]
                pending.clear()
                for g, agent in agents.items():
                    if g not in codes:
                        agent.send_signal(sig)
            for g, agent in agents.items():
                if g in codes or (code := agent.poll()) is None:
                    continue
                codes[g] = code
                if code != 0 and not signalled and len(codes) < groups:
                    print(f"paratrain: replica group {g} failed (exit code {code}) after {cfg.run.max_restarts} "
                          "restart(s); the other groups go on", file=sys.stderr, flush=True)
            if not signalled:
                running = [r for g in agents if g not in codes for r in range(g * per_group, (g + 1) * per_group)]
                _end_hung(run_dir, running, cfg.run.timeout_s)
            time.sleep(POLL_S)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for agent in agents.values():
            if agent.poll() is None:
                agent.kill()
        if lighthouse is not None:
            lighthouse.shutdown()
    if signalled:
        return 128 + int(signalled), signalled
    failed = sorted(g for g, c in codes.items() if c != 0)
    if len(failed) == groups:
        print(f"paratrain: every replica group failed (exit codes {[codes[g] for g in failed]})", file=sys.stderr)
        return 1, None
    if failed:
        print(f"paratrain: finished without {len(failed)} replica group(s): {failed}", file=sys.stderr)
    return 0, None


def _end_hung(run_dir: Path, ranks: list[int], timeout_s: float) -> None:
    """SIGKILL a worker that is stopped and has been silent for timeout_s, so that its agent restarts it."""
    for rank in ranks:
        peer = watchdog.read_peer(watchdog.heartbeat_path(run_dir, rank))
        if peer is not None and peer.state == "stopped" and peer.silent_s > timeout_s and watchdog.end(peer):
            print(f"paratrain: {peer.describe()}; ended it with SIGKILL so that its agent restarts it",
                  file=sys.stderr, flush=True)
