"""The one-machine multi-host testbed: namespaces come and go cleanly, and a 2-host job runs over it.

Needs root (network namespaces); where they cannot be made, these tests are skipped, not failed.
"""
import json
import os
import subprocess
import sys

import pytest

from paratrain.testbed import SUBNET, Testbed, _namespaces
from tests.helpers import TINY_GPT, cli, records


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0:
        pytest.skip("testbed needs root to create network namespaces")
    probe = f"pt-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"'ip netns add' is not allowed here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], check=True)


def _ours(prefix: str) -> list[str]:
    return [ns for ns in _namespaces() if ns.startswith(prefix + "-")]


SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, _ = s.accept()
n = 0
while chunk := conn.recv(65536):
    n += len(chunk)
print(n)
"""
CLIENT = """
import socket, sys, time
for _ in range(100):  # until the server listens
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
c.sendall(b"x" * 100_000)
c.close()
"""


def test_up_tcp_between_hosts_then_down(netns):
    with Testbed(2, "100mbit") as tb:
        assert set(_ours(tb.prefix)) == {*tb.namespaces, tb.hub}
        server = tb.exec(1, [sys.executable, "-c", SERVER, tb.addrs[1], "5000"], stdout=subprocess.PIPE, text=True)
        client = tb.exec(0, [sys.executable, "-c", CLIENT, tb.addrs[1], "5000"])
        assert client.wait(timeout=20) == 0
        assert server.communicate(timeout=20)[0].strip() == "100000"
        assert tb.addrs == [f"{SUBNET}.1", f"{SUBNET}.2"]
    assert _ours(tb.prefix) == []


def test_cleanup_when_the_body_raises(netns):
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed(3, "10mbit") as tb:
            assert len(_ours(tb.prefix)) == 4
            raise RuntimeError("boom")
    assert _ours(tb.prefix) == []


def test_bad_input_is_one_line_exit_2(tmp_path):
    for args, message in ((["--rate", "fast"], "--rate 'fast'"), (["--hosts", "1"], "--hosts 1")):
        out = cli(["testbed", "up", *args, "--state", str(tmp_path / "s.json")], tmp_path, timeout=120)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr
    assert not (tmp_path / "s.json").exists()


def test_two_host_ddp_run_over_the_cli(netns, tmp_path):
    state = ["--state", str(tmp_path / "testbed.json")]
    up = cli(["testbed", "up", "--hosts", "2", "--rate", "100mbit", *state], tmp_path, timeout=120)
    assert up.returncode == 0, up.stderr
    prefix = json.loads((tmp_path / "testbed.json").read_text())["prefix"]
    try:
        sets = [a for s in [*TINY_GPT, "training.steps=5", "training.eval_every=5", "strategy.name=ddp",
                            "run.timeout_s=60", "run.dir=shared"] for a in ("--set", s)]
        out = cli(["testbed", "run", *sets, "--nproc-per-host", "1", *state], tmp_path, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        down = cli(["testbed", "down", *state], tmp_path, timeout=120)
    assert down.returncode == 0 and _ours(prefix) == []
    assert cli(["testbed", "down", *state], tmp_path, timeout=120).returncode == 0  # idempotent
    for rank in (0, 1):
        assert [r["step"] for r in records(tmp_path / "shared", rank)] == list(range(1, 6))
