"""Your own model imports from `paratrain run` as Python users expect: from the current directory
and from the config file's directory, in the launcher and in every worker (no PYTHONPATH)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
FAST = ["--set", "training.steps=3", "--set", "run.progress=off", "--set", "training.eval_every=0"]


def _paratrain(*args, cwd):
    return subprocess.run([sys.executable, "-m", "paratrain", "run", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=240)


def test_the_readme_custom_example_runs_as_typed(tmp_path):
    out = _paratrain("configs/custom.toml", "--nproc", "2", *FAST, "--set", f"run.dir={tmp_path / 'r'}", cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "metrics" / "rank1.jsonl").exists()


def test_a_module_beside_the_config_imports_from_anywhere(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodel.py").write_text(
        "import torch.nn as nn\ndef build():\n    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1))\n")
    (project / "job.toml").write_text('[model]\nname = "custom"\nfactory = "mymodel:build"\n'
                                      'loss = "torch.nn.functional:mse_loss"\n[data]\nname = "synthetic"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _paratrain(str(project / "job.toml"), "--nproc", "2", *FAST, "--set", "run.dir=r", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert (elsewhere / "r" / "metrics" / "rank1.jsonl").exists()
