"""Workers in failure domains of their own, for the strategies that survive a lost worker.

torch's elastic agent stops every worker of its job once one exits non-zero, a crash or a kill
included, and the agents of one rendezvous wait for each other at exit (300 s, which torchrun
does not let one set). That is right where ranks step together and wrong for the parameter
server, local SGD, DiLoCo and gossip, whose survivors can go on (`SURVIVES_LOSS`). For those,
`paratrain run` starts each worker in a process context of its own, through the same torch API
the agent uses (`torch.distributed.elastic.multiprocessing.start_processes`), so a worker's death
ends that context only. The workers join one process group through a TCPStore this launcher
hosts on 127.0.0.1 (env:// with TORCHELASTIC_USE_AGENT_STORE, as a torchrun worker joins its
agent's store), so the store outlives any worker, rank 0 included.

The launcher watches the workers: a lost one is named in one line (rank, pid, signal, step) and
the others go on; once the chief (rank 0) has ended, workers that the survivors left behind
stopped (SIGSTOP, a hang) are ended, so that the job ends. SIGTERM and Ctrl-C are forwarded once
to every worker, which stop at a step boundary (signals.py); a second signal kills them.

On several machines (`--nnodes`, nodes.py) every node's launcher runs its workers this way, all
of them clients of node 0's store: a lost worker, or a whole lost node, ends no other node's.

A lost worker is restarted (up to `run.max_restarts` times each) where `restartable(rank)` says
it can rejoin the running job: the parameter server's workers and servers under SSP and ASP, which
talk on channels of their own (parameter_server/protocol.py) and come back outside the job's
process group (`REJOIN_ENV`: Topology.from_env's `alone`). The others' lost workers are not
restarted: local SGD's, DiLoCo's and gossip's survivors shrink a gloo group, which cannot grow back
(as replica groups, local SGD and DiLoCo restart a lost one: replica_groups.py).
"""
from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

from paratrain import watchdog
from paratrain.nodes import CHIEF_DONE, NODE_DONE, Nodes, chief_done, mark, wait_nodes
from paratrain.topology import REJOIN_ENV, loopback_store

SURVIVES_LOSS = ("parameter_server", "local_sgd", "diloco", "gossip")
POLL_S = 0.1


