"""Real faults under `paratrain run` and plain torchrun: a worker killed (SIGKILL) or hung (SIGSTOP)
mid-run; the group restarts from the newest checkpoint to the uninterrupted run's parameters, bit for
bit, and the messages name the rank, its pid, the signal and the step."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from paratrain.checkpoint import list_checkpoints, read_checkpoint
from tests.helpers import (
    ENV,
    MLP,
    PARATRAIN,
    TINY_GPT,
    cli,
    config,
    fit,
    max_param_diff,
    records,
    run_jobs,
    server_report,
)

STEPS, EVERY, FAULT_AT = 12, 4, 6  # checkpoints at steps 4, 8, 12; the fault before step 6: steps 5, 6 again


def struck(step: int) -> str:
    """Where a fault before `step` finds its rank, as a regex: the heartbeat (written by a thread every
    0.1 s) says "train_step" at `step` if it caught the step's start, else still the boundary after
    the step before ("agree_to_stop")."""
    return f"({step} in train_step|{step - 1} in agree_to_stop)"


BOUNDARY = struck(FAULT_AT)
COMMON = [f"training.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=5", "training.eval_every=6"]
CASES = {
    "ddp": (2, [*MLP, "strategy.name=ddp"]),
    "pipeline-1f1b": (2, [*TINY_GPT, "strategy.name=pipeline", "strategy.pipeline.schedule=1f1b"]),
}
# A hybrid mesh killed mid-run and restarted: tests/e2e/test_replica_groups.py (its dp axis as replica
# groups); its checkpoint resumed in other layouts: tests/distributed/test_hybrid.py.


def run(tmp_path, name: str, run_dir: str, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    nproc, sets = CASES[name]
    sets = [*sets, *COMMON, *extra, f"run.dir={json.dumps(run_dir)}"]
    return cli(["run", "--nproc", str(nproc), *[a for s in sets for a in ("--set", s)]], cwd=tmp_path,
               timeout=timeout)


def final_params(run_dir) -> dict:
    return read_checkpoint(list_checkpoints(run_dir)[-1])["strategy"]["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each case's run without a fault, trained in-process on ranks of the test runner (the same
    train() the workers of `paratrain run` call, a fraction of their start-up): its run directory."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    by_world: dict[int, dict] = {}
    for name, (nproc, sets) in CASES.items():
        by_world.setdefault(nproc, {})[name] = (fit, config([*sets, *COMMON], run_dir=tmp / name))
    for world, jobs in by_world.items():
        run_jobs(jobs, world)
    return lambda name: tmp / name


def same_as_uninterrupted(faulted, ref) -> None:
    """The faulted run's parameters, losses and records equal an uninterrupted run's, bit for bit."""
    assert max_param_diff(final_params(ref), final_params(faulted)) == 0.0
    got, want = records(faulted), records(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # the repeated steps replaced, not appended
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["eval_loss"] for r in records(faulted, 0, "eval")] == [r["eval_loss"] for r in records(ref, 0, "eval")]


@pytest.mark.parametrize("name", CASES)
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(tmp_path, name, uninterrupted):
    out = run(tmp_path, name, "killed", "faults.rank=1", f"faults.kill_at_step={FAULT_AT}")
    assert out.returncode == 0, out.stderr
    assert "faults: rank 1 pid" in out.stderr and f"SIGKILL before step {FAULT_AT}" in out.stderr
    # A survivor names the dead rank and where it was; the restarted group says where it continues.
    assert "rank 1 (pid" in out.stderr and re.search(f"died at step {BOUNDARY}", out.stderr), out.stderr
    assert "restart 1: continuing from killed/checkpoints/step-00000004.pt" in out.stderr
    assert "restart 2" not in out.stderr, out.stderr  # the fault happened once
    same_as_uninterrupted(tmp_path / "killed", uninterrupted(name))


def test_a_hung_worker_is_named_ended_and_the_group_restarts(tmp_path, uninterrupted):
    out = run(tmp_path, "ddp", "hung", "faults.rank=1", f"faults.hang_at_step={FAULT_AT}", "run.timeout_s=5")
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stderr.splitlines() if "(process stopped)" in line]
    assert len(said) == 1 and "rank 1 (pid" in said[0], out.stderr
    assert re.search(f"stopped at step {BOUNDARY}", said[0]), said[0]
    assert "ended it with SIGKILL" in said[0]
    # Detected by gloo's timeout on the survivor: after run.timeout_s, and within 5 s more.
    silent = float(said[0].split("last heartbeat ")[1].split(" s ago")[0])
    assert 4 <= silent <= 5 + 5, said[0]
    assert "restart 1: continuing from hung/checkpoints/step-00000004.pt" in out.stderr
    same_as_uninterrupted(tmp_path / "hung", uninterrupted("ddp"))


def test_without_restarts_a_kill_fails_the_job_naming_rank_signal_and_step(tmp_path):
    out = run(tmp_path, "ddp", "once", "faults.rank=1", f"faults.kill_at_step={FAULT_AT}", "run.max_restarts=0")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("paratrain: 2 of 2 workers failed: rank 1 (pid "), last
    # The survivor is named after the dead rank: ended by the agent's SIGTERM, or, when its failed
    # collective came first, by its own exit code (both seen under the suite's load).
    survivor = r"rank 0 (stopped by the launcher|\(pid \d+\) exit code 1)"
    assert re.search(f"killed by SIGKILL at step {BOUNDARY}; {survivor}", last), last
    assert "Traceback" not in out.stderr, out.stderr  # the survivor said it in one line
    assert [p.name for p in list_checkpoints(tmp_path / "once")] == ["step-00000004.pt"]  # nothing lost


def test_plain_torchrun_restarts_continue_from_the_newest_checkpoint(tmp_path):
    """torchrun --max-restarts without paratrain's launcher: the run directory it derives is the same on
    every restart, and the restarted workers continue there instead of refusing it."""
    sets = [a for s in [*MLP, "strategy.name=ddp", *COMMON, "faults.rank=1", f"faults.kill_at_step={FAULT_AT}"]
            for a in ("--set", s)]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--max-restarts", "1", "--rdzv-id", "plain", "-m", "paratrain", "worker", *sets],
                         cwd=tmp_path, env={**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    assert "restart 1: continuing from" in out.stderr and "step-00000004.pt" in out.stderr
    assert [r["step"] for r in records(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / f"step-{STEPS:08d}.pt").exists()


# ---------------------------------------------------------------------------- strategies that go on

ASYNC_STEPS, ASYNC_AT, TIMEOUT = 40, 15, 5
ASYNC = {  # (processes, sets): 2 workers and a server; 3 replicas; a ring of 4
    # run.max_restarts = 0: the lost worker is dropped (restarted, it rejoins: the tests after this one).
    # A smaller learning rate than ddp's: SSP with lr 0.05 and momentum 0.9 spiked (a loss of 2.7 at step 30).
    "parameter_server-ssp": (3, [*MLP, "strategy.name=parameter_server", "strategy.ps.mode=ssp", "run.max_restarts=0",
                                 "optimizer.lr=0.02"]),
    "diloco": (3, [*MLP, "strategy.name=diloco", "strategy.local_sgd.sync_every=4", "training.global_batch_size=48"]),
    "gossip": (4, [*MLP, "strategy.name=gossip", "training.global_batch_size=48"]),
}


# Each strategy with the fault its other tests do not give it: a parameter-server worker killed and
# restarted (below), DiLoCo replicas killed (test_replica_groups.py, test_nodes.py).
@pytest.mark.parametrize("name,fault", [("parameter_server-ssp", "hang"), ("diloco", "hang"), ("gossip", "kill"),
                                        ("gossip", "hang")])
def test_a_lost_worker_does_not_end_the_asynchronous_strategies(tmp_path, name, fault):
    """Each worker is its own failure domain (apart.py): a worker killed or stopped mid-run is
    dropped, and the others train to the end; a healthy worker is never declared lost."""
    nproc, sets = ASYNC[name]
    sets = [*sets, f"training.steps={ASYNC_STEPS}", "checkpoint.every=10", f"run.timeout_s={TIMEOUT}",
            "faults.rank=1", f"faults.{fault}_at_step={ASYNC_AT}", f"run.dir={json.dumps('run')}"]
    out = cli(["run", "--nproc", str(nproc), *[a for s in sets for a in ("--set", s)]], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "finished without 1 lost worker(s): ranks [1]" in out.stderr
    survivors = [0] if name.startswith("parameter_server") else [r for r in range(nproc) if r != 1]
    for rank in survivors:
        steps = records(tmp_path / "run", rank)
        assert [r["step"] for r in steps] == list(range(1, ASYNC_STEPS + 1))
        # Detected within run.timeout_s and a few seconds of heartbeats: no step waited longer.
        assert max(r["step_s"] for r in steps) < TIMEOUT + 5, max(r["step_s"] for r in steps)
        # It kept learning: its training loss over the last 10 steps is below that over the first
        # 10 (a window of 5 was too short for SSP's spikes of 4x near step 10; the held-out loss of
        # this small MLP rises after step 10 under ddp too, so it cannot say it).
        losses = [r["loss"] for r in steps]
        assert sum(losses[-10:]) < sum(losses[:10]), losses
        if not name.startswith("parameter_server"):  # the survivors take over the lost rank's share of a batch
            assert steps[0]["samples"] == 48 // nproc and steps[-1]["samples"] == 48 // len(survivors), steps
    if name.startswith("parameter_server"):
        assert server_report(tmp_path / "run")["lost_workers"] == [1]  # rank 0 waited at the gate, alive
        assert "parameter server: lost worker 1; going on with workers [0]" in out.stderr
    else:
        assert f"lost rank(s) [1]; continuing on ranks {survivors}" in out.stderr
    if name == "gossip":  # routed around: ranks 0 and 2, rank 1's neighbours, now gossip with each other
        message = 4 * sum(t.numel() for t in final_params(tmp_path / "run").values())  # fp32, the whole model
        for rank in (0, 2):
            sent = [r["bytes_sent"] for r in records(tmp_path / "run", rank)]
            # two neighbours' messages a step, before the loss and after it (with one neighbour left, one)
            assert set(sent[:ASYNC_AT - 1]) == set(sent[ASYNC_AT:]) == {2 * message}, sent  # steps 1..14, 16..
    if fault == "kill":
        assert "lost rank 1 (pid" in out.stderr
        assert re.search(f"killed by SIGKILL at step {struck(ASYNC_AT)}", out.stderr), out.stderr
    assert (tmp_path / "run" / "checkpoints" / f"step-{ASYNC_STEPS:08d}.pt").exists()


REJOIN_STEPS = 400
# Rank 0 is slowed by 0.05 s a step (faults.delay_s), so that the job still runs when a restarted
# process is back: its start-up takes about 7 s here, more under the suite's load.
PS_REJOIN = [*TINY_GPT, "strategy.name=parameter_server", "strategy.ps.mode=ssp", "optimizer.lr=1e-3",
             f"run.timeout_s={TIMEOUT}", "faults.rank=0", "faults.delay_s=0.05", f"run.dir={json.dumps('run')}"]


def signal_at(tmp_path, after_step: int, victim: int, fault: str, steps: int = REJOIN_STEPS,
              every: int = 100) -> tuple[str, int]:
    """Run PS_REJOIN for `steps` (checkpoints every `every`); once rank 0 is past `after_step`,
    SIGKILL or SIGSTOP rank `victim` from outside (a real fault); (stderr, the victim's pid) after
    the job ends, which it must, with 0."""
    sets = [*PS_REJOIN, f"training.steps={steps}", f"training.eval_every={every}", f"checkpoint.every={every}"]
    job = subprocess.Popen([*PARATRAIN, "run", "--nproc", "3", *[a for s in sets for a in ("--set", s)]],
                           cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    beats, deadline = tmp_path / "run" / "heartbeats", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads((beats / "rank0.json").read_text())["step"] >= after_step:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    pid = json.loads((beats / f"rank{victim}.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    err = job.communicate(timeout=240)[1]
    assert job.returncode == 0, err
    return err, pid


# Each role with one fault (a worker killed, a server stopped): both faults and both roles are
# covered, and each of these tests takes a 400-step job (about 35 s under the suite's load).
@pytest.mark.parametrize("fault", ["kill"])
def test_a_lost_parameter_server_worker_is_restarted_and_rejoins(tmp_path, fault):
    """SSP: the killed (or stopped, then ended) worker is restarted by the launcher, outside the
    job's process group; it connects to the server afresh, pulls the current parameters, and goes
    on from the slowest live worker's step; the steps in between of its data shard are missed."""
    err, pid = signal_at(tmp_path, 15, 1, fault)
    assert f"lost rank 1 (pid {pid}) killed by SIGKILL" in err and "restarting it (restart 1 of 3)" in err
    back = re.search(r"parameter server: worker 1 rejoined at step (\d+); workers \[0, 1\]", err)
    assert back, err
    at = int(back.group(1))
    report = server_report(tmp_path / "run")
    assert report["lost_workers"] == [1] and report["rejoined_workers"] == [1]
    assert report["max_staleness"] <= report["staleness_bound"]
    chief = records(tmp_path / "run", 0)
    assert [r["step"] for r in chief] == list(range(1, REJOIN_STEPS + 1))
    assert max(r["step_s"] for r in chief) < TIMEOUT + 5
    rejoined = [r["step"] for r in records(tmp_path / "run", 1)]
    gone = next(i for i, step in enumerate(rejoined) if step != i + 1)  # its steps before: 1..gone
    assert rejoined == list(range(1, gone + 1)) + list(range(at, REJOIN_STEPS + 1))  # its records before kept
    # its steps while it was away, gone + 1 .. at - 1, and no others (a kill after a push and before its
    # record: one fewer)
    assert report["missed_steps"][0] == 0 and at - gone - 2 <= report["missed_steps"][1] <= at - gone - 1
    # It came back with the current parameters and their versions: its first gradient was as fresh
    # as SSP allows (from the initial ones, a version hundreds of updates old).
    assert records(tmp_path / "run", 1)[gone]["staleness"] <= report["staleness_bound"]
    assert "finished with restarted worker(s) [1]" in err


@pytest.mark.parametrize("fault", ["hang"])
def test_a_lost_parameter_server_restarts_from_its_checkpoint_and_the_workers_reconnect(tmp_path, fault):
    """SSP: the server process, killed (SIGKILL) or stopped (SIGSTOP) from outside after the
    checkpoint of step 50, is restarted by the launcher from that checkpoint; each worker's next
    message to it fails (a stopped one is then ended by the worker), and each reconnects to the new
    incarnation and pulls its parameters: both train every step to the end, no worker lost. (The
    workers cannot step without their server: a shorter job than the worker's rejoin needs.)"""
    steps = 200
    err, server = signal_at(tmp_path, 70, 2, fault, steps=steps, every=50)
    assert f"lost rank 2 (pid {server}) killed by SIGKILL" in err and "restarting it (restart 1 of 3)" in err
    assert "parameter server 0 (rank 2): restart 1: serving from the checkpoint of step 50" in err
    for rank in (0, 1):
        assert f"rank {rank}: parameter server 0 (rank 2) restarted; reconnected at step" in err
        assert [r["step"] for r in records(tmp_path / "run", rank)] == list(range(1, steps + 1))
    report = server_report(tmp_path / "run")  # the restarted server's
    assert report["incarnation"] == 1 and sorted(report["reconnected_workers"]) == [0, 1]
    assert report["lost_workers"] == [] and report["max_staleness"] <= report["staleness_bound"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{steps:08d}.pt").exists()
