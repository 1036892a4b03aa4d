"""A local `paratrain run` listens on loopback only: its rendezvous store, rank 0's process-group
store and gloo's pair sockets, read from /proc while a live run trains."""
import ipaddress
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ENV, PARATRAIN

SETS = ["model.name=mlp", "data.name=synthetic", "data.num_samples=512", "training.global_batch_size=32",
        "training.steps=100", "training.eval_every=0", "run.progress=off",
        "faults.rank=0", "faults.delay_s=0.05"]  # a run that lives a few seconds
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column

pytestmark = pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads Linux's /proc")


def _tree(root: int) -> list[int]:
    """`root` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _address(hex_addr: str) -> str:
    """/proc/net/tcp{,6}'s local address (32-bit words in host order, little-endian here)."""
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that process `pid` holds in the listening state."""
    try:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
        found = set()
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == LISTEN and fields[9] in inodes:
                    host, port = fields[1].split(":")
                    found.add((_address(host), int(port, 16)))
        return found
    except OSError:  # the process ended while being read
        return set()


def test_a_local_run_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "GLOO_SOCKET_IFNAME"}  # the launcher's default
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([*PARATRAIN, "run", "--nproc", "2",
                                 *[a for s in SETS for a in ("--set", s)]],
                                cwd=tmp_path, env=env, stdout=out, stderr=err)
        seen: dict[int, set[tuple[str, int]]] = {}
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                for pid in _tree(proc.pid):
                    seen.setdefault(pid, set()).update(_listening(pid))
                time.sleep(0.1)
            proc.wait(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, (tmp_path / "err.txt").read_text()
    listeners = {pid: socks for pid, socks in seen.items() if socks}
    # The launcher (its rendezvous store) and both workers (rank 0's store, gloo's pairs) listened.
    assert proc.pid in listeners and len(listeners) >= 3, listeners
    wide = {pid: socks for pid, socks in listeners.items() if any(host != "127.0.0.1" for host, _ in socks)}
    assert not wide, f"listening beyond loopback: {wide}"