def run_apart(nproc: int, worker: list[str], run_dir: Path, grace_s: float,
              restartable=lambda rank: False, max_restarts: int = 0, nodes: Nodes = Nodes(), store=None,
              run_id: str | None = None, timeout_s: float = 0) -> tuple[int, int | None]:
    """Run `python worker...` as this node's nproc ranks, each on its own; (exit code, signal that
    stopped the job or None). Exit code 0 when rank 0 and every rank not lost finished.
    Several machines (nodes.py): node R runs ranks R * nproc.., all of them clients of `store`,
    node 0's; node 0 waits up to `timeout_s` for the other nodes' workers once its own have ended."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes
    from torch.distributed.elastic.multiprocessing.api import SignalException

    # The group's store, in this process (node 0's on several machines): no worker's loss takes it down.
    store = store if store is not None else loopback_store()
    run_id = run_id or uuid.uuid4().hex
    ranks = range(nodes.rank * nproc, (nodes.rank + 1) * nproc)
    contexts, restarts = {}, dict.fromkeys(ranks, 0)
    chief_here = 0 in ranks

    def start(rank: int):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank - ranks[0]),
               "WORLD_SIZE": str(nodes.count * nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "GROUP_RANK": str(nodes.rank), "MASTER_ADDR": nodes.host if nodes.many else "127.0.0.1",
               "MASTER_PORT": str(nodes.port if nodes.many else store.port), "TORCHELASTIC_USE_AGENT_STORE": str(True),
               "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": str(restarts[rank]),
               **({REJOIN_ENV: "1"} if restarts[rank] else {})}
        contexts[rank] = start_processes(f"rank{rank}-{restarts[rank]}", sys.executable, {0: tuple(worker)},
                                         {0: env}, DefaultLogsSpecs(log_dir=os.devnull))
        pids[rank] = contexts[rank].pids()[0]

    pids: dict[int, int] = {}
    for rank in ranks:
        start(rank)
    codes: dict[int, int] = {}
    chief_ended = (lambda: 0 in codes) if chief_here else (lambda: chief_done(store))
    said_chief = False
    try:
        while len(codes) < nproc:
            for rank, pc in list(contexts.items()):
                if rank in codes or (result := pc.wait(0)) is None:
                    continue
                codes[rank] = result.failures[0].exitcode if result.is_failed() else 0
                if codes[rank] != 0 and rank != 0 and not chief_ended():
                    who = watchdog.describe_exit(run_dir, rank, pids[rank], codes[rank])
                    if restartable(rank) and restarts[rank] < max_restarts:
                        restarts[rank] += 1
                        print(f"paratrain: lost {who}; restarting it (restart {restarts[rank]} of "
                              f"{max_restarts}); the others go on", file=sys.stderr, flush=True)
                        pc.close(signal.SIGKILL, timeout=1)
                        del codes[rank]
                        start(rank)
                        continue
                    print(f"paratrain: lost {who}; the others go on", file=sys.stderr, flush=True)
            if chief_here and 0 in codes and nodes.many and not said_chief:
                mark(store, CHIEF_DONE)  # the other nodes' launchers end their stopped workers too
                said_chief = True
            if chief_ended():  # the chief has ended: nobody waits on a worker left behind stopped
                for rank in set(contexts) - set(codes):
                    if watchdog.process_state(pids[rank]) == "stopped":
                        os.kill(pids[rank], signal.SIGKILL)
            time.sleep(POLL_S)
    except SignalException as e:  # forwarded once; the workers stop at a step boundary
        _signal_all(contexts, codes, e.sigval)
        try:
            _wait_all(contexts, codes, grace_s)
        except SignalException:  # a second one: at once
            _signal_all(contexts, codes, signal.SIGKILL)
        return 128 + int(e.sigval), e.sigval
    finally:
        for pc in contexts.values():
            pc.close(signal.SIGKILL, timeout=1)
    lost = {r: c for r, c in codes.items() if c != 0 and r != 0}
    if nodes.many and not chief_here:  # this node's part is done; rank 0's node says how the job ended
        mark(store, f"{NODE_DONE}{nodes.rank}")
        how = f"without {len(lost)} lost worker(s): ranks {sorted(lost)}" if lost else "with every worker"
        print(f"paratrain: node {nodes.rank}: finished {how}", file=sys.stderr)
        return 0, None
    if nodes.many:
        mark(store, CHIEF_DONE)
        silent = lambda node: all(watchdog.is_lost(run_dir, r) for r in range(node * nproc, (node + 1) * nproc))
        if late := wait_nodes(store, nodes, timeout_s, silent):
            print(f"paratrain: node(s) {late} did not finish (their workers lost, or late by {timeout_s:.0f} s); "
                  "not waiting for them", file=sys.stderr)
    if codes[0] != 0:
        print(f"paratrain: {watchdog.describe_exit(run_dir, 0, pids[0], codes[0])}; the run needs rank 0",
              file=sys.stderr)
        return codes[0] if codes[0] > 0 else 1, None
    if lost:
        print(f"paratrain: finished without {len(lost)} lost worker(s): ranks {sorted(lost)}", file=sys.stderr)
    if back := sorted(r for r, n in restarts.items() if n and r not in lost):
        print(f"paratrain: finished with restarted worker(s) {back} back in the job", file=sys.stderr)
    return 0, None


def _signal_all(contexts: dict, codes: dict, sig: int) -> None:
    for rank, pc in contexts.items():
        if rank not in codes:
            for pid in pc.pids().values():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass


def _wait_all(contexts: dict, codes: dict, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while len(codes) < len(contexts) and time.monotonic() < deadline:
        for rank, pc in contexts.items():
            if rank not in codes and (result := pc.wait(0)) is not None:
                codes[rank] = result.failures[0].exitcode if result.is_failed() else 0
        time.sleep(POLL_S)
