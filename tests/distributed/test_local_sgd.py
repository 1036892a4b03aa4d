"""local_sgd and diloco on gloo ranks: the DDP limit, replica agreement, bytes, resume (compressed
DiLoCo's too), a lost worker (compressed or not).

All two-rank trainings share one spawn (a module fixture); the lost-worker tests have their own.
Codecs on local SGD: test_local_sgd_codecs.py; time-bounded rounds: test_local_sgd_deadline.py.
"""
import shutil

import pytest
import torch
import torch.distributed as dist

from paratrain.checkpoint import read_checkpoint
from paratrain.comm import ring_allgather_bytes, ring_allreduce_bytes
from paratrain.config import ConfigError
from paratrain.strategies.layout import layout
from paratrain.testing import run_ranks
from tests.helpers import MLP, config, fit, initial_params, max_param_diff

TOL = 1e-5  # fp32: all-reduce sums in another order than one big batch
PLAIN_SGD = "optimizer.momentum=0.0"
DDP_LIMIT = ["strategy.local_sgd.sync_every=1", "strategy.local_sgd.outer_lr=1.0",
             "strategy.local_sgd.outer_momentum=0.0", "strategy.local_sgd.outer_nesterov=false"]
# Syncs after steps 4, 8, 12, 16 and the last, 18: the resumed run must know where it is in the cycle.
RESUME = ["strategy.name=diloco", "strategy.local_sgd.sync_every=4", "training.steps=18", "checkpoint.every=8",
          "checkpoint.keep=3"]
# int8 draws random numbers and keeps an error-feedback residual: both must come back on resume.
INT8 = "strategy.compression.codec=int8"
P = 10 * 20 + 20 + 20 * 1 + 1  # the MLP's parameters
# Bytes per rank of a sync on 2 ranks: the all-gather of every rank's 4-byte loss and 4-byte
# pending signal (signals.py), then the ring all-reduce of the fp32 parameters.
LOSS_GATHER = ring_allgather_bytes(2 * 8, 2)
SYNC_BYTES = ring_allreduce_bytes(4 * P, 2)
SYNCS = {3, 7, 9}  # step indices of a 10-step run with H = 4: after steps 4, 8 and the last


def stepwise(cfg) -> dict:
    """Train step by step: after each step this rank's record and its own replica (flat); then
    the trainer's end of run (closing gathers) and this rank's summary."""
    from paratrain.topology import ParallelDims, Topology
    from paratrain.trainer import Trainer

    # Not layout(): the killed-worker test trains 3 ranks on a batch of 32 (ShardedBatches takes
    # 10 each), which `paratrain run` would refuse.
    topo = Topology.from_env(cfg.run, lambda n: ParallelDims(dp=n))
    trainer = Trainer(cfg, topo, cfg.run.dir)
    out = []
    while trainer.step_num < cfg.training.steps:
        rec, _ = trainer.step()
        out.append({**rec, "params": torch.cat([p.detach().reshape(-1) for p in trainer.strategy.module.parameters()])})
    return {"steps": out, "summary": trainer.fit()}


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
        "full_int8": fit(config(MLP, *RESUME, INT8, run_dir=tmp / "full_int8")),
    }
    for suffix, codec in (("", []), ("_int8", [INT8])):
        ckpt = tmp / f"resumed{suffix}" / "checkpoints" / "step-00000008.pt"
        if dist.get_rank() == 0:
            ckpt.parent.mkdir(parents=True)
            shutil.copy(tmp / f"full{suffix}" / "checkpoints" / ckpt.name, ckpt)
        dist.barrier()
        runs[f"resumed{suffix}"] = fit(config(MLP, *RESUME, *codec, run_dir=tmp / f"resumed{suffix}"), resume=ckpt)
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
    assert max_param_diff(single_plain_sgd["params"], initial_params(config(MLP))) > 1e-2


def test_local_sgd_h1_equals_single(two_ranks, single_plain_sgd):
    _, ranks = two_ranks
    for r in ranks:
        assert max_param_diff(r["local_h1"]["params"], single_plain_sgd["params"]) <= TOL
    for key in ("final_loss", "eval_loss"):
        assert ranks[0]["local_h1"]["summary"][key] == pytest.approx(single_plain_sgd["summary"][key], abs=1e-5)


def test_replicas_agree_after_each_sync_and_drift_between(two_ranks):
    _, (a, b) = two_ranks
    for step, (ra, rb) in enumerate(zip(a["local_h4"]["steps"], b["local_h4"]["steps"])):
        diff = (ra["params"] - rb["params"]).abs().max().item()
        if step in SYNCS:
            assert diff == 0.0, step
            assert ra["replica_rms_dist"] > 1e-6 and ra["replicas"] == 2  # they had drifted apart
            # The logged loss: the mean over both ranks' batches, gathered at the sync (with H = 1 it is
            # single's loss: test_local_sgd_h1_equals_single).
            assert ra["loss"] == rb["loss"] and ra["loss_ranks"] == rb["loss_ranks"] == 2
        else:
            assert diff > 1e-6, step  # each trained on its own shard with no communication
            assert "replica_rms_dist" not in ra
            # Nothing sent, not even the loss: each rank logs its own batch's.
            assert ra["loss"] != rb["loss"] and ra["loss_ranks"] == 1


