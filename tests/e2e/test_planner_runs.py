"""The planner meeting real runs: `paratrain calibrate` measures this machine, `strategy.name = "auto"`
runs the plan `paratrain plan --runnable` ranks first, and a run's summary carries the planner's
prediction beside what it measured."""
import json

from tests.helpers import MLP, TINY_GPT, cli, records
from tests.unit.test_planner import CALIBRATION


def test_calibrate_writes_what_plan_reads(tmp_path):
    """... and keeps a testbed link measured before (re-measuring this machine does not lose it)."""
    from paratrain.planner.hardware import Calibration

    earlier = CALIBRATION + "\n[links.testbed-100mbit]\nall_reduce = [1e-3, 1.2e7]\n"
    (tmp_path / "machine.toml").write_text(earlier)
    # 1 timing per figure: what is checked here is what is measured and written, not its noise
    out = cli(["calibrate", "--repeats", "1", "--out", str(tmp_path / "machine.toml")], cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "kept the link(s) measured before: testbed-100mbit" in out.stderr

    cal = Calibration.load(tmp_path / "machine.toml")
    assert cal.links["testbed-100mbit"] == {"all_reduce": [1e-3, 1.2e7]}
    assert cal.measured_at != "test"
    # the tensor-parallel GPT's fixed costs: ends and per block, forward and backward
    assert len(cal.tensor_parallel) == 4 and cal.tensor_parallel[2] + cal.tensor_parallel[3] > cal.op_s
    # and each pipeline schedule's cost per action
    assert set(cal.pipeline_action) == {"gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv"}
    # (under the suite's load a schedule's tiny step can come out no longer than its sends: 0 then;
    # the solver itself is tested in tests/unit/test_planner.py)
    assert all(0 <= a < 0.1 for a in cal.pipeline_action.values()), cal.pipeline_action
    assert cal.matmul_flops["fp32"] > 1e8 and cal.memory_Bps > 1e8 and cal.op_s > 0
    # every kind the profile tallies has its seconds per element, forward and backward
    from paratrain.planner.model import KINDS

    assert set(cal.kinds) == {*KINDS.values(), "attention"}
    assert all(0 <= f < 1e-6 and 0 <= b < 1e-6 for f, b in cal.kinds.values()) and cal.kinds["gelu"][0] > 0, cal.kinds
    assert cal.update[0] > 0 and cal.update[1] > 0 and cal.dtensor_update[0] > cal.update[0]
    # whole steps against their parts: plain, under tensor parallelism, and DDP's cost from its two models
    assert 0 < cal.compute_factor < 10 and 0 <= cal.tp_factor < 10 and 0 <= cal.pp_factor < 10, \
        (cal.compute_factor, cal.tp_factor, cal.pp_factor)
    assert len(cal.ddp) == 2 and min(cal.ddp) >= 0 and len(cal.zero1_sync) == 2, (cal.ddp, cal.zero1_sync)
    assert [t for t, _ in cal.compute_curve] == [256, 512] and all(0 < f < 10 for _, f in cal.compute_curve)
    assert set(cal.pipeline_send) == {"1f1b", "gpipe"} and all(0 <= s < 0.02 for s in cal.pipeline_send.values())
    assert set(cal.fsdp_factor) == {"zero2", "zero3"} and all(0 <= k < 20 for k in cal.fsdp_factor.values())
    for collective in ("all_reduce", "all_gather", "reduce_scatter", "p2p"):
        alpha, beta = cal.links["loopback"][collective]
        assert alpha >= 0 and beta > 1e6, (collective, alpha, beta)
    plan = cli(["plan", "--devices", "2", *[a for s in MLP for a in ("--set", s)], "--json"], cwd=tmp_path,
               env={"PARATRAIN_CALIBRATION": str(tmp_path / "machine.toml")}, timeout=120)
    assert plan.returncode == 0 and json.loads(plan.stdout)["plans"], plan.stderr


def test_auto_runs_the_planners_first_choice_and_the_summary_compares(tmp_path):
    (tmp_path / "machine.toml").write_text(CALIBRATION)
    env = {"PARATRAIN_CALIBRATION": str(tmp_path / "machine.toml")}
    sets = [*TINY_GPT, "training.steps=6", "training.eval_every=6", "run.progress=lines"]
    args = [a for s in sets for a in ("--set", s)]
    ranked = cli(["plan", "--devices", "2", "--runnable", "--json", *args], cwd=tmp_path, env=env, timeout=120)
    first = json.loads(ranked.stdout)["plans"][0]["plan"]
    out = cli(["run", "--nproc", "2", *args, "--set", "strategy.name=auto", "--set", "run.dir=auto"], cwd=tmp_path,
              env=env)
    assert out.returncode == 0, out.stderr
    assert f"paratrain: auto: {first['describe']} ({first['strategy']})" in out.stderr
    chosen = json.loads((tmp_path / "auto" / "plan.json").read_text())
    assert chosen["chosen"] == first["describe"] and chosen["why"].startswith(first["describe"] + " beats")
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["strategy"]["name"] == first["strategy"]
    assert len(records(tmp_path / "auto")) == 6
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["predicted_step_s"] > 0 and summary["measured_memory_bytes"] > 0
    assert summary["step_error"] == summary["predicted_step_s"] / summary["step_s_steady"] - 1
    assert 0 < summary["mfu"] < 10  # against the test's made-up peak: only that it is computed
    assert "step time: planner / measured mean" in out.stdout and "model FLOP utilisation" in out.stdout
