"""Per-step fault tolerance (torchft): ddp as replica groups, each its own torchrun job. A replica
group killed (SIGKILL) or hung (SIGSTOP) mid-run is restarted by its own agent and recovers the
current weights from a healthy group; the others never restart."""
import json

from paratrain.checkpoint import list_checkpoints, read_checkpoint
from tests.helpers import MLP, TINY_GPT, cli, config, fit, max_param_diff, records

STEPS, EVERY, FAULT_AT = 16, 4, 6
FT = [*MLP, "strategy.name=ddp", "fault_tolerance.replica_groups=2", f"training.steps={STEPS}",
      f"checkpoint.every={EVERY}", "training.eval_every=8", "faults.rank=1"]


def run(tmp_path, *sets: str):
    sets = [*FT, *sets, f"run.dir={json.dumps('run')}"]
    return cli(["run", "--nproc", "2", *[a for s in sets for a in ("--set", s)]], cwd=tmp_path)


def ended(run_dir, group: int) -> dict:
    return json.loads((run_dir / "metrics" / f"replica_group{group}.json").read_text())


def test_a_killed_group_recovers_from_a_peer_and_the_run_equals_single(tmp_path):
    """min_replicas = 2: no step commits without both groups, so the survivor waits (never
    restarting) while the killed group restarts and loads its weights: nothing is lost, and the
    run ends where one process on the whole global batch does."""
    out = run(tmp_path, f"faults.kill_at_step={FAULT_AT}", "fault_tolerance.min_replicas=2", "run.timeout_s=30")
    assert out.returncode == 0, out.stderr
    assert f"SIGKILL before step {FAULT_AT}" in out.stderr
    assert f"replica group 0: step {FAULT_AT} not committed" in out.stderr  # the survivor's all-reduce failed
    assert "replica group 1: restart 1: continuing from run/checkpoints/step-00000004.pt" in out.stderr
    # killed before step 6: the survivor has committed 5 steps and waits at the sixth
    assert f"replica group 1: at step 4, the others at {FAULT_AT - 1}: loaded a healthy group's state" in out.stderr
    run_dir = tmp_path / "run"
    groups = [ended(run_dir, g) for g in (0, 1)]
    assert [g["restarts"] for g in groups] == [0, 1] and [g["step"] for g in groups] == [STEPS, STEPS]
    assert groups[0]["params_sha256"] == groups[1]["params_sha256"]  # the same weights, bit for bit
    steps = records(run_dir, 0)
    committed = [r for r in steps if r.get("committed", True)]
    assert [r["step"] for r in committed] == list(range(1, STEPS + 1))  # the failed step taken again, once
    assert all(r["replicas"] == 2 for r in committed)
    oracle = fit(config(MLP, "strategy.name=single", f"training.steps={STEPS}", run_dir=tmp_path / "single"))
    final = read_checkpoint(list_checkpoints(run_dir)[-1])["strategy"]["model"]
    assert max_param_diff(final, oracle["params"]) <= 1e-6


def test_a_hung_group_is_ended_and_the_other_trains_on_alone(tmp_path):
    """min_replicas = 1 (the default): the survivor's step fails at run.timeout_s, the Lighthouse
    leaves the stopped group out, and the survivor trains on alone; the launcher ends the stopped
    group, whose agent restarts it."""
    out = run(tmp_path, f"faults.hang_at_step={FAULT_AT}", "run.timeout_s=3", "training.steps=60")
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stderr.splitlines() if "(process stopped)" in line]
    assert len(said) == 1 and "rank 1 (pid" in said[0], out.stderr
    assert f"stopped at step {FAULT_AT} in train_step" in said[0] or f"stopped at step {FAULT_AT - 1} in" in said[0]
    assert "ended it with SIGKILL so that its agent restarts it" in said[0]
    assert "replica group 1: restart 1" in out.stderr
    run_dir = tmp_path / "run"
    steps = [r for r in records(run_dir, 0) if r.get("committed", True)]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert {r["replicas"] for r in steps[FAULT_AT:]} >= {1}  # steps taken alone while group 1 was away
    # alone, it trains on the whole global batch; with both, on half of it
    assert {r["samples"] for r in steps if r["replicas"] == 1} == {2 * steps[0]["samples"]}
    assert ended(run_dir, 0)["restarts"] == 0
    assert (run_dir / "checkpoints" / "step-00000060.pt").exists()


LOCAL = [*MLP, "fault_tolerance.replica_groups=2", "training.steps=40", "strategy.local_sgd.sync_every=4",
         "checkpoint.every=8", "training.eval_every=20", "faults.rank=1", f"run.dir={json.dumps('run')}"]


