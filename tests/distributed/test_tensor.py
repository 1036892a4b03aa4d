"""tensor (Megatron-style tensor parallelism through DTensor) on 2 gloo ranks against the single oracle."""
import re
from collections import Counter

import pytest
import torch

from paratrain.config import ConfigError
from paratrain.strategies.layout import layout
from paratrain.strategies.tensor.tensor import TensorParallel
from paratrain.testing import run_ranks
from tests.helpers import TINY_GPT, config, fit, initial_params, max_param_diff

# Measured max |tensor - single| after 20 AdamW steps: 8e-7 (plain), 9e-7 (sequence parallel). fp32
# only: the split matmuls, the vocabulary-parallel softmax and the all-reduces add partial sums in
# another order than one process does.
TOL = 1e-5
# fit() reads a sharded run's full parameters from its final checkpoint; step 10 is resumed below.
TP = [*TINY_GPT, "checkpoint.enabled=true", "checkpoint.every=10", "checkpoint.keep=2"]


def _assert_equals_oracle(ranks, oracle):
    for r in ranks:
        assert max_param_diff(r["params"], oracle["params"]) <= TOL
        for key in ("final_loss", "eval_loss"):
            assert r["summary"][key] == pytest.approx(oracle["summary"][key], abs=1e-5)


def test_tensor_parallel_equals_single_and_its_checkpoint_resumes_in_another_layout(tmp_path):

    oracle = fit(config(TINY_GPT, "strategy.name=single", run_dir=tmp_path / "single"))
    ranks = run_ranks(fit, 2, config(TP, "strategy.name=tensor", run_dir=tmp_path / "tensor"))
    # The comparison means something only if training moved the weights well beyond TOL.
    assert max_param_diff(oracle["params"], initial_params(config(TINY_GPT))) > 1e-2
    _assert_equals_oracle(ranks, oracle)
    # Every rank exchanged activations (the count itself is checked in the test below).
    assert all(b > 0 for b in ranks[0]["summary"]["bytes_sent_per_step_per_rank"])

    # The step-10 checkpoint holds full tensors: a single process continues it to the same weights,
    # and so does tensor with sequence parallelism, which loads them back into its shards.
    ckpt = tmp_path / "tensor" / "checkpoints" / "step-00000010.pt"
    for name, sets, nproc in [("single", [], 1), ("tensor-sp", ["strategy.tensor.sequence_parallel=true"], 2)]:
        resumed_ckpt = tmp_path / name / "resumed" / "checkpoints" / ckpt.name
        resumed_ckpt.parent.mkdir(parents=True)
        resumed_ckpt.write_bytes(ckpt.read_bytes())
        cfg = config(TP, f"strategy.name={name.split('-')[0]}", *sets, run_dir=resumed_ckpt.parent.parent)
        resumed = fit(cfg, resumed_ckpt) if nproc == 1 else run_ranks(fit, nproc, cfg, resumed_ckpt)[-1]
        assert resumed["summary"]["steps_this_start"] == 10  # it really ran only the second half
        assert max_param_diff(resumed["params"], ranks[0]["params"]) <= TOL


def test_sequence_parallel_with_accumulation_and_clipping_equals_single(tmp_path):
    # Two micro-batches accumulate the norms' sequence-partial gradients; clipping needs every
    # gradient as a DTensor. The oracle: one batch of the same 8 samples (see test_ddp).
    sets = ["optimizer.grad_clip=0.05"]
    single = fit(config(TINY_GPT, "strategy.name=single", *sets, run_dir=tmp_path / "single"))
    ranks = run_ranks(fit, 2, config(TP, "strategy.name=tensor", "strategy.tensor.sequence_parallel=true",
                                     "training.grad_accum_steps=2", *sets, run_dir=tmp_path / "sp"))
    _assert_equals_oracle(ranks, single)


