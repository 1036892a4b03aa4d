"""A model with BatchNorm (tests/user_code.py:bn_model) under the data-parallel strategies on 2
gloo ranks against `single` on the same global batch. Plain BatchNorm normalises each rank's
half of the batch with that half's statistics, so ddp trains another model (torch DDP's
behaviour); with `model.sync_batchnorm = true` the statistics are the whole batch's, and ddp,
zero1, zero3 and hybrid's dp axis train what `single` trains, running statistics (buffers) included."""
import os

import pytest
import torch.distributed as dist

import paratrain
from paratrain.checkpoint import list_checkpoints, read_checkpoint
from paratrain.config import ConfigError
from tests.helpers import config, fit, initial_params, max_param_diff, run_jobs

BN = ["model.name=custom", "model.factory=tests.user_code:bn_model", "model.loss=tests.user_code:loss",
      "data.name=custom", "data.factory=tests.user_code:bn_dataset", "training.global_batch_size=32",
      "training.steps=20", "training.eval_every=10", "optimizer.name=sgd", "optimizer.lr=0.05",
      "optimizer.momentum=0.9", "run.progress=off"]
TOL = 1e-5
BUFFERS = ("1.running_mean", "1.running_var", "5.running_mean", "5.running_var")


def test_sync_batchnorm_makes_ddp_and_zero_equal_single(tmp_path):
    oracle = fit(config(BN, "strategy.name=single", run_dir=tmp_path / "single"))
    start = initial_params(config(BN))
    assert max_param_diff(oracle["params"], start) > 1e-2  # trained well beyond the tolerance
    jobs = {name: (fit, config(BN, f"strategy.name={name.split('-')[0]}", *sets, run_dir=tmp_path / name))
            for name, sets in (("ddp", []), ("ddp-sync", ["model.sync_batchnorm=true"]),
                               ("zero1-sync", ["model.sync_batchnorm=true"]),
                               ("zero3-sync", ["model.sync_batchnorm=true"]),
                               # hybrid's dp axis, one micro-batch a step (BatchNorm's batch is a micro-batch)
                               ("hybrid-sync", ["model.sync_batchnorm=true", "strategy.dp=2",
                                                "strategy.pipeline.microbatches=1"]))}
    out = run_jobs(jobs)
    differ = {k: (out["ddp"][0]["params"][k] - oracle["params"][k]).abs().max().item() for k in oracle["params"]}
    print("ddp without SyncBatchNorm, largest difference from single:", differ)
    # Without it, each rank normalised with its own half's statistics: not the same training.
    assert max(differ[k] for k in BUFFERS) > 1e-2 and differ["0.weight"] > 1e-3, differ
    for name in ("ddp-sync", "zero1-sync", "zero3-sync", "hybrid-sync"):
        for rank in out[name]:
            # the final checkpoint: parameters and running statistics
            bad = {k: (rank["params"][k].double() - oracle["params"][k].double()).abs().max().item()
                   for k in oracle["params"]}
            assert max(bad.values()) <= TOL, (name, bad)
            assert rank["summary"]["eval_loss"] == pytest.approx(oracle["summary"]["eval_loss"], abs=1e-5), name
    synced = {n: max_param_diff(out[n][0]["params"], oracle["params"]) for n in out if n != "ddp"}
    print("with it, largest difference from single:", synced)
    for k in BUFFERS:  # the statistics moved away from their initial 0 and 1
        assert (oracle["params"][k] - start[k]).abs().max() > 0.1, k


@pytest.mark.parametrize("strategy", ["pipeline", "local_sgd", "parameter_server"])
def test_sync_batchnorm_is_refused_where_replicas_or_stages_train_apart(strategy):
    with pytest.raises(ConfigError) as err:
        paratrain.load_config(None, [*BN, f"strategy.name={strategy}", "model.sync_batchnorm=true"])
    assert "model.sync_batchnorm = true: for strategies that step together" in str(err.value)


