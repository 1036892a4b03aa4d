"""local_sgd and diloco on gloo ranks: the DDP limit, replica agreement, bytes, resume, a lost worker.

All two-rank trainings share one spawn (a module fixture); the lost-worker test has its own.
"""
import shutil

import pytest
import torch
import torch.distributed as dist

from paratrain.checkpoint import read_checkpoint
from paratrain.comm import ring_allreduce_bytes
from paratrain.config import ConfigError, validate
from paratrain.testing import run_ranks
from tests.helpers import MLP, config, fit, max_param_diff

TOL = 1e-5  # fp32: all-reduce sums in another order than one big batch
PLAIN_SGD = "optimizer.momentum=0.0"
DDP_LIMIT = ["strategy.local_sgd.sync_every=1", "strategy.local_sgd.outer_lr=1.0",
             "strategy.local_sgd.outer_momentum=0.0", "strategy.local_sgd.outer_nesterov=false"]
# Syncs after steps 4, 8, 12, 16 and the last, 18: the resumed run must know where it is in the cycle.
RESUME = ["strategy.name=diloco", "strategy.local_sgd.sync_every=4", "training.steps=18", "checkpoint.every=8",
          "checkpoint.keep=3"]


def stepwise(cfg) -> dict:
    """Train step by step: after each step this rank's record and its own replica (flat); then
    the trainer's end of run (closing gathers) and this rank's summary."""
    from paratrain.strategies import get_strategy
    from paratrain.topology import Topology
    from paratrain.trainer import Trainer

    topo = Topology.from_env(cfg.run, lambda n: get_strategy(cfg.strategy.name).parallel_dims(cfg, n))
    trainer = Trainer(cfg, topo, cfg.run.dir)
    out = []
    while trainer.step_num < cfg.training.steps:
        rec, _ = trainer.step()
        out.append({**rec, "params": torch.cat([p.detach().reshape(-1) for p in trainer.strategy.module.parameters()])})
    return {"steps": out, "summary": trainer.fit()}


def _initial_params(cfg):
    from paratrain.data import build_datasets
    from paratrain.models import build_model

    torch.manual_seed(cfg.training.seed)
    return {k: v.clone() for k, v in build_model(cfg, build_datasets(cfg).vocab_size).state_dict().items()}


def _two_rank_runs(tmp) -> dict:
    dist.init_process_group("gloo")  # one group for every training below (train() leaves it alone)
    runs = {
        "ddp": fit(config(MLP, "strategy.name=ddp", PLAIN_SGD, run_dir=tmp / "ddp")),
        "diloco_h1": fit(config(MLP, "strategy.name=diloco", PLAIN_SGD, *DDP_LIMIT, run_dir=tmp / "diloco_h1")),
        "local_h1": fit(config(MLP, "strategy.name=local_sgd", PLAIN_SGD, "strategy.local_sgd.sync_every=1",
                               run_dir=tmp / "local_h1")),
        # 10 steps, H = 4: syncs after steps 4 and 8, and after the last one, 10.
        "local_h4": stepwise(config(MLP, "strategy.name=local_sgd", "strategy.local_sgd.sync_every=4",
                                    "training.steps=10", "checkpoint.enabled=false", run_dir=tmp / "local_h4")),
        "full": fit(config(MLP, *RESUME, run_dir=tmp / "full")),
    }
    ckpt = tmp / "resumed" / "checkpoints" / "step-00000008.pt"
    if dist.get_rank() == 0:
        ckpt.parent.mkdir(parents=True)
        shutil.copy(tmp / "full" / "checkpoints" / ckpt.name, ckpt)
    dist.barrier()
    runs["resumed"] = fit(config(MLP, *RESUME, run_dir=tmp / "resumed"), resume=ckpt)
    return runs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local_sgd")
    return tmp, run_ranks(_two_rank_runs, 2, tmp)


@pytest.fixture(scope="module")
def single_plain_sgd(tmp_path_factory):
    return fit(config(MLP, "strategy.name=single", PLAIN_SGD, run_dir=tmp_path_factory.mktemp("single")))


def test_diloco_h1_outer_sgd_lr1_equals_ddp_and_single(two_ranks, single_plain_sgd):
    # Averaging theta - lr g_i over ranks is theta - lr mean(g_i), and the outer step with lr 1
    # and no momentum moves the anchor exactly onto that average.
    _, ranks = two_ranks
    for r in ranks:
        assert max_param_diff(r["diloco_h1"]["params"], single_plain_sgd["params"]) <= TOL
        assert max_param_diff(r["diloco_h1"]["params"], r["ddp"]["params"]) <= TOL
    assert max_param_diff(single_plain_sgd["params"], ranks[0]["ddp"]["params"]) <= TOL
    assert max_param_diff(ranks[0]["diloco_h1"]["params"], ranks[0]["local_h1"]["params"]) <= TOL
    for key in ("final_loss", "eval_loss"):
        assert ranks[0]["diloco_h1"]["summary"][key] == pytest.approx(single_plain_sgd["summary"][key], abs=1e-5)
    # The comparison means something only if training moved the weights well beyond TOL.
    assert max_param_diff(single_plain_sgd["params"], _initial_params(config(MLP))) > 1e-2


