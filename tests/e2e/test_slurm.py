"""examples/slurm/paratrain.sbatch on a real single-node SLURM cluster on this machine: Debian's
slurm-wlm and munge, installed with apt-get when they are missing and this runs as root,
started here (slurmctld and slurmd with a config of their own, on free ports) and stopped after.
A job trains; SLURM's SIGTERM (scancel --signal=TERM, what --signal sends before the time limit)
stops it at a step boundary with a checkpoint; a second submission of the same job resumes
there and finishes. Skipped, saying why, only where the cluster cannot be had."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paratrain.testing import free_port
from tests.helpers import ENV, MLP, ROOT, apt_install, records

SCRIPT = ROOT / "examples" / "slurm" / "paratrain.sbatch"


def _munge() -> None:
    """munged running as its user, with its socket directory (a container has no /run/munge)."""
    if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "--create"], check=False, capture_output=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    for d in ("/var/log/munge", "/var/lib/munge"):
        if Path(d).exists():
            shutil.chown(d, "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "munged"], capture_output=True, timeout=30)
    for _ in range(50):
        if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    pytest.skip("munged did not start: SLURM cannot authenticate")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a one-node cluster (this machine, 2 CPUs), its daemons running."""
    apt_install(["slurm-wlm", "munge"], ["sbatch", "slurmctld", "slurmd", "munged"])
    _munge()
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=paratrain-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName={host} CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([daemon, "-D", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for daemon, extra in (("slurmctld", ["-c"]), ("slurmd", []))]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.skip(f"the SLURM cluster did not come up: sinfo says {state.strip()!r} ({d}/slurmctld.log)")
        yield env
    finally:
        for p in daemons:
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _submit(slurm_env, cwd: Path) -> str:
    sets = [*MLP, "training.steps=150", "training.eval_every=50", "checkpoint.every=50", "run.progress=lines",
            "faults.rank=0", "faults.delay_s=0.05", "run.name=mlp"]
    env = {**ENV, **slurm_env, "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port())}
    out = subprocess.run(["sbatch", "--parsable", "--job-name=pt", f"--chdir={cwd}", str(SCRIPT),
                          *[a for s in sets for a in ("--set", s)]], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _wait_gone(slurm_env, job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run(["squeue", "-h", "-j", job], env=slurm_env, capture_output=True, text=True).stdout
        if not listed.strip():
            return
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=slurm_env)
    pytest.fail(f"job {job} still queued or running after {timeout} s")


def _said(log: str) -> list[str]:
    """paratrain's own lines in a job's log (`pytest -s` shows them): no tracebacks of torch's agent."""
    return [line for line in log.splitlines() if line.startswith(("paratrain", "step "))][-12:]


def test_a_batch_job_stops_on_sigterm_with_a_checkpoint_and_the_next_submission_resumes(slurm, tmp_path):
    job = _submit(slurm, tmp_path)
    run_dir = tmp_path / "runs" / "mlp-pt"  # runs/<run.name>-<job name>: the same for every submission
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run_dir / "metrics" / "rank1.jsonl").exists() and len(records(run_dir, 1)) >= 60:
            break
        time.sleep(0.3)
    # what SLURM sends every process of the job's steps `--signal` seconds before the time limit
    subprocess.run(["scancel", "--signal=TERM", job], env=slurm, check=True)
    _wait_gone(slurm, job, 120)
    log = (tmp_path / f"pt-{job}.out").read_text()
    print(f"--- job {job} (scancel --signal=TERM mid-run), its log's paratrain lines:", *_said(log), sep="\n")
    ended = json.loads((run_dir / "ended.json").read_text())
    assert ended["exit_code"] == 143 and "stopped by SIGTERM after step" in ended["why"], log
    stop = int(ended["why"].split("after step ")[1].split(";")[0])
    assert 60 <= stop < 150 and (run_dir / "checkpoints" / f"step-{stop:08d}.pt").exists(), log
    assert [r["step"] for r in records(run_dir, 0)] == [r["step"] for r in records(run_dir, 1)] == [*range(1, stop + 1)]

    again = _submit(slurm, tmp_path)
    _wait_gone(slurm, again, 240)
    log = (tmp_path / f"pt-{again}.out").read_text()
    print(f"--- job {again} (submitted again), its log's paratrain lines:", *_said(log), sep="\n")
    assert f"resumed from step {stop} of runs/mlp-pt" in log, log
    assert [r["step"] for r in records(run_dir, 0)] == list(range(1, 151))
    assert (run_dir / "checkpoints" / "step-00000150.pt").exists()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 150
