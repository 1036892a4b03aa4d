"""`paratrain run` and plain `torchrun` end to end, as a user types them (real processes)."""
import json
import subprocess
import sys

from paratrain.checkpoint import read_checkpoint
from paratrain.testing import free_port
from tests.helpers import ENV, ROOT, TINY_GPT, cli, records

SETS = [a for s in [*TINY_GPT, "optimizer.warmup_steps=2", "optimizer.schedule=constant"]
        if not s.startswith(("run.progress", "checkpoint.enabled"))
        for a in ("--set", s)]


def test_run_two_processes_writes_metrics_checkpoints_and_summary(tmp_path):
    out = cli(["run", str(ROOT / "configs/demo.toml"), "--nproc", "2", *SETS,
              "--set", "checkpoint.every=10", "--set", "run.name=e2e"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "e2e-001"
    for rank in (0, 1):
        steps = records(run_dir, rank)
        assert [r["step"] for r in steps] == list(range(1, 21))  # steps count from 1, as the progress lines do
        for key in ("loss", "lr", "tokens_per_s", "samples_per_s", "compute_s", "comm_s", "optim_s",
                    "data_s", "bytes_sent"):
            assert all(key in r for r in steps), key
        assert all(r["bytes_sent"] > 0 for r in steps)
        assert [r["step"] for r in records(run_dir, rank, "eval")] == [10, 20]
    # One step numbering: the evaluations, the checkpoints and the progress lines name the same steps.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000010.pt", "step-00000020.pt"]
    said = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("step ") and " eval " in line]
    assert said == ["10/20", "20/20"] and "final eval loss" in out.stdout  # progress lines + summary
    assert json.loads((run_dir / "config.json").read_text())["run"]["dir"] == "runs/e2e-001"

    # A second run never touches the first; resuming a finished run with more steps continues it.
    again = cli(["run", str(ROOT / "configs/demo.toml"), "--nproc", "2", *SETS,
                 "--set", "run.name=e2e", "--set", "training.steps=25", "--resume", "runs/e2e-001"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in records(run_dir, 0)] == list(range(1, 26))
    assert "step-00000025.pt" in {p.name for p in (run_dir / "checkpoints").iterdir()}


def test_a_bad_newest_checkpoint_falls_back_and_a_bad_file_fails_before_workers(tmp_path):
    ok = cli(["run", "--nproc", "1", *SETS, "--set", "strategy.name=single", "--set", "run.dir=r",
              "--set", "checkpoint.every=10"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    ckpts = tmp_path / "r" / "checkpoints"
    good = ckpts / "step-00000010.pt"
    latest = ckpts / "step-00000020.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated by a disk failure
    before = good.read_bytes()
    # Naming the bad file itself: one line, before any worker, nothing touched.
    out = cli(["run", "--nproc", "2", *SETS, "--set", "training.steps=30", "--resume", str(latest)],
              cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "step-00000020.pt' cannot be read (truncated or not a checkpoint)" in lines[0]
    assert good.read_bytes() == before and not (tmp_path / "runs").exists()
    # The run directory: its newest checkpoint that verifies, said so, continued in place.
    out = cli(["run", "--nproc", "2", *SETS, "--set", "training.steps=30", "--resume", "r"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "step-00000020.pt' cannot be read" in out.stderr and "trying the one before" in out.stderr
    assert "resumed from step 10 of r" in out.stderr
    assert [r["step"] for r in records(tmp_path / "r")] == list(range(1, 31))
    # The bad file is set aside, out of the rotation, so that the good one is kept.
    assert {p.name for p in ckpts.iterdir()} == {"step-00000010.pt", "step-00000020.pt.corrupt", "step-00000030.pt"}
    assert good.read_bytes() == before and read_checkpoint(ckpts / "step-00000030.pt")["step"] == 30


def test_existing_run_dir_is_not_overwritten(tmp_path):
    (tmp_path / "r" / "metrics").mkdir(parents=True)
    (tmp_path / "r" / "metrics" / "rank0.jsonl").write_text("precious\n")
    out = cli(["run", "--nproc", "2", *SETS, "--set", "run.dir=r"], cwd=tmp_path)
    assert out.returncode == 2 and "run.dir = 'r': already holds a run" in out.stderr
    assert (tmp_path / "r" / "metrics" / "rank0.jsonl").read_text() == "precious\n"


def test_plain_torchrun_two_nodes_rendezvous(tmp_path):
    """Two torchrun agents on loopback stand in for two machines (c10d rendezvous, --nnodes 2)."""
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "twonodes", "--max-restarts", "0"]
    worker = ["-m", "paratrain", "worker", str(ROOT / "configs/demo.toml"), *SETS]
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common,
                               "--rdzv-conf", f"is_host={str(i == 0).lower()}", *worker],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    run_dir = tmp_path / "runs" / "demo-twonodes"
    assert len(records(run_dir, 0)) == 20
    assert len(records(run_dir, 1)) == 20
    assert (run_dir / "checkpoints" / "step-00000020.pt").exists()
