"""Nothing lost, nothing mixed up: run directories, resume rules, verified checkpoints, a full
disk and signals, tried as a user would with `paratrain run` (real processes, real signals)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from paratrain.checkpoint import list_checkpoints, read_checkpoint, step_of
from tests.helpers import ENV, MLP, PARATRAIN, cli, records

# helpers.MLP, one process, plain SGD, no evaluation
RUN = [*MLP, "training.eval_every=0", "optimizer.momentum=0", "strategy.name=single", "run.nproc=1"]
SLOW = ["faults.rank=0", "faults.delay_s=0.05"]  # a run that lives a few seconds


def _args(*sets: str) -> list[str]:
    return ["run", *(a for s in (*RUN, *sets) for a in ("--set", s))]


def _run(cwd, *sets, extra=(), timeout=120):
    return cli([*_args(*sets), *extra], cwd=cwd, timeout=timeout)


def _start(cwd, *sets, extra=()):
    return subprocess.Popen([*PARATRAIN, *_args(*sets), *extra], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _steps(run_dir: Path, rank=0) -> list[int]:
    return [r["step"] for r in records(run_dir, rank)]


def _wait_for(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def _one_line(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    return lines[0]


# -- one owner per run directory

def test_concurrent_starts_never_share_a_directory(tmp_path):
    runs = [_start(tmp_path, *SLOW, "training.steps=40", "run.name=same", f"optimizer.lr={lr}") for lr in (0.01, 0.02)]
    outs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    dirs = sorted((tmp_path / "runs").iterdir())
    assert [d.name for d in dirs] == ["same-001", "same-002"]
    assert sorted(json.loads((d / "config.json").read_text())["optimizer"]["lr"] for d in dirs) == [0.01, 0.02]
    for d in dirs:  # each trained with its own settings, from its own records
        assert _steps(d) == list(range(1, 41))
        assert read_checkpoint(list_checkpoints(d)[-1])["config"]["optimizer"]["lr"] == \
            json.loads((d / "config.json").read_text())["optimizer"]["lr"]


def test_a_live_run_refuses_a_second_start_and_a_resume(tmp_path):
    live = _start(tmp_path, *SLOW, "training.steps=400", "run.dir=r", "checkpoint.every=5")
    try:
        _wait_for(lambda: list_checkpoints(tmp_path / "r"))
        for extra, sets in (((), ["run.dir=r"]), (("--resume", "r"), ["training.steps=800"])):
            line = _one_line(_run(tmp_path, *sets, extra=extra))
            assert f"run.dir = 'r': in use by a live run (pid {live.pid} on host" in line
        assert json.loads((tmp_path / "r" / "config.json").read_text())["training"]["steps"] == 400
    finally:
        live.kill()
        live.wait()
    # Killed (-9): the lock went with it, so the run can be continued.
    out = _run(tmp_path, "training.steps=400", extra=("--resume", "r"))
    assert out.returncode == 0, out.stderr
    assert _steps(tmp_path / "r") == list(range(1, 401))


def test_changed_settings_are_recorded_beside_the_first_config(tmp_path):
    assert _run(tmp_path, "run.dir=r", "optimizer.schedule=constant").returncode == 0
    first = (tmp_path / "r" / "config.json").read_text()
    out = _run(tmp_path, "training.steps=30", "optimizer.lr=0.01", extra=("--resume", "r"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "config.json").read_text() == first
    assert json.loads((tmp_path / "r" / "config-2.json").read_text())["optimizer"]["lr"] == 0.01


# -- resume rules

def _ten_step_checkpoints(tmp_path):
    out = _run(tmp_path, "run.dir=r", "training.steps=60", "checkpoint.every=10", "checkpoint.keep=10")
    assert out.returncode == 0, out.stderr
    return tmp_path / "r" / "checkpoints"


def test_resuming_an_older_checkpoint_forks_and_never_deletes_newer_work(tmp_path):
    ckpts = _ten_step_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    out = _run(tmp_path, "training.steps=60", "checkpoint.every=10", "checkpoint.keep=2", "run.name=r",
               extra=("--resume", "r/checkpoints/step-00000020.pt"))
    assert out.returncode == 0, out.stderr
    assert "resumed from step 20 of r" in out.stderr and "forks into runs/r-001" in out.stderr
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # the original run is untouched
    fork = tmp_path / "runs" / "r-001"
    assert _steps(fork) == list(range(1, 61))  # its history up to step 20 came along: the summary counts it all
    assert [step_of(p) for p in list_checkpoints(fork)] == [50, 60]  # rotation within the fork only
    # --resume of the original directory continues from its newest: step 60 is there, nothing to do.
    line = _one_line(_run(tmp_path, "training.steps=60", extra=("--resume", "r")))
    assert "training.steps = 60: the checkpoint 'r/checkpoints/step-00000060.pt' is at step 60 already" in line


def test_discard_newer_says_what_it_deletes_and_continues_in_place(tmp_path):
    _ten_step_checkpoints(tmp_path)
    out = _run(tmp_path, "training.steps=40", "checkpoint.every=10", "checkpoint.keep=10",
               extra=("--resume", "r/checkpoints/step-00000020.pt", "--discard-newer"))
    assert out.returncode == 0, out.stderr
    assert ("deleting its newer checkpoints: step-00000030.pt, step-00000040.pt, step-00000050.pt, "
            "step-00000060.pt") in out.stderr
    assert [step_of(p) for p in list_checkpoints(tmp_path / "r")] == [10, 20, 30, 40]
    assert _steps(tmp_path / "r") == list(range(1, 41))


def test_an_explicit_run_dir_is_honoured_on_resume(tmp_path):
    ckpts = _ten_step_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    out = _run(tmp_path, "training.steps=70", "run.dir=elsewhere", extra=("--resume", "r/checkpoints/step-00000060.pt"))
    assert out.returncode == 0, out.stderr
    assert "resumed from step 60 of r, into elsewhere" in out.stderr
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before
    assert (tmp_path / "r" / "config.json").exists() and _steps(tmp_path / "elsewhere") == list(range(1, 71))
    assert json.loads((tmp_path / "elsewhere" / "config.json").read_text())["run"]["dir"] == "elsewhere"


def test_rotation_after_resume_keeps_the_newest(tmp_path):
    """Resuming a 60-step run from its newest checkpoint with keep = 2: old ones go, never new ones."""
    _ten_step_checkpoints(tmp_path)
    out = _run(tmp_path, "training.steps=80", "checkpoint.every=10", "checkpoint.keep=2", extra=("--resume", "r"))
    assert out.returncode == 0, out.stderr
    assert "resumed from step 60 of r" in out.stderr
    assert [step_of(p) for p in list_checkpoints(tmp_path / "r")] == [70, 80]


def test_a_start_that_died_before_its_first_checkpoint_does_not_block_its_name(tmp_path):
    dead = _start(tmp_path, *SLOW, "training.steps=400", "run.dir=r")
    _wait_for(lambda: (tmp_path / "r" / "metrics" / "rank0.jsonl").exists()
              and (tmp_path / "r" / "metrics" / "rank0.jsonl").stat().st_size > 0)
    dead.kill()  # SIGKILL: no clean-up, no checkpoint
    dead.wait()
    out = _run(tmp_path, "run.dir=r")  # the same command again
    assert out.returncode == 0, out.stderr
    assert "held a start that ended before its first checkpoint; its files are kept in r/attempts/001" in out.stderr
    assert (tmp_path / "r" / "attempts" / "001" / "metrics" / "rank0.jsonl").stat().st_size > 0
    assert _steps(tmp_path / "r") == list(range(1, 21))
    # --resume of a directory with no checkpoint yet starts it from step 0 instead of failing.
    assert _run(tmp_path, "run.dir=fresh", "checkpoint.enabled=false").returncode == 0
    assert _one_line(_run(tmp_path, "run.dir=fresh", "checkpoint.enabled=false")).endswith(
        "run.dir = 'fresh': already holds a finished run without checkpoints; choose another run.dir")


# -- verified checkpoints

def test_a_flipped_weight_is_caught_and_resume_falls_back(tmp_path):
    ckpts = _ten_step_checkpoints(tmp_path)
    newest = ckpts / "step-00000060.pt"
    data = bytearray(newest.read_bytes())
    weight = read_checkpoint(newest)["strategy"]["model"]["0.weight"]
    needle = weight.reshape(-1)[:2].numpy().tobytes()  # 8 bytes inside the first layer's weights
    at = bytes(data).index(needle)
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    newest.write_bytes(bytes(data))
    line = _one_line(_run(tmp_path, "training.steps=70", extra=("--resume", str(newest))))
    assert f"checkpoint '{newest}' fails its checksum" in line
    out = _run(tmp_path, "training.steps=70", extra=("--resume", "r"))
    assert out.returncode == 0, out.stderr
    assert "step-00000060.pt' fails its checksum" in out.stderr and "resumed from step 50 of r" in out.stderr
    assert (ckpts / "step-00000060.pt.corrupt").exists()  # set aside, not deleted
    assert read_checkpoint(list_checkpoints(tmp_path / "r")[-1])["step"] == 70


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path):
    sets = ["training.steps=60", "checkpoint.every=10", "checkpoint.keep=10", "model.hidden=2000", "optimizer.lr=0.001"]
    assert _run(tmp_path, "run.dir=measure", *sets).returncode == 0
    files = [p for p in (tmp_path / "measure").rglob("*") if p.is_file()]
    one = list_checkpoints(tmp_path / "measure")[-1].stat().st_size
    rest = sum(p.stat().st_size for p in files if p.suffix != ".pt")
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kib = (rest + 2 * one + one // 2) // 1024 + 64  # room for two checkpoints, not three
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = _run(tmp_path, f"run.dir={disk}/r", *sets)
        assert out.returncode == 1, out.stderr
        lines = [line for line in out.stderr.splitlines() if "no space left" in line]
        assert len(lines) == 1 and f"no space left in '{disk}/r/checkpoints'" in lines[0] and "MiB free" in lines[0]
        assert "Traceback" not in out.stderr
        names = sorted(p.name for p in (disk / "r" / "checkpoints").iterdir())
        assert names == ["step-00000010.pt", "step-00000020.pt"]  # no temporary file left behind
        for p in list_checkpoints(disk / "r"):
            read_checkpoint(p)  # every one written is whole
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# -- signals

def _ddp(*sets):
    return ["strategy.name=ddp", *sets]


def _start_ddp(tmp_path, *sets):
    return _start(tmp_path, *_ddp(*SLOW, "training.steps=100000", "run.dir=r", *sets), extra=("--nproc", "2"))


def _workers(launcher: subprocess.Popen) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher.pid:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.parametrize("target", ["launcher", "worker"])
def test_sigterm_checkpoints_at_a_step_boundary_and_resume_continues(tmp_path, target):
    run = _start_ddp(tmp_path)
    _wait_for(lambda: (tmp_path / "r" / "metrics" / "rank1.jsonl").exists()
              and len(_steps(tmp_path / "r", 1)) >= 5)
    pid = run.pid if target == "launcher" else max(_workers(run))
    os.kill(pid, signal.SIGTERM)
    _, err = run.communicate(timeout=150)
    assert run.returncode == 128 + signal.SIGTERM, err
    lines = [line for line in err.splitlines() if line.startswith("paratrain")]
    assert len(lines) == 1 and "paratrain: stopped by SIGTERM; newest checkpoint r/checkpoints/step-" in lines[0], err
    (ckpt,) = list_checkpoints(tmp_path / "r")
    step = read_checkpoint(ckpt)["step"]
    assert _steps(tmp_path / "r", 0) == _steps(tmp_path / "r", 1) == list(range(1, step + 1))  # both ranks, one step
    assert json.loads((tmp_path / "r" / "owner.json").read_text())["status"] == "interrupted"
    out = _run(tmp_path, *_ddp(f"training.steps={step + 3}"), extra=("--resume", "r", "--nproc", "2"))
    assert out.returncode == 0, out.stderr
    assert f"resumed from step {step} of r" in out.stderr and _steps(tmp_path / "r") == list(range(1, step + 4))


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run = _start_ddp(tmp_path, "faults.delay_s=5")  # a step takes 5 s: the first Ctrl-C waits for it
    _wait_for(lambda: len(_workers(run)) == 2 and (tmp_path / "r" / "metrics" / "rank1.jsonl").exists())
    time.sleep(1)
    run.send_signal(signal.SIGINT)
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    # It did not wait for the step in flight: no checkpoint at its boundary (one Ctrl-C writes one).
    assert not list_checkpoints(tmp_path / "r"), err
    assert run.returncode == 128 + signal.SIGINT, err
    lines = [line for line in err.splitlines() if line.startswith("paratrain")]
    assert len(lines) == 1 and "paratrain: stopped by SIGINT" in lines[0], err
    assert "Traceback" not in err
    _wait_for(lambda: not _workers(run), timeout=10)


@pytest.mark.parametrize("run_dir,message", [
    ("a_file", "run.dir = 'a_file': is a file, not a directory"),
    ("a_file/sub", "run.dir = 'a_file/sub': 'a_file' is a file, not a directory"),
    ("/proc/paratrain-run", "run.dir = '/proc/paratrain-run': cannot write in '/proc'"),
])
def test_a_run_dir_that_cannot_be_written_is_refused_before_anything(tmp_path, run_dir, message):
    (tmp_path / "a_file").write_text("mine")
    line = _one_line(_run(tmp_path, f"run.dir={run_dir}"))
    assert message in line
    assert (tmp_path / "a_file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