def test_local_sgd_h1_equals_single(two_ranks, single_plain_sgd):
    _, ranks = two_ranks
    for r in ranks:
        assert max_param_diff(r["local_h1"]["params"], single_plain_sgd["params"]) <= TOL
    for key in ("final_loss", "eval_loss"):
        assert ranks[0]["local_h1"]["summary"][key] == pytest.approx(single_plain_sgd["summary"][key], abs=1e-5)


def test_replicas_agree_after_each_sync_and_drift_between(two_ranks):
    _, (a, b) = two_ranks
    syncs = {3, 7, 9}  # step indices: after steps 4, 8 and the last
    for step, (ra, rb) in enumerate(zip(a["local_h4"]["steps"], b["local_h4"]["steps"])):
        diff = (ra["params"] - rb["params"]).abs().max().item()
        if step in syncs:
            assert diff == 0.0, step
            assert ra["replica_rms_dist"] > 1e-6 and ra["replicas"] == 2  # they had drifted apart
        else:
            assert diff > 1e-6, step  # each trained on its own shard with no communication
            assert "replica_rms_dist" not in ra


def test_bytes_ring_allreduce_of_params_on_sync_steps_only(two_ranks):
    _, ranks = two_ranks
    n_params = ranks[0]["local_h4"]["steps"][0]["params"].numel()
    loss_bytes = ring_allreduce_bytes(4, 2)  # the 4-byte loss for the log, every step
    for r in ranks:
        for step, rec in enumerate(r["local_h4"]["steps"]):
            sync = ring_allreduce_bytes(4 * n_params, 2) if step in (3, 7, 9) else 0
            assert rec["bytes_sent"] == sync + loss_bytes, step


def test_resume_from_sync_checkpoint_equals_uninterrupted_diloco(two_ranks):
    # Inner SGD momentum (per rank), outer Nesterov momentum and the anchor must all come back.
    tmp, ranks = two_ranks
    for r in ranks:
        assert max_param_diff(r["full"]["params"], r["resumed"]["params"]) == 0.0
    assert ranks[0]["resumed"]["summary"]["steps"] == 10  # it really ran only the second half
    saved = read_checkpoint(tmp / "full" / "checkpoints" / "step-00000008.pt")["strategy"]
    extra = saved["local_sgd"]
    assert extra["step"] == 8 and extra["outer_momentum"].keys() == saved["model"].keys()
    assert max_param_diff(extra["anchor"], saved["model"]) == 0.0  # at a sync the anchor is the replica
    assert len(extra["inner_optimizers"]) == 2
    # Other strategies read the same checkpoint and ignore the extra key.
    single = fit(config(MLP, "strategy.name=single", "training.steps=18", run_dir=tmp / "single_from_diloco"),
                 resume=tmp / "resumed" / "checkpoints" / "step-00000008.pt")
    assert single["summary"]["steps"] == 10


def test_diloco_survives_a_killed_worker(tmp_path):
    kill_at = 6
    cfg = config(MLP, "strategy.name=diloco", PLAIN_SGD, "strategy.local_sgd.sync_every=2", "training.steps=16",
                 "training.eval_every=0", "checkpoint.every=4", "run.timeout_s=5",
                 "faults.rank=2", f"faults.kill_at_step={kill_at}", run_dir=tmp_path / "kill")
    a, b, lost = run_ranks(stepwise, 3, cfg, allow_missing=True, timeout_s=120)
    assert lost is None  # it left before step 6 without a word
    a, b = a["steps"], b["steps"]
    assert len(a) == len(b) == 16  # the survivors finished every step
    assert a[kill_at]["wait_s"] > 0  # they noticed at the loss all-reduce of step 6 and agreed
    for step, (ra, rb) in enumerate(zip(a, b)):
        if step % 2 == 1:  # sync steps: replicas identical, averaged over 3 ranks, then 2
            assert ra["replicas"] == (3 if step < kill_at else 2)
            assert (ra["params"] - rb["params"]).abs().max().item() == 0.0, step
        assert ra["loss"] == rb["loss"]  # the mean over the survivors
    first_after, last = sum(r["loss"] for r in a[kill_at:kill_at + 3]), sum(r["loss"] for r in a[-3:])
    assert last < 0.8 * first_after, (first_after, last)
    # Checkpoints after the loss are written by the survivors (the trainer uses live_group()).
    ckpt = read_checkpoint(tmp_path / "kill" / "checkpoints" / "step-00000016.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["strategy"]["local_sgd"]["inner_optimizers"][2] is None


def test_outer_nesterov_needs_outer_momentum():
    cfg = config(MLP, "strategy.name=diloco", "strategy.local_sgd.outer_momentum=0.0")  # nesterov on by default
    with pytest.raises(ConfigError, match="outer_nesterov"):
        validate(cfg, 2)
    validate(config(MLP, "strategy.name=diloco", *DDP_LIMIT), 2)
