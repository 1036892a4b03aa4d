"""One job over several machines: `paratrain run --nnodes M --node-rank R --master HOST:PORT` on each.

torchrun spans machines through its c10d rendezvous, and the synchronous strategies use exactly
that here (torch's agent per node, `--nnodes M`, restarts from the newest checkpoint). For the
strategies that go on without a lost worker (apart.py) torchrun's agent is the wrong unit: it ends
every worker of its node when one fails, and the agents of one rendezvous wait for each other at
exit (300 s, which torchrun does not let one set: a lost node held the survivor that long). So on
several machines, as on one, each of their workers is a failure domain of its own, started by
this launcher through torch's `start_processes`.

Either way node 0's launcher hosts one TCPStore at HOST:PORT: the rendezvous store of the agents
(synchronous strategies), or the process group's store itself (apart.py), which no worker's loss
takes down. It settles, checks and owns the run directory, which must be on storage every node
sees (as with torchrun), and publishes the settled job there (JOB_KEY: the worker's command with
absolute paths, the processes per node, the rendezvous id); the other nodes' launchers read it
and start their workers, so only node 0 decides what runs. Written here because torch has no
launcher that keeps a node's workers apart; the store, the rendezvous and the process starts are
torch's own.
"""
from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass
from datetime import timedelta

from paratrain.config import ConfigError

JOB_KEY = "paratrain/job"
CHIEF_DONE = "paratrain/chief_done"  # rank 0 has ended: a worker left behind stopped is ended
NODE_DONE = "paratrain/node_done/"  # + node rank: that node's workers have all ended
# How long a node waits for node 0 to publish the job: node 0 checks the config (and user code)
# first, a few seconds, and the nodes of a cluster job start within a minute of each other.
JOIN_TIMEOUT_S = 300


class NodesError(ConfigError):
    """Bad --nnodes / --node-rank / --master: one line, exit code 2."""


@dataclass(frozen=True)
class Nodes:
    """Where this launcher sits among the job's machines; the default is one machine."""
    count: int = 1
    rank: int = 0
    host: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def parse(cls, count: int, rank: int, master: str | None) -> "Nodes":
        if count < 1:
            raise NodesError(f"--nnodes {count}: must be an integer >= 1")
        if not 0 <= rank < count:
            raise NodesError(f"--node-rank {rank}: must be 0..{count - 1} for --nnodes {count}")
        if count == 1:
            if master is not None:
                raise NodesError("--master: only with --nnodes >= 2 (one machine needs no address)")
            return cls()
        if master is None:
            raise NodesError(f"--nnodes {count}: needs --master HOST:PORT, the address of node 0 (the same on "
                             "every node)")
        host, sep, port = master.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise NodesError(f"--master {master!r}: must be HOST:PORT with a port 1..65535, e.g. 10.0.0.1:29400")
        return cls(count, rank, host.strip("[]"), int(port))

    @property
    def many(self) -> bool:
        return self.count > 1

    @property
    def loopback(self) -> bool:
        """Every node on this machine (tests, or a trial run): gloo's sockets on the loopback interface."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def host_store(self):
        """Node 0: the job's store at HOST:PORT (on the loopback interface only where HOST is one)."""
        import torch.distributed as dist

        from paratrain.topology import loopback_store

        if self.loopback:
            store = loopback_store(self.port, self.host)
            if store is None:
                raise NodesError(f"--master {self.host}:{self.port}: the port is in use on this machine")
            return store
        try:
            return dist.TCPStore(self.host, self.port, is_master=True, multi_tenant=True, wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise NodesError(f"--master {self.host}:{self.port}: cannot listen there ({e})") from None

    def join_store(self, timeout_s: float = JOIN_TIMEOUT_S):
        """Nodes 1..M-1: a client of node 0's store."""
        import torch.distributed as dist

        try:
            return dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, OSError) as e:
            raise NodesError(f"--master {self.host}:{self.port}: node 0's launcher did not answer within "
                             f"{timeout_s:.0f} s ({str(e).splitlines()[0]})") from None


def publish(store, job: dict) -> None:
    store.set(JOB_KEY, json.dumps(job))


def await_job(store, timeout_s: float = JOIN_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while not _has(store, JOB_KEY):
        if time.monotonic() > deadline:
            raise NodesError(f"node 0 published no job within {timeout_s:.0f} s (did its launcher refuse the "
                             "config? it says why)")
        time.sleep(0.2)
    return json.loads(store.get(JOB_KEY))


def mark(store, key: str) -> None:
    try:
        store.set(key, "1")
    except (RuntimeError, OSError):  # node 0 gone: nobody is left to read it
        pass


def _has(store, key: str) -> bool:
    return store.check([key])


def chief_done(store) -> bool:
    """Rank 0 has ended, or node 0's store is gone with it."""
    try:
        return _has(store, CHIEF_DONE)
    except (RuntimeError, OSError):
        return True


def wait_nodes(store, nodes: Nodes, timeout_s: float, lost=lambda node: False) -> list[int]:
    """Node 0, its own workers ended: wait up to timeout_s for the others' (their processes may
    still read the store), but not for a node whose workers `lost(node)` says are all dead or
    silent (a lost machine); the nodes that did not finish."""
    deadline = time.monotonic() + timeout_s
    waiting = list(range(1, nodes.count))
    while waiting and time.monotonic() < deadline:
        waiting = [r for r in waiting if not _has(store, f"{NODE_DONE}{r}")]
        if all(lost(r) for r in waiting):
            break
        time.sleep(0.2)
    return waiting
