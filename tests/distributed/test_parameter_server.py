"""parameter_server on 3 gloo ranks: BSP is ddp's math, ASP alone is single, SSP keeps its staleness
bound (ASP does not), SSP with drop_behind keeps it too without making the fast worker wait, a lost
worker is survived, resume is exact, bytes are exact.

Process start-up dominates on 2 cores, so every training shares one spawn of the ranks (`runs`,
module-scoped) and the tests read their results. The run that kills a worker comes last: its
lost rank cannot take part in another training.
"""
import shutil

import pytest
import torch.distributed as dist

from paratrain.config import ConfigError
from paratrain.strategies.layout import layout
from paratrain.strategies.parameter_server.protocol import HEADER_BYTES, PUSH_REPLY_NUMEL, partition
from tests.helpers import MLP, TINY_GPT, config, fit, initial_params, max_param_diff, records, run_jobs, server_report

WORLD = 3
PS = ["strategy.name=parameter_server"]
# One worker made slow: slowdown=3 alone adds ~2 ms to the MLP's ~1 ms of compute, lost in the
# noise of 3 processes on 2 cores; the fixed delay makes the straggler unmistakable. Evaluation
# only at the end: a mid-run evaluation is a barrier, where the fast worker's lead starts again.
DELAY_S = 0.03
SLOW = [*PS, "strategy.ps.staleness=1", "faults.rank=1", "faults.slowdown=3", f"faults.delay_s={DELAY_S}",
        "training.eval_every=0"]
SSP_BOUND = (2 - 1) * (2 * 1 + 1)  # W = 2 workers, s = 1: (W-1)(2s+1), see parameter_server.py
# Dropout, warm-up + cosine, AdamW: resuming must restore every worker's RNG stream, the servers'
# shards and optimizer state, and the schedule.
RESUMABLE = [*PS, "strategy.ps.mode=bsp", "model.dropout=0.1", "optimizer.schedule=cosine",
             "optimizer.warmup_steps=4", "checkpoint.every=10", "checkpoint.keep=3"]
KILL_AT = 8  # the steps the worker takes before it is killed, as the ninth begins
# Gentler SGD and more steps than MLP's defaults: there the eval loss is not monotone even for single.
KILL = [*PS, "strategy.ps.mode=bsp", "optimizer.momentum=0.5", "optimizer.lr=0.02", "training.steps=40",
        "faults.rank=1", f"faults.kill_at_step={KILL_AT + 1}"]


# ---------------------------------------------------------------------------- rank functions


def copy_checkpoint(run_dir, new_run_dir, step: int = 10):
    """A run's checkpoint in a fresh run directory, to resume from there."""
    ckpt = new_run_dir / "checkpoints" / f"step-{step:08d}.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / ckpt.name, ckpt)
    return ckpt


def resume_rank(full_cfg, resumed_cfg, tmp) -> dict:
    """The uninterrupted run, then a run resumed from its step-10 checkpoint in a fresh directory."""
    full = fit(full_cfg)
    if dist.get_rank() == 0:
        copy_checkpoint(tmp / "full", tmp / "resumed")
    dist.barrier()
    return {"full": full, "resumed": fit(resumed_cfg, resume=tmp / "resumed" / "checkpoints" / "step-00000010.pt")}


