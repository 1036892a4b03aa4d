"""A multi-host testbed on one machine: network namespaces, one per host, with rate-limited links.

Each host is a network namespace `pt-<pid>-h<i>` with one interface `veth0` at 10.213.0.<i+1>/24.
Its other end, `h<i>`, sits on a bridge `br0` in a hub namespace `pt-<pid>-hub`: a star, like hosts
on one switch, and one code path for 2 hosts or 20. A token-bucket filter (`tc ... tbf`) limits
both ends of every link to `rate`, so each host sends *and* receives at most `rate`, as through a
switch port (`netem` is missing from this kernel, so no added delay or loss). Every link is created
directly inside a namespace (`ip link add ... netns`), so the machine's own namespace never sees
one, and deleting the namespaces deletes everything. Traffic only ever flows between these
namespaces, on a private subnet that exists nowhere else.

A job runs as one torchrun agent per host (`ip netns exec`), joined by torchrun's c10d
rendezvous on h0, exactly as on separate machines; the file system is shared, so every node sees
the same run directory. `Testbed` is the Python entry (a context manager that always cleans up);
`paratrain testbed up | run | down` drive it from the shell through a small state file.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SUBNET = "10.213.0"  # private /24; host i is .i+1
RDZV_PORT = 29400  # a fresh namespace has every port free
DEFAULT_STATE = Path("/tmp/paratrain-testbed.json")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class TestbedError(Exception):
    """A one-line reason the testbed cannot be made or used."""


def parse_rate(text: str) -> int:
    """'100mbit' -> bits per second (tc's decimal units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", text.strip().lower())
    if not m or float(m[1]) * _UNITS[m[2]] < 8000:  # below 1 kB/s tbf cannot hold one packet per tick
        raise TestbedError(f"--rate '{text}': expected a rate like 100mbit, 1gbit or 500kbit (at least 8kbit)")
    return int(float(m[1]) * _UNITS[m[2]])


def _sh(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise TestbedError(f"'{' '.join(cmd)}' failed: {out.stderr.strip() or out.returncode}")


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _raise_on_signals() -> dict:
    """Turn SIGINT/SIGTERM into exceptions, so `finally` blocks still delete the namespaces."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; the caller's own handling stays

    def stop(signum, frame):
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore(old: dict) -> None:
    for s, handler in old.items():
        signal.signal(s, handler)


class Testbed:
    """`with Testbed(2, "100mbit") as tb:` -> hosts tb.namespaces at tb.addrs; removed on exit."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, hosts: int = 2, rate: str = "100mbit", state_path: Path | None = None,
                 prefix: str | None = None):
        if hosts < 2:
            raise TestbedError(f"--hosts {hosts}: a testbed needs at least 2 hosts")
        self.hosts, self.rate, self.rate_bps = hosts, rate, parse_rate(rate)
        self.prefix = prefix or f"pt-{os.getpid()}"
        self.state_path = state_path
        self.namespaces = [f"{self.prefix}-h{i}" for i in range(hosts)]
        self.hub = f"{self.prefix}-hub"
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self.dev = "veth0"  # the host's only interface: GLOO_SOCKET_IFNAME

    def _tbf(self, ns: str, dev: str) -> None:
        # burst: 10 ms of traffic (at least 16 KiB, above one 1500-byte packet per timer tick);
        # latency: the queue holds 50 ms of traffic, then drops, like a switch buffer, not a backlog.
        burst = max(self.rate_bps // 8 // 100, 16384)
        _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.rate_bps}bit",
            "burst", str(burst), "latency", "50ms")

    def up(self) -> "Testbed":
        if os.geteuid() != 0:
            raise TestbedError("testbed: network namespaces need root (run as root or with CAP_NET_ADMIN)")
        existing = _namespaces()
        if self.state_path and self.state_path.exists():  # one state file names one testbed: never orphan one
            other = json.loads(self.state_path.read_text())["prefix"]
            if any(ns.startswith(other + "-") for ns in existing):
                raise TestbedError(f"testbed: {other}-* is up ({self.state_path}); run 'paratrain testbed down' first")
        if any(ns.startswith(self.prefix + "-") for ns in existing):
            raise TestbedError(f"testbed: namespaces {self.prefix}-* exist already; run 'paratrain testbed down'")
        old = _raise_on_signals()
        try:
            for ns in (self.hub, *self.namespaces):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")  # torchrun and gloo also talk on loopback
            _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            for i, (ns, addr) in enumerate(zip(self.namespaces, self.addrs)):
                port = f"h{i}"
                _sh("ip", "link", "add", self.dev, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.hub)
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", self.dev)
                _sh("ip", "-n", ns, "link", "set", self.dev, "up")
                _sh("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
                self._tbf(ns, self.dev)  # host -> switch
                self._tbf(self.hub, port)  # switch -> host
            if self.state_path:
                self.state_path.write_text(json.dumps(self.state(), indent=2))
        except BaseException:
            self.down()  # a half-made testbed is removed, whatever stopped it
            raise
        finally:
            _restore(old)
        return self

    def down(self) -> None:
        """Delete every namespace with our prefix (their links go with them); idempotent."""
        for ns in _namespaces():
            if ns.startswith(self.prefix + "-"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self.state_path:
            self.state_path.unlink(missing_ok=True)

    def __enter__(self) -> "Testbed":
        self.up()
        self._old_handlers = _raise_on_signals()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            _restore(self._old_handlers)

    def state(self) -> dict:
        return {"hosts": self.hosts, "rate": self.rate, "prefix": self.prefix, "namespaces": self.namespaces,
                "hub": self.hub, "addrs": self.addrs, "dev": self.dev}

    @classmethod
    def load(cls, state_path: Path) -> "Testbed":
        if not state_path.exists():
            raise TestbedError(f"testbed: no testbed is up ({state_path} missing); run 'paratrain testbed up'")
        s = json.loads(state_path.read_text())
        return cls(s["hosts"], s["rate"], state_path, s["prefix"])

    def exec(self, host: int, cmd: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start `cmd` inside host `host`'s namespace, with its interface as gloo's."""
        env = {**os.environ, "GLOO_SOCKET_IFNAME": self.dev, "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *cmd], env=env, **kw)

    def run_job(self, worker_args: list[str], nproc_per_host: int = 1, rdzv_id: str | None = None) -> int:
        """One torchrun agent per host running `-m paratrain worker *worker_args`; exit code."""
        rdzv_id = rdzv_id or f"{self.prefix}-{int(time.time())}"
        env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see launch.LAUNCH_ENV
        nodes = [self.exec(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.hosts),
                               "--nproc-per-node", str(nproc_per_host), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"{self.addrs[0]}:{RDZV_PORT}", "--rdzv-id", rdzv_id,
                               "--local-addr", addr, "--rdzv-conf", f"is_host={str(i == 0).lower()}",
                               "--max-restarts", "0", "-m", "paratrain", "worker", *worker_args], env)
                 for i, addr in enumerate(self.addrs)]
        old = _raise_on_signals()
        try:
            while any(n.poll() is None for n in nodes):
                # One failed node leaves its peers waiting up to run.timeout_s: stop them now.
                if any(n.poll() not in (None, 0) for n in nodes):
                    break
                time.sleep(0.2)
        finally:
            for n in nodes:
                if n.poll() is None:
                    n.terminate()  # torchrun passes SIGTERM on to its workers
            for n in nodes:
                try:
                    n.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    n.kill()
                    n.wait()
            _restore(old)
        codes = [n.returncode for n in nodes]
        return 0 if all(c == 0 for c in codes) else 2 if 2 in codes else 1


# One rank of the all-reduce measurement: alpha from a 4-byte all-reduce, then the big one.
_ALLREDUCE_RANK = """
import os, sys, time, datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
def timed(numel, repeats):
    x = torch.ones(numel)
    dist.all_reduce(x)  # warm-up: connections, buffers
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter(); dist.all_reduce(x); times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
alpha_s, big_s = timed(1, 20), timed(int(sys.argv[1]) // 4, int(sys.argv[2]))
if dist.get_rank() == 0:
    print(alpha_s, big_s)
dist.destroy_process_group()
"""


def measure_allreduce(tb: Testbed, num_bytes: int = 25 * 2**20, repeats: int = 3) -> tuple[float, float]:
    """(alpha_s, all_reduce_s): medians of a 4-byte and a `num_bytes` float32 all-reduce, one rank per host."""
    env = {"WORLD_SIZE": str(tb.hosts), "MASTER_ADDR": tb.addrs[0], "MASTER_PORT": str(RDZV_PORT)}
    ranks = [tb.exec(i, [sys.executable, "-c", _ALLREDUCE_RANK, str(num_bytes), str(repeats)],
                     {**env, "RANK": str(i)}, stdout=subprocess.PIPE, text=True) for i in range(tb.hosts)]
    out = [r.communicate(timeout=300)[0] for r in ranks]
    if any(r.returncode for r in ranks):
        raise TestbedError(f"all-reduce measurement failed: exit codes {[r.returncode for r in ranks]}")
    alpha_s, big_s = map(float, out[0].split())
    return alpha_s, big_s


def predict_allreduce_s(hosts: int, num_bytes: int, rate_bps: int, alpha_s: float) -> float:
    """Ring all-reduce, alpha-beta model: each host sends 2 (n-1)/n of the data at the link rate.

    tbf counts whole frames, so TCP/IP/Ethernet headers (~4.5% at MTU 1500) are not in the model."""
    return alpha_s + 2 * (hosts - 1) / hosts * num_bytes * 8 / rate_bps


if __name__ == "__main__":  # python -m paratrain.testbed [HOSTS] [RATE]: measured vs predicted
    hosts, rate = int(sys.argv[1]) if len(sys.argv) > 1 else 2, sys.argv[2] if len(sys.argv) > 2 else "100mbit"
    with Testbed(hosts, rate) as bed:
        alpha_s, measured_s = measure_allreduce(bed)
    predicted_s = predict_allreduce_s(hosts, 25 * 2**20, bed.rate_bps, alpha_s)
    print(f"25 MiB all-reduce, {hosts} hosts at {rate}: measured {measured_s:.3f} s, alpha-beta predicted "
          f"{predicted_s:.3f} s (alpha {alpha_s * 1e3:.2f} ms), ratio {measured_s / predicted_s:.3f}")
