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


def _gpt_checkpoint(cfg, vocab):
    from paratrain.models import build_model

    return {"config": cfg.to_dict(), "strategy": {"model": build_model(cfg, vocab).state_dict()}}


def test_a_checkpoint_for_other_data_or_schedule_is_refused():
    from paratrain.checkpoint import check_compatible
    from paratrain.config import load_config
    from paratrain.models import build_model

    cfg = load_config(None, ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "optimizer.schedule=cosine"])
    here = build_model(cfg, 103)
    check_compatible(_gpt_checkpoint(cfg, 103), cfg, "c.pt", here)  # the same: fine
    with pytest.raises(ConfigError, match=r"does not fit this model: tok_emb.weight is \(4, 16\) there, "
                                          r"\(103, 16\) here"):
        check_compatible(_gpt_checkpoint(cfg, 4), cfg, "c.pt", here)  # trained on another corpus
    with pytest.raises(ConfigError, match="written for another model \\(model.n_layer differ\\)"):
        check_compatible(_gpt_checkpoint(cfg, 103), cfg.replace("model.n_layer=2"), "c.pt", here)
    with pytest.raises(ConfigError, match="training.steps = 400: the checkpoint's cosine schedule spans 300 steps"):
        check_compatible(_gpt_checkpoint(cfg, 103), cfg.replace("training.steps=400"), "c.pt", here)
    check_compatible(_gpt_checkpoint(cfg, 103), cfg.replace("training.steps=400", "optimizer.schedule=constant"),
                     "c.pt", here)  # a constant rate may run longer


def test_resumed_metrics_drop_a_half_written_line(tmp_path):
    from paratrain.metrics import MetricsLog

    path = tmp_path / "metrics" / "rank0.jsonl"
    path.parent.mkdir()
    path.write_text('{"kind": "step", "step": 1}\n{"kind": "step", "step": 2}\n{"kind": "step", "st')
    MetricsLog(tmp_path, 0, start_step=1).close()  # the checkpoint of step 1: steps from 1
    assert path.read_text() == '{"kind": "step", "step": 1}\n'


def test_dropped_steps_count_no_samples_and_keep_the_last_computed_loss(tmp_path):
    import math

    from paratrain.metrics import MetricsLog, StepStats

    log = MetricsLog(tmp_path, 0, 0)
    log.log_step(1, StepStats(2.5, 8, 0), 0.1, 0.0, 1.0, 16, 0)
    rec = log.log_step(2, StepStats(math.nan, 0, 0, skipped=True), 0.1, 0.0, 1.0, 16, 0)
    summary = log.summary()
    log.close()
    assert rec["samples_per_s"] == 0 and rec["skipped"]
    assert summary["samples_per_s"] == 16 / 2.0  # the dropped step's time counts, its batch does not
    assert summary["final_loss"] == 2.5
    log = MetricsLog(tmp_path, 0, 0)  # a dropped sync step carries the mean over the ranks that computed
    log.log_step(1, StepStats(2.5, 8, 0), 0.1, 0.0, 1.0, 16, 0)
    log.log_step(2, StepStats(2.0, 0, 0, skipped=True), 0.1, 0.0, 1.0, 16, 0)
    assert log.summary()["final_loss"] == 2.0
    log.close()


def test_a_resumed_summary_counts_the_whole_run(tmp_path):
    from paratrain.metrics import MetricsLog, StepStats

    log = MetricsLog(tmp_path, 0, 0)
    for step in (1, 2, 3):
        log.log_step(step, StepStats(4.0 - step, 8, 0, bytes_sent=100), 0.1, 0.0, 1.0, 16, 0)
    log.log_eval(3, {"eval_loss": 1.5})
    log.close()
    log = MetricsLog(tmp_path, 0, start_step=2)  # resumed from the step-2 checkpoint: step 3 is redone
    log.log_step(3, StepStats(0.5, 8, 0, bytes_sent=300), 0.1, 0.0, 2.0, 16, 0)
    summary = log.summary()
    log.close()
    assert summary["steps"] == 3 and summary["final_loss"] == 0.5
    assert summary["samples_per_s"] == 48 / 4.0 and summary["bytes_sent_per_step"] == 500 / 3
    assert summary["eval_loss"] is None  # the eval after step 3 was dropped with that step