def test_diloco_a_killed_replica_rejoins_at_a_later_synchronisation(tmp_path):
    """min_replicas = 2: the survivor waits at the next step's quorum; the killed replica restarts
    from checkpoint 8 and at its first quorum loads the survivor's state and step (15, mid-round):
    both end with the same weights, and every synchronisation had both."""
    sets = [*LOCAL, "strategy.name=diloco", "faults.kill_at_step=15", "fault_tolerance.min_replicas=2",
            "run.timeout_s=30"]
    out = cli(["run", "--nproc", "2", *[a for s in sets for a in ("--set", s)]], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "replica group 1: restart 1: continuing from run/checkpoints/step-00000008.pt" in out.stderr
    assert "replica group 1: at step 8, the others at 15: loaded a healthy group's state" in out.stderr
    groups = [ended(tmp_path / "run", g) for g in (0, 1)]
    assert [g["restarts"] for g in groups] == [0, 1] and [g["step"] for g in groups] == [40, 40]
    assert groups[0]["params_sha256"] == groups[1]["params_sha256"]
    syncs = [r for r in records(tmp_path / "run", 0) if "replicas" in r]
    assert [r["step"] for r in syncs] == list(range(4, 41, 4)) and all(r["replicas"] == 2 for r in syncs)


def test_diloco_three_replicas_a_hung_one_is_left_out_and_the_majority_trains_on_together(tmp_path):
    """3 replica groups, min_replicas = 2 (a majority: two quorums cannot both form, so no replica
    trains apart): the two survivors synchronise with each other from the next round on, the hung
    one is ended and restarted, and all three end with the same weights."""
    sets = [*LOCAL, "strategy.name=diloco", "fault_tolerance.replica_groups=3", "fault_tolerance.min_replicas=2",
            "faults.hang_at_step=15", "run.timeout_s=3", "training.global_batch_size=48"]
    out = cli(["run", "--nproc", "3", *[a for s in sets for a in ("--set", s)]], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ended it with SIGKILL so that its agent restarts it" in out.stderr
    for g in (0, 2):
        assert f"replica group {g}: 2 of 3 replica groups in the quorum (was 3)" in out.stderr
        syncs = [r for r in records(tmp_path / "run", g) if "replicas" in r]
        assert [r["step"] for r in syncs] == list(range(4, 41, 4))
        assert [r["replicas"] for r in syncs] == [3, 3, 3] + [2] * 7, syncs  # the survivors, together
    groups = [ended(tmp_path / "run", g) for g in (0, 1, 2)]
    assert [g["restarts"] for g in groups] == [0, 1, 0] and [g["step"] for g in groups] == [40, 40, 40]
    assert len({g["params_sha256"] for g in groups}) == 1


def test_hybrid_a_killed_process_restarts_its_pipeline_group_and_the_run_equals_single(tmp_path):
    """hybrid's dp axis as 2 replica groups, each a 2-stage pipeline (4 processes): the second
    stage of group 1 killed; its agent restarts that group (both stages), each stage loads the
    same stage's state from group 0, and with min_replicas = 2 the run ends where one process on
    the whole global batch does, both groups with the same weights."""
    steps = 12
    sets = [*TINY_GPT, "strategy.name=hybrid", "strategy.pp=2", "fault_tolerance.replica_groups=2",
            "fault_tolerance.min_replicas=2", f"training.steps={steps}", "checkpoint.every=4", "training.eval_every=6",
            "faults.rank=3", f"faults.kill_at_step={FAULT_AT}", "run.timeout_s=30", f"run.dir={json.dumps('run')}"]
    out = cli(["run", "--nproc", "4", *[a for s in sets for a in ("--set", s)]], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "rank 3 (pid" in out.stderr and (f"died at step {FAULT_AT} in train_step" in out.stderr
                                            or f"died at step {FAULT_AT - 1} in" in out.stderr)  # by its stage peer
    assert f"replica group 0: step {FAULT_AT} not committed" in out.stderr
    assert "replica group 1: restart 1: continuing from run/checkpoints/step-00000004.pt" in out.stderr
    said = [line for line in out.stderr.splitlines() if "loaded a healthy group's state" in line]
    assert said == [f"paratrain: replica group 1: at step 4, the others at {FAULT_AT - 1}: loaded a healthy group's "
                    "state, going on from there"], out.stderr  # once for the group, by its first process
    groups = [ended(tmp_path / "run", g) for g in (0, 1)]
    assert [g["restarts"] for g in groups] == [0, 1] and [g["step"] for g in groups] == [steps, steps], \
        (groups, out.stderr)
    assert groups[0]["params_sha256"] == groups[1]["params_sha256"]  # every stage's weights, bit for bit
    committed = [r for r in records(tmp_path / "run", 0) if r.get("committed", True)]
    assert [r["step"] for r in committed] == list(range(1, steps + 1)) and all(r["replicas"] == 2 for r in committed)
    oracle = fit(config(TINY_GPT, "strategy.name=single", f"training.steps={steps}", run_dir=tmp_path / "single"))
    final = read_checkpoint(list_checkpoints(tmp_path / "run")[-1])["strategy"]["model"]
    assert max_param_diff(final, oracle["params"]) <= 1e-5
