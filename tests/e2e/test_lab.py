"""The strategy lab: `paratrain compare` runs a matrix side by side (a failing entry reported in its
row, the others run), and `paratrain report` draws what the runs recorded into one HTML page."""
import base64
import json
import re
import signal
import subprocess
import time

import pytest

from tests.helpers import ENV, MLP, PARATRAIN, TINY_GPT, cli

MATRIX = """nproc = 2
set = {sets}
target = 5.0

[[entry]]
name = "broken"
set = ["strategy.name=ddp", "model.loss=no_such_module:loss"]

[[entry]]
name = "pipeline"
set = ["strategy.name=pipeline", "strategy.pipeline.microbatches=2", "run.tensorboard=true"]
"""


def test_compare_runs_each_entry_reports_a_failure_in_its_row_and_the_report_draws_them(tmp_path):
    sets = [*TINY_GPT, "training.steps=8", "training.eval_every=4"]
    (tmp_path / "matrix.toml").write_text(MATRIX.format(sets=json.dumps(sets)))
    out = cli(["compare", "matrix.toml", "--out", "cmp"], cwd=tmp_path)
    assert out.returncode == 1, out.stderr  # one entry failed; the others ran
    assert (tmp_path / "cmp" / "report.html").is_file() and "report: cmp/report.html" in out.stdout
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["name"]: r for r in table["entries"]}
    assert list(rows) == ["broken", "pipeline"] and table["target"] == 5.0
    assert "no_such_module" in rows["broken"]["error"] and "\n" not in rows["broken"]["error"]
    assert f"broken failed: {rows['broken']['error'][:30]}" in " ".join(out.stdout.split())
    for name in ("pipeline",):
        row = rows[name]
        assert not row["error"] and row["strategy"] == name
        assert row["final_eval_loss"] > 0 and row["best_eval_loss"] <= row["final_eval_loss"]
        assert row["time_to_target_s"] is not None and row["samples_per_s"] > 0 and row["peak_memory_bytes"] > 0
        # the parts of a step add up to it (the slowest rank's mean step past the first)
        parts = sum(v for k, v in row["split"].items() if k != "step_s" and v)
        assert parts == pytest.approx(row["split"]["step_s"], rel=1e-6)
        assert len(list((tmp_path / "cmp" / name / "metrics").glob("rank*.jsonl"))) == 2
    assert rows["pipeline"]["split"]["bubble_s"] > 0 and rows["pipeline"]["bytes_per_step_per_rank"] > 0

    # a comparison directory is never overwritten
    again = cli(["compare", "matrix.toml", "--out", "cmp"], cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not empty" in again.stderr

    rep = cli(["report", "cmp"], cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    html = (tmp_path / "cmp" / "report.html").read_text()
    titles = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    for title in ("Eval loss against step", "Eval loss against wall time", "Throughput and bytes sent",
                  "Where a step&#39;s time goes", "Memory per rank", "Pipeline timeline: pipeline"):
        assert title in titles, titles
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == len(titles)
    for data in images:  # each a whole PNG, embedded: the page needs nothing beside it
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "failed: " in html and "no_such_module" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network

    # run.tensorboard: torch's SummaryWriter wrote each rank's scalars; read back, they are the records'
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for rank in (0, 1):
        events = EventAccumulator(str(tmp_path / "cmp" / "pipeline" / "tensorboard" / f"rank{rank}")).Reload()
        recs = [json.loads(line) for line in (tmp_path / "cmp" / "pipeline" / "metrics" / f"rank{rank}.jsonl").open()]
        steps = [r for r in recs if r["kind"] == "step"]
        loss = events.Scalars("train/loss")
        assert [e.step for e in loss] == [r["step"] for r in steps] == list(range(1, 9))
        assert [e.value for e in loss] == [pytest.approx(r["loss"], rel=1e-6) for r in steps]
        assert [e.step for e in events.Scalars("eval/loss")] == [r["step"] for r in recs if r["kind"] == "eval"]
        for tag in ("train/lr", "throughput/samples_per_s", "comm/bytes_sent", "time/compute_s", "time/comm_s"):
            assert len(events.Scalars(tag)) == 8, tag

    # a single run directory works too
    single = cli(["report", "cmp/pipeline", "--out", "one.html"], cwd=tmp_path)
    assert single.returncode == 0 and "Eval loss against step" in (tmp_path / "one.html").read_text()


def test_bad_compare_and_report_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "m.toml").write_text('[[entry]]\nname = "a b"\n')
    (tmp_path / "k.toml").write_text('colour = 1\n[[entry]]\nname = "a"\n')
    for args, says in ((["compare", "missing.toml"], "no such file"),
                       (["compare", "m.toml"], "letters, digits"),
                       (["compare", "k.toml"], "unknown key(s) colour"),
                       (["report", "."], "neither a comparison")):
        out = cli(args, cwd=tmp_path, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and says in out.stderr, (args, out.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.toml", "m.toml"]  # nothing written


def test_ctrl_c_stops_the_running_entry_at_a_step_boundary_and_still_writes_the_table(tmp_path):
    sets = [*MLP, "training.steps=100000", "faults.rank=0", "faults.delay_s=0.05", "training.eval_every=0"]
    matrix = f'nproc = 2\nset = {json.dumps(sets)}\n[[entry]]\nname = "first"\nset = ["strategy.name=ddp"]\n' \
             '[[entry]]\nname = "second"\nset = ["strategy.name=ddp"]\n'
    (tmp_path / "m.toml").write_text(matrix)
    run = subprocess.Popen([*PARATRAIN, "compare", "m.toml", "--out", "cmp"], cwd=tmp_path, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cmp" / "first" / "metrics" / "rank0.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.3)
    run.send_signal(signal.SIGINT)  # what Ctrl-C at a terminal sends this process (its runs have their own session)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err, err
    rows = {r["name"]: r for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["entries"]}
    assert rows["first"]["error"].startswith("interrupted after ") and rows["second"]["error"].startswith("not run")
    assert (tmp_path / "cmp" / "report.html").is_file() and "first failed: interrupted" in " ".join(out.split())
    # the entry stopped at a step boundary with its checkpoint, as `paratrain run` does on Ctrl-C
    assert list((tmp_path / "cmp" / "first" / "checkpoints").glob("step-*"))
    assert json.loads((tmp_path / "cmp" / "first" / "owner.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "cmp" / "second").exists()


def test_the_report_from_recorded_runs_draws_each_familys_plots(tmp_path):
    """tests/data/demo-compare: what `make demo` recorded (configs, summaries, metrics, the pipeline's
    timeline), no training here."""
    from tests.helpers import ROOT

    out = cli(["report", str(ROOT / "tests" / "data" / "demo-compare"), "--out", "page.html"], cwd=tmp_path,
              timeout=120)
    assert out.returncode == 0 and "(8 run(s))" in out.stdout, out.stderr
    html = (tmp_path / "page.html").read_text()
    titles = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    assert titles == ["Eval loss against step", "Eval loss against wall time", "Throughput and bytes sent",
                      "Where a step&#39;s time goes", "Memory per rank",
                      "The planner&#39;s prediction against the measured step", "Pipeline timeline: pipeline-1f1b",
                      "Parameter server: staleness", "Replica drift"], titles
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == len(titles)
    for name in ("ddp", "zero3", "pipeline-1f1b", "tensor", "diloco", "ps-async", "ddp-powersgd", "auto"):
        assert f"<td>{name}</td>" in html, name  # each entry's row in the table