# ---------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ps")
    out = {"tmp": tmp, "single-mlp": fit(config(MLP, "strategy.name=single", "checkpoint.every=10",
                                                run_dir=tmp / "single-mlp")),
           "single-gpt": fit(config(TINY_GPT, "strategy.name=single", run_dir=tmp / "single-gpt"))}
    jobs = {
        "bsp-mlp": (fit, config(MLP, *PS, "strategy.ps.mode=bsp", run_dir=tmp / "bsp-mlp")),
        "bsp-gpt": (fit, config(TINY_GPT, *PS, "strategy.ps.mode=bsp", run_dir=tmp / "bsp-gpt")),
        # one worker, two servers: the layout splits the model, and nothing is ever stale
        "asp-alone": (fit, config(MLP, *PS, "strategy.ps.mode=asp", "strategy.ps.servers=2", "checkpoint.every=10",
                                  run_dir=tmp / "asp-alone")),
        # the same, resumed from single's checkpoint: the servers load their shards and momentum
        "from-single": (fit, config(MLP, *PS, "strategy.ps.mode=asp", "strategy.ps.servers=2",
                                    run_dir=tmp / "from-single"),
                        copy_checkpoint(tmp / "single-mlp", tmp / "from-single")),
        "ssp-slow": (fit, config(MLP, *SLOW, "strategy.ps.mode=ssp", run_dir=tmp / "ssp-slow")),
        "asp-slow": (fit, config(MLP, *SLOW, "strategy.ps.mode=asp", run_dir=tmp / "asp-slow")),
        "ssp-drop": (fit, config(MLP, *SLOW, "strategy.ps.mode=ssp", "strategy.ps.drop_behind=true",
                                 run_dir=tmp / "ssp-drop")),
        "resume": (resume_rank, config(TINY_GPT, *RESUMABLE, run_dir=tmp / "resume" / "full"),
                   config(TINY_GPT, *RESUMABLE, run_dir=tmp / "resume" / "resumed"), tmp / "resume"),
        "kill": (fit, config(MLP, *KILL, run_dir=tmp / "kill")),  # last: rank 1 does not come back
    }
    out.update(run_jobs(jobs, WORLD, allow_missing=True))
    # the killed worker, and only it, left no result
    assert [r is None for r in out["kill"]] == [False, True, False]
    out["single-from-ps"] = fit(config(MLP, "strategy.name=single", run_dir=tmp / "single-from-ps"),
                                copy_checkpoint(tmp / "asp-alone", tmp / "single-from-ps"))
    return out


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_bsp_equals_single(runs, model):
    # BSP averages the 2 workers' gradients and steps once: ddp's math (SGD momentum, AdamW).
    oracle, base = runs[f"single-{model}"], {"mlp": MLP, "gpt": TINY_GPT}[model]
    assert max_param_diff(oracle["params"], initial_params(config(base))) > 1e-2  # training moved them
    for r in (runs[f"bsp-{model}"][0], runs[f"bsp-{model}"][2]):  # rank 1's results went with it (kill)
        assert max_param_diff(r["params"], oracle["params"]) <= 1e-5
    # evaluation averages over the live workers' shards, as ddp's over its ranks
    assert runs[f"bsp-{model}"][0]["summary"]["eval_loss"] == pytest.approx(oracle["summary"]["eval_loss"], abs=1e-5)
    report = server_report(runs["tmp"] / f"bsp-{model}")
    assert report["updates"] == 20 and report["staleness"] == {"0": 40}


def test_asp_with_one_worker_equals_single(runs):
    chief = runs["asp-alone"][0]
    assert max_param_diff(chief["params"], runs["single-mlp"]["params"]) <= 1e-6
    reports = [server_report(runs["tmp"] / "asp-alone", rank) for rank in (1, 2)]
    assert all(r["parameters"] > 0 for r in reports)  # both servers hold a part
    assert sum(r["parameters"] for r in reports) == sum(v.numel() for v in chief["params"].values())
    assert all(r["staleness"] == {"0": 20} for r in reports)


def test_checkpoints_cross_layouts(runs):
    # ASP with one worker is single's math, so resuming one's checkpoint under the other must
    # land exactly where single does: the name-keyed shards and SGD momentum go both ways.
    oracle = runs["single-mlp"]["params"]
    assert max_param_diff(runs["from-single"][0]["params"], oracle) <= 1e-6
    assert max_param_diff(runs["single-from-ps"]["params"], oracle) <= 1e-6
    assert runs["from-single"][0]["summary"]["steps"] == runs["single-from-ps"]["summary"]["steps"] == 10


def test_ssp_keeps_its_staleness_bound_and_asp_does_not(runs):
    ssp, asp = server_report(runs["tmp"] / "ssp-slow"), server_report(runs["tmp"] / "asp-slow")
    assert ssp["staleness_bound"] == SSP_BOUND
    assert ssp["gradients"] == asp["gradients"] == 40
    assert 1 <= ssp["max_staleness"] <= SSP_BOUND  # the slow worker did make updates stale, within the bound
    for rank in (0, 1):  # what each worker was told about its own updates
        assert max(r["staleness"] for r in records(runs["tmp"] / "ssp-slow", rank)) <= SSP_BOUND
    assert asp["max_staleness"] > SSP_BOUND  # the same slow worker without the gate: the bound means something


def test_drop_behind_keeps_the_bound_and_the_fast_worker_does_not_wait(runs):
    run_dir = runs["tmp"] / "ssp-drop"
    report, fast, slow = server_report(run_dir), records(run_dir, 0), records(run_dir, 1)
    assert [r["step"] for r in fast] == [r["step"] for r in slow] == list(range(1, 21))  # one step numbering
    # The bound, from what was recorded: the server's histogram of applied gradients, each worker's replies.
    assert report["staleness_bound"] == SSP_BOUND and report["max_staleness"] <= SSP_BOUND
    assert max(r.get("staleness", 0) for r in fast + slow) <= SSP_BOUND
    # The straggler dropped late steps (computing nothing: no samples, no fault delay); the fast one none.
    skipped = [r for r in slow if r["skipped"]]
    assert skipped and all(r["samples"] == 0 and r["bytes_sent"] == 0 for r in skipped)
    assert not any(r["skipped"] for r in fast)
    assert max(r["skipped_total"] for r in slow) == len(skipped)
    assert report["dropped_steps"] == [0, len(skipped)]  # the server counted the same steps as dropped
    # Every step computed was pushed, and applied or discarded as too stale: nothing else.
    assert report["gradients"] + report["discarded_gradients"] == 20 + (20 - len(skipped))
    assert sum(r.get("discarded", 0) for r in slow) == report["discarded_gradients"]
    # ...and the straggler still contributes: some of its gradients were applied, not all discarded.
    assert sum(r.get("discarded", 0) for r in slow) < 20 - len(skipped)
    # Plain SSP's gate held the fast worker's replies back, waiting for the slow one; drop_behind never
    # does: every reply went out as its push was handled. (How long the waits were: benchmarks/stragglers.py.)
    plain = server_report(runs["tmp"] / "ssp-slow")
    assert report["held_replies"] == 0 and plain["held_replies"] > 0
    assert plain["dropped_steps"] == [0, 0] and plain["discarded_gradients"] == 0  # off: nothing dropped