def _train(cfg, resume=None) -> dict:
    """fit(), and this rank's own buffers as its model holds them after training."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    result = paratrain.train(cfg, resume=resume)
    module = getattr(result.model, "module", result.model)
    own = {k: v.detach().clone() for k, v in module.state_dict().items() if "running" in k}
    params = read_checkpoint(list_checkpoints(result.run_dir)[-1])["strategy"]["model"]
    return {"params": params, "own": own, "summary": result.summary}


def test_buffers_strategy_by_strategy(tmp_path):
    """What each strategy does with BatchNorm's running statistics, as the README states it."""
    oracle = fit(config(BN, "strategy.name=single", run_dir=tmp_path / "single"))
    start = initial_params(config(BN))
    cases = {
        "ddp": ["strategy.name=ddp"],
        "zero3": ["strategy.name=zero3"],
        # one micro-batch on each of 2 stages: each stage's statistics are single's
        "pipeline": ["strategy.name=pipeline", "strategy.pipeline.schedule=gpipe", "strategy.pipeline.microbatches=1"],
        "local_sgd": ["strategy.name=local_sgd", "strategy.local_sgd.sync_every=4"],
        "diloco": ["strategy.name=diloco", "strategy.local_sgd.sync_every=4"],
        "gossip": ["strategy.name=gossip"],
        "hogwild": ["strategy.name=hogwild"],
        "parameter_server": ["strategy.name=parameter_server"],  # 2 processes: one worker, one server
    }
    jobs = {name: (_train, config(BN, *sets, run_dir=tmp_path / name)) for name, sets in cases.items()}
    ckpt = tmp_path / "ddp-full" / "checkpoints" / "step-00000010.pt"
    jobs["ddp-full"] = (_train, config(BN, "strategy.name=ddp", "checkpoint.every=10", run_dir=tmp_path / "ddp-full"))
    resumed = tmp_path / "ddp-resumed" / "checkpoints"
    jobs["ddp-resumed"] = (_resume_from, ckpt, resumed,
                           config(BN, "strategy.name=ddp", run_dir=tmp_path / "ddp-resumed"))
    out = run_jobs(jobs)

    assert max_param_diff(out["pipeline"][0]["params"], oracle["params"]) <= TOL  # statistics included
    for name in ("local_sgd", "diloco", "hogwild"):  # one set of statistics: averaged at each sync, or shared
        a, b = (r["own"] for r in out[name])
        assert max_param_diff(a, b) <= 1e-6, name
        assert max_param_diff(a, {k: out[name][0]["params"][k] for k in a}) <= 1e-6, name
    for name in ("ddp", "zero3", "gossip"):  # each rank normalised its own share: its own statistics
        a, b = (r["own"] for r in out[name])
        assert max_param_diff(a, b) > 1e-4, name
    for name in ("ddp", "zero3"):  # and the checkpoint holds rank 0's
        own = out[name][0]["own"]
        assert max_param_diff(own, {k: out[name][0]["params"][k] for k in own}) == 0.0, name
    for name in cases:  # every checkpoint holds trained statistics, not the initial 0 and 1
        for k in BUFFERS:
            assert (out[name][0]["params"][k] - start[k]).abs().max() > 0.05, (name, k)
    # the parameter server: the worker's statistics, in the checkpoint and in its evaluation
    assert out["parameter_server"][0]["summary"]["eval_loss"] < 1.0
    # a checkpoint holds the buffers, and resuming restores them bit for bit
    assert max_param_diff(out["ddp-full"][0]["params"], out["ddp-resumed"][0]["params"]) == 0.0


def _resume_from(ckpt, into, cfg) -> dict:
    """ddp-full's checkpoint of step 10, copied into a run of its own and resumed to step 20."""
    if dist.get_rank() == 0:
        into.mkdir(parents=True, exist_ok=True)
        (into / ckpt.name).write_bytes(ckpt.read_bytes())
    dist.barrier()
    return _train(cfg, resume=into / ckpt.name)


RESNET = ["model.name=custom", "model.factory=tests.user_code:resnet18", "model.loss=tests.user_code:loss",
          "data.name=custom", "data.factory=tests.user_code:image_dataset", "training.global_batch_size=16",
          "training.steps=2", "training.eval_every=2", "training.eval_batches=1", "optimizer.name=sgd",
          "optimizer.lr=0.002", "run.progress=off"]


def test_torchvision_resnet18(tmp_path):
    """torchvision's ResNet-18 (20 BatchNorm layers), 2 steps of plain SGD: ddp and zero3 with
    SyncBatchNorm end hundreds of times closer to single than ddp without it; DiLoCo's replicas end
    with one set of statistics; the parameter server's checkpoint holds trained statistics.

    Not within 1e-5 as the small model is: ReLU's kink. With these weights and batch one
    activation of the last block lies within float rounding of 0, and the order of the sums over
    two ranks puts it on the other side (seen: 1 of 4096 on rank 1); its unit's gradient then
    flows where single's does not, and every convolution's gradient moves by 0.4%. The layer
    itself agrees with torch's BatchNorm to 1e-6 (test above; fp32 against fp64 here: 5e-6)."""
    oracle = fit(config(RESNET, "strategy.name=single", run_dir=tmp_path / "single"))
    start = initial_params(config(RESNET))
    jobs = {name: (_train, config(RESNET, *sets, run_dir=tmp_path / name)) for name, sets in {
        "ddp": ["strategy.name=ddp"],
        "ddp-sync": ["strategy.name=ddp", "model.sync_batchnorm=true"],
        "zero3-sync": ["strategy.name=zero3", "model.sync_batchnorm=true"],
        "diloco": ["strategy.name=diloco", "strategy.local_sgd.sync_every=2"],
        "parameter_server": ["strategy.name=parameter_server"],
    }.items()}
    out = run_jobs(jobs)
    stats = [k for k in start if k.endswith("running_mean")]
    assert len(stats) == 20
    apart = max_param_diff(out["ddp"][0]["params"], oracle["params"])
    synced = {name: max_param_diff(out[name][0]["params"], oracle["params"]) for name in ("ddp-sync", "zero3-sync")}
    print("ResNet-18: ddp without SyncBatchNorm", apart, "with", synced)
    assert apart > 0.05 and all(d <= min(2e-3, apart / 100) for d in synced.values()), (apart, synced)
    a, b = (r["own"] for r in out["diloco"])
    assert max_param_diff(a, b) <= 1e-6
    for name in ("diloco", "parameter_server"):
        assert all((out[name][0]["params"][k] - start[k]).abs().max() > 1e-3 for k in stats), name
