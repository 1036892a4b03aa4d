"""The newcomer's path: the README's Python, every ```python block in order, run as written in a
fresh interpreter from a directory that holds `configs/` (as the repository root does) and nothing
else of the repository: a 2-process pipeline launched from Python and loaded back, then a model,
loss, data and metric of one's own trained in this process."""
import re
import subprocess
import sys

from tests.helpers import ROOT


def test_the_readmes_python_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "the README shows no Python"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "readme.py").write_text("\n".join(blocks))
    out = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said = dict(line.split(": ", 1) for line in out.stdout.splitlines() if line.startswith(("launch: ", "train: ")))
    code, run_dir, checkpoint, eval_loss = said["launch"].split()
    assert code == "0" and (tmp_path / run_dir / "checkpoints" / checkpoint).is_file() and float(eval_loss) < 4
    run_dir, accuracy = said["train"].split()
    assert (tmp_path / run_dir / "summary.json").is_file() and float(accuracy) >= 0.9