def test_training_goes_on_after_a_worker_is_lost(runs):
    chief, server = runs["kill"][0], server_report(runs["tmp"] / "kill")
    assert chief["summary"]["steps"] == 40
    assert server["lost_workers"] == [1]
    # Every BSP round happened; after the loss each took the one live worker's gradient alone.
    assert server["updates"] == 40 and server["gradients"] == 2 * KILL_AT + (40 - KILL_AT)
    losses = [r["loss"] for r in records(runs["tmp"] / "kill", 0)]
    assert sum(losses[-10:]) / 10 < sum(losses[KILL_AT:KILL_AT + 10]) / 10
    evals = [r["eval_loss"] for r in records(runs["tmp"] / "kill", 0, "eval")]
    assert len(evals) == 4 and evals[-1] < evals[0]  # steps 10 (after the loss) and 40
    assert runs["kill"][2]["params"].keys() == chief["params"].keys()  # the server finished too


def test_resume_equals_uninterrupted(runs):
    job = runs["resume"]
    for r in (job[0], job[2]):
        assert max_param_diff(r["full"]["params"], r["resumed"]["params"]) == 0.0
    assert job[0]["resumed"]["summary"]["steps"] == 10  # it really ran only the second half


@pytest.mark.parametrize("job,servers", [("bsp-mlp", 1), ("bsp-gpt", 1), ("asp-alone", 2)])
def test_bytes_are_the_pushes_and_pulls(runs, job, servers):
    chief, run_dir = runs[job][0], runs["tmp"] / job
    num_workers = WORLD - servers
    param_bytes = 4 * sum(v.numel() for v in chief["params"].values())
    # A worker sends a header and its gradient to each server, and gets a reply header and the
    # parameters back: every step, exactly.
    assert chief["summary"]["bytes_sent_per_step"] == param_bytes + servers * HEADER_BYTES
    reply_bytes = param_bytes + servers * 8 * PUSH_REPLY_NUMEL
    for rank in range(num_workers):
        assert {r["bytes_received"] for r in records(run_dir, rank)} == {reply_bytes}
    reports = [server_report(run_dir, num_workers + s) for s in range(servers)]
    steps_in = 20 * num_workers  # gradients each server received
    assert sum(r["push_bytes"] for r in reports) == steps_in * (param_bytes + servers * HEADER_BYTES)
    assert sum(r["pull_bytes"] for r in reports) == steps_in * reply_bytes


def test_partition_balances_whole_tensors():
    # largest first, to the least loaded: a (10) -> 0, b (7) -> 1, c (5) -> 1, d (3) -> 0
    assert partition({"a": 10, "b": 7, "c": 5, "d": 3}, 2) == [["a", "d"], ["b", "c"]]
    assert partition({"a": 4, "b": 1}, 3) == [["a"], ["b"], []]  # more servers than tensors: one idles


@pytest.mark.parametrize("sets,world,key", [
    (["strategy.ps.servers=2"], 2, "strategy.ps.servers = 2"),
    (["strategy.ps.servers=3"], 2, "strategy.ps.servers = 3"),
    (["optimizer.grad_clip=1.0"], 3, "optimizer.grad_clip"),
    (["faults.rank=2", "faults.slowdown=2"], 3, "faults.rank = 2: a server"),
    (["faults.rank=0", "faults.kill_at_step=3"], 3, "faults.rank = 0"),
    (["strategy.ps.mode=bsp", "strategy.ps.drop_behind=true"], 3, "strategy.ps.drop_behind = true"),
    (["strategy.ps.mode=asp", "strategy.ps.drop_behind=true"], 3, "strategy.ps.drop_behind = true"),
])
def test_invalid_layouts_are_one_line_errors(sets, world, key):
    cfg = config(MLP, *PS, *sets)
    with pytest.raises(ConfigError) as err:
        layout(cfg, world)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_global_batch_is_split_over_the_workers_only():
    layout(config(MLP, *PS, "training.global_batch_size=32"), 3)  # 2 workers: 16 each, though 32 % 3 != 0
    with pytest.raises(ConfigError, match="data-parallel ranks x grad_accum_steps = 3 x 1"):
        layout(config(MLP, *PS, "training.global_batch_size=32"), 4)
