"""`paratrain run --nnodes 2 --node-rank R --master HOST:PORT`: two launchers on loopback stand in for
two machines (nodes.py). A synchronous job restarts on both nodes from the newest checkpoint to the
uninterrupted run's parameters; an asynchronous one goes on without a lost node, at once."""
import json
import os
import signal
import subprocess
import time

from paratrain.checkpoint import list_checkpoints, read_checkpoint
from paratrain.testing import free_port
from tests.helpers import ENV, MLP, PARATRAIN, cli, config, fit, max_param_diff, records, run_jobs

STEPS, FAULT_AT = 12, 6
COMMON = [*MLP, f"training.steps={STEPS}", "checkpoint.every=4", "run.timeout_s=5"]


def start_nodes(tmp_path, sets: list[str], port: int) -> list[subprocess.Popen]:
    args = [a for s in [*sets, f"run.dir={json.dumps('run')}"] for a in ("--set", s)]
    return [subprocess.Popen([*PARATRAIN, "run", "--nproc", "1", "--nnodes", "2", "--node-rank", str(r),
                              "--master", f"127.0.0.1:{port}", *args], cwd=tmp_path, env=ENV, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            for r in (0, 1)]


def test_ddp_on_two_nodes_restarts_both_after_a_kill_and_equals_the_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    run_jobs({"ref": (fit, config([*COMMON, "strategy.name=ddp"], run_dir=ref))}, 2)
    nodes = start_nodes(tmp_path, [*COMMON, "strategy.name=ddp", "faults.rank=1", f"faults.kill_at_step={FAULT_AT}"],
                        free_port())
    errs = [n.communicate(timeout=240)[1] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], errs
    assert "faults: rank 1 pid" in errs[1] and f"SIGKILL before step {FAULT_AT}" in errs[1]
    assert "node 1: joining the job of 127.0.0.1" in errs[1]
    assert "restart 1: continuing from" in errs[0] and "step-00000004.pt" in errs[0]
    final = lambda d: read_checkpoint(list_checkpoints(d)[-1])["strategy"]["model"]
    assert max_param_diff(final(tmp_path / "run"), final(ref)) == 0.0
    assert [r["step"] for r in records(tmp_path / "run", 1)] == list(range(1, STEPS + 1))


def test_diloco_on_two_nodes_goes_on_at_once_without_a_lost_node(tmp_path):
    """Node 1's launcher and its worker are killed together (a machine lost): node 0 trains to the
    end and exits 0 without waiting for node 1 (torchrun's agents would wait 300 s at exit)."""
    steps = 200
    sets = [*MLP, "strategy.name=diloco", "strategy.local_sgd.sync_every=4", "strategy.local_sgd.outer_lr=0.3",
            f"training.steps={steps}",
            "checkpoint.every=50", "run.timeout_s=5", "faults.rank=0", "faults.delay_s=0.03"]
    nodes = start_nodes(tmp_path, sets, free_port())
    beats, deadline = tmp_path / "run" / "heartbeats", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads((beats / "rank0.json").read_text())["step"] >= 30:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    worker = json.loads((beats / "rank1.json").read_text())["pid"]
    for pid in (nodes[1].pid, worker):  # the launcher and its worker (a session of its own, torch's start_processes)
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    err = nodes[0].communicate(timeout=120)[1]
    nodes[1].wait()
    assert nodes[0].returncode == 0, err
    assert time.monotonic() - t0 < 30, err  # one timeout and a few seconds of heartbeats, not 300 s
    assert "lost rank(s) [1]; continuing on ranks [0]" in err
    assert "node(s) [1] did not finish" in err
    assert [r["step"] for r in records(tmp_path / "run", 0)] == list(range(1, steps + 1))
    assert (tmp_path / "run" / "checkpoints" / f"step-{steps:08d}.pt").exists()


def test_bad_node_arguments_are_one_line_exit_2(tmp_path):
    for args, says in ((["--nnodes", "2"], "--nnodes 2: needs --master HOST:PORT"),
                       (["--nnodes", "2", "--node-rank", "2", "--master", "127.0.0.1:1"],
                        "--node-rank 2: must be 0..1"),
                       (["--nnodes", "2", "--master", "nowhere"], "--master 'nowhere': must be HOST:PORT"),
                       (["--nnodes", "2", "--master", f"127.0.0.1:{free_port()}"], "--nnodes: set run.dir")):
        out = cli(["run", "--nproc", "1", *args, "--set", "strategy.name=ddp", *[a for s in MLP for a in ("--set", s)]],
                  cwd=tmp_path, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and says in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()
