"""Atomic writes and clear errors for bad checkpoint files (no processes)."""
import pytest
import torch

from paratrain.checkpoint import FORMAT, VERSION, list_checkpoints, read_checkpoint, resolve_resume, save_atomic
from paratrain.config import ConfigError


def _ckpt(step):
    return {"format": FORMAT, "version": VERSION, "step": step, "strategy": {"w": torch.ones(3) * step}}


def test_atomic_write_reads_back_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoints" / "step-00000010.pt"
    save_atomic(_ckpt(10), path)
    assert read_checkpoint(path)["step"] == 10
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    save_atomic(_ckpt(10), d / "step-00000010.pt")

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        save_atomic(_ckpt(20), d / "step-00000020.pt")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010.pt"]
    assert resolve_resume(tmp_path).name == "step-00000010.pt"
    assert read_checkpoint(resolve_resume(tmp_path))["step"] == 10


def test_truncated_file_is_a_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    save_atomic(_ckpt(5), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ConfigError, match=r"checkpoint '.*bad.pt' cannot be read \(truncated or not a checkpoint\)"):
        read_checkpoint(bad)


@pytest.mark.parametrize("content", [{"weights": torch.ones(2)}, [1, 2, 3]])
def test_foreign_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(ConfigError, match="is not a paratrain checkpoint"):
        read_checkpoint(path)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": ConfigError("x")}, path)  # an arbitrary class
    with pytest.raises(ConfigError, match="cannot be read"):
        read_checkpoint(path)


def test_missing_and_empty(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="holds no checkpoints"):
        resolve_resume(tmp_path)