def test_bytes_only_on_sync_steps(two_ranks):
    _, ranks = two_ranks
    assert ranks[0]["local_h4"]["steps"][0]["params"].numel() == P
    for r in ranks:
        for step, rec in enumerate(r["local_h4"]["steps"]):
            assert rec["bytes_sent"] == (SYNC_BYTES + LOSS_GATHER if step in SYNCS else 0), step


def test_resume_from_sync_checkpoint_equals_uninterrupted_diloco(two_ranks):
    # Inner SGD momentum (per rank), outer Nesterov momentum and the anchor must all come back.
    tmp, ranks = two_ranks
    for r in ranks:
        assert max_param_diff(r["full"]["params"], r["resumed"]["params"]) == 0.0
    assert max_param_diff(ranks[0]["full"]["params"], ranks[0]["full_int8"]["params"]) > 1e-4  # int8 matters
    assert ranks[0]["resumed"]["summary"]["steps_this_start"] == 10  # it really ran only the second half
    saved = read_checkpoint(tmp / "full" / "checkpoints" / "step-00000008.pt")["strategy"]
    extra = saved["local_sgd"]
    assert extra["step"] == 8 and extra["outer_momentum"].keys() == saved["model"].keys()
    assert max_param_diff(extra["anchor"], saved["model"]) == 0.0  # at a sync the anchor is the replica
    assert len(extra["inner_optimizers"]) == 2
    # Other strategies read the same checkpoint and ignore the extra key.
    single = fit(config(MLP, "strategy.name=single", "training.steps=18", run_dir=tmp / "single_from_diloco"),
                 resume=tmp / "resumed" / "checkpoints" / "step-00000008.pt")
    assert single["summary"]["steps_this_start"] == 10


def test_resume_from_sync_checkpoint_equals_uninterrupted_compressed_diloco(two_ranks):
    # Besides the above: each rank's error-feedback residual and its codec's random generator.
    tmp, ranks = two_ranks
    for r in ranks:
        assert max_param_diff(r["full_int8"]["params"], r["resumed_int8"]["params"]) == 0.0
    assert ranks[0]["resumed_int8"]["summary"]["steps_this_start"] == 10
    saved = read_checkpoint(tmp / "full_int8" / "checkpoints" / "step-00000008.pt")["strategy"]
    codec = saved["local_sgd"]["codec_states"]
    assert len(codec) == 2 and not torch.equal(codec[0]["generator"], codec[1]["generator"])
    assert all(c["residual"].abs().max().item() > 0 for c in codec)  # what int8 rounding left to send


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_diloco_survives_a_killed_worker(tmp_path, codec):
    kill_at = 6  # the steps taken before the kill, as the seventh begins
    cfg = config(MLP, "strategy.name=diloco", PLAIN_SGD, "strategy.local_sgd.sync_every=2", "training.steps=16",
                 "training.eval_every=0", "checkpoint.every=4", "run.timeout_s=5", "faults.rank=2",
                 f"faults.kill_at_step={kill_at + 1}", f"strategy.compression.codec={codec}", run_dir=tmp_path / "kill")
    a, b, lost = run_ranks(stepwise, 3, cfg, allow_missing=True, timeout_s=120)
    assert lost is None  # it left before step 7 without a word
    a, b = a["steps"], b["steps"]
    assert len(a) == len(b) == 16  # the survivors finished every step
    # Nothing is sent between syncs: they noticed at the first collective of the sync of step 8 and agreed.
    assert a[kill_at]["wait_s"] == 0 and a[kill_at + 1]["wait_s"] > 0
    for step, (ra, rb) in enumerate(zip(a, b)):
        if step % 2 == 1:  # sync steps: replicas identical, averaged over 3 ranks, then 2
            assert ra["replicas"] == (3 if step < kill_at else 2)
            assert (ra["params"] - rb["params"]).abs().max().item() == 0.0, step
            assert ra["loss"] == rb["loss"] and ra["loss_ranks"] == (3 if step < kill_at else 2)  # the survivors' mean
    first_after, last = sum(r["loss"] for r in a[kill_at:kill_at + 4]), sum(r["loss"] for r in a[-4:])
    assert last < 0.8 * first_after, (first_after, last)
    # Checkpoints after the loss are written by the survivors (the trainer uses live_group()).
    ckpt = read_checkpoint(tmp_path / "kill" / "checkpoints" / "step-00000016.pt")
    extra = ckpt["strategy"]["local_sgd"]
    assert len(ckpt["rng"]) == 2 and extra["inner_optimizers"][2] is None
    if codec != "none":
        assert extra["codec_states"][2] is None and extra["codec_states"][1]["residual"] is not None


def test_outer_nesterov_needs_outer_momentum():
    cfg = config(MLP, "strategy.name=diloco", "strategy.local_sgd.outer_momentum=0.0")  # nesterov on by default
    with pytest.raises(ConfigError, match="outer_nesterov"):
        layout(cfg, 2)
    layout(config(MLP, "strategy.name=diloco", *DDP_LIMIT), 2)