def _collectives_and_replicas(cfgs: list) -> list:
    """On each rank, for each config: 3 steps, the second under CommDebugMode (collectives counted
    and computed), and this rank's copy of the replicated parameters."""
    from torch.distributed.tensor.debug import CommDebugMode

    from paratrain.data import ShardedBatches, build_datasets
    from paratrain.models import build_loss, build_model
    from paratrain.strategies.tensor.parallelize import ring_bytes, step_collectives
    from paratrain.topology import Topology

    topo = Topology.from_env(cfgs[0].run, lambda n: layout(cfgs[0], n))
    names = {"all_reduce": "all_reduce", "all_gather": "all_gather_into_tensor",
             "reduce_scatter": "reduce_scatter_tensor"}
    out = []
    for cfg in cfgs:
        torch.manual_seed(cfg.training.seed)
        datasets = build_datasets(cfg)
        strategy = TensorParallel(cfg, topo, build_model(cfg, datasets.vocab_size), build_loss(cfg))
        torch.manual_seed(cfg.training.seed + 1 + topo.rank)  # as the trainer: dropout streams differ
        batches = ShardedBatches(datasets.train, cfg.training.global_batch_size, 0, 1, cfg.training.seed)
        strategy.train_step(batches.batch(0))  # the first step also shares the dropout generator
        with CommDebugMode() as comm:
            stats = strategy.train_step(batches.batch(1))
        computed = step_collectives(strategy.module, tuple(batches.batch(1).inputs.shape), 1,
                                    cfg.strategy.tensor.sequence_parallel)
        strategy.train_step(batches.batch(2))
        replicas = {k: v.to_local().clone() for k, v in strategy.module.state_dict().items()
                    if v.placements == (torch.distributed.tensor.Replicate(),)}
        counted = {str(op).rsplit(".", 1)[-1]: n for op, n in comm.get_comm_counts().items()}
        # One plain c10d all-reduce a step is the update guard's (nonfinite.py), not tensor parallel's.
        assert counted.pop("allreduce_") == 1
        out.append({"counted": counted,
                    "computed": dict(Counter(names[op] for op, _ in computed)),
                    "bytes_sent": stats.bytes_sent,
                    "computed_bytes": sum(ring_bytes(op, b, topo.world_size) for op, b in computed),
                    "replicas": replicas})
    topo.destroy()
    return out


def test_computed_collectives_match_the_counted_ones_and_dropout_keeps_replicas_equal():
    # Plain TP with dropout: the replicated activations must draw the same masks on both ranks,
    # or the replicated parameters (norms, positions) drift apart.
    plain = config(TINY_GPT, "strategy.name=tensor", "model.dropout=0.1")
    sp = config(TINY_GPT, "strategy.name=tensor", "strategy.tensor.sequence_parallel=true")
    ranks = run_ranks(_collectives_and_replicas, 2, [plain, sp])
    for rank in ranks:
        for result in rank:
            assert result["counted"] == result["computed"]
            assert result["bytes_sent"] == result["computed_bytes"] > 0
    assert ranks[0][0]["counted"] == {"all_reduce": 4 * 2 + 2 + 3}  # 2 blocks, embedding, head, loss
    assert ranks[0][0]["replicas"] and max_param_diff(ranks[0][0]["replicas"], ranks[1][0]["replicas"]) == 0.0


@pytest.mark.parametrize("sets, message", [
    (["model.n_head=3", "model.d_model=48"], "model.n_head = 3: must be divisible by the tensor-parallel degree 2"),
    (["model.name=mlp", "data.name=synthetic"], "model.name = 'mlp': tensor parallelism splits the built-in GPT only"),
    (["model.block_size=15", "strategy.tensor.sequence_parallel=true"], "model.block_size = 15: must be divisible"),
])
def test_layouts_tensor_parallelism_cannot_split_are_clear_errors(sets, message):
    cfg = config(TINY_GPT, "strategy.name=tensor", *sets)
    with pytest.raises(ConfigError, match=re.escape(message)):
        layout(cfg, 2)
    assert layout(config(TINY_GPT, "strategy.name=tensor"), 2).tp == 2
