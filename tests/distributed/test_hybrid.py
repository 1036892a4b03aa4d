"""dp x pp x tp meshes on 4 ranks against the single-process oracle, and resume across layouts."""
import pytest

import paratrain
from paratrain.config import ConfigError
from paratrain.strategies.layout import layout
from paratrain.testing import run_ranks
from tests.helpers import TINY_GPT, config, fit, max_param_diff

TOL = 1e-5
# SGD with momentum and clipping: the gradient norm must span stages, tp shards and dp replicas.
BASE = [*TINY_GPT, "model.n_layer=4", "strategy.pipeline.microbatches=2", "strategy.name=hybrid",
        "optimizer.name=sgd", "optimizer.lr=0.3", "optimizer.momentum=0.9", "optimizer.grad_clip=0.5",
        "checkpoint.enabled=true", "checkpoint.every=4", "checkpoint.keep=2", "training.steps=8"]
# dp replicated with pp, dp sharded (FSDP) with tp, pp with tp, four stages. (dp sharded with pp and
# dp replicated with tp ran here too, and cost the suite 25 s; their parts are the same code.)
MESHES = [("2x2x1", "replicate"), ("2x1x2", "shard"), ("1x2x2", "replicate"), ("1x4x1", "replicate")]


def _mesh(tmp_path, dims, mode):
    dp, pp, tp = dims.split("x")
    return config(BASE, f"strategy.dp={dp}", f"strategy.pp={pp}", f"strategy.tp={tp}", f"strategy.dp_mode={mode}",
                  f"strategy.pipeline.microbatches={max(2, int(pp))}", run_dir=tmp_path / f"{dims}-{mode}")


def meshes_then_resume(cfgs, ddp_cfg, ckpt, dropout_cfg) -> list[dict]:
    """Every mesh in turn, ddp on all ranks resumed from the first mesh's checkpoint, then a
    tp mesh with dropout: its LayerNorm weights as this rank holds them (replicated over tp)."""
    out = [fit(cfg) for cfg in cfgs] + [fit(ddp_cfg, resume=ckpt)]
    model = paratrain.train(dropout_cfg).model
    out.append({n: p.to_local().detach().clone() for n, p in model.named_parameters() if ".ln" in n})
    return out


def test_meshes_equal_single_and_checkpoints_cross_layouts(tmp_path):
    oracle = fit(config(BASE, "strategy.name=single", run_dir=tmp_path / "single"))
    cfgs = [_mesh(tmp_path, dims, mode) for dims, mode in MESHES]
    ckpt = tmp_path / "2x2x1-replicate" / "checkpoints" / "step-00000004.pt"
    ddp = config(BASE, "strategy.name=ddp", run_dir=tmp_path / "ddp4-resumed")
    dropout = config(BASE, "strategy.dp=2", "strategy.tp=2", "model.dropout=0.2", run_dir=tmp_path / "dropout")
    per_rank = run_ranks(meshes_then_resume, 4, cfgs, ddp, ckpt, dropout, timeout_s=600)
    # Plain TP keeps activations replicated over tp: the same dropout masks on both tp ranks, or
    # the replicas of every LayerNorm drift apart.
    norms = [rank[-1] for rank in per_rank]
    assert norms[0] and all(max_param_diff(n, norms[0]) == 0.0 for n in norms)
    per_rank = [rank[:-1] for rank in per_rank]
    for i, (dims, mode) in enumerate(MESHES):
        # The final checkpoint holds the whole model, gathered from every stage and shard.
        assert max_param_diff(per_rank[0][i]["params"], oracle["params"]) <= TOL, (dims, mode)
        for rank in per_rank:  # and every rank logged the global batch's losses
            assert rank[i]["summary"]["final_loss"] == pytest.approx(oracle["summary"]["final_loss"], abs=1e-5)
            assert rank[i]["summary"]["eval_loss"] == pytest.approx(oracle["summary"]["eval_loss"], abs=1e-5)
    # Bytes of 2x2x1-replicate, per rank and step: the activations (forward) or their gradients
    # (backward) of the local batch of 4 x 16 x 32 floats to the other stage, plus the ring
    # all-reduce of its stage's gradients over dp = 2 (2 (n-1)/n S = S), plus two 4-byte losses.
    stage_keys = [lambda k: k.startswith(("tok_emb", "pos_emb", "layers.0.", "layers.1.")),
                  lambda k: not k.startswith(("tok_emb", "pos_emb", "layers.0.", "layers.1."))]
    for rank, r in enumerate(per_rank):
        in_stage = stage_keys[(rank // 1) % 2]  # mesh (dp, pp): pp rank = global rank % 2
        stage_bytes = sum(v.numel() * 4 for k, v in oracle["params"].items() if in_stage(k))
        assert r[0]["summary"]["bytes_sent_per_step"] == 4 * 16 * 32 * 4 + stage_bytes + 8
    # Saved with dp2 x pp2, resumed with dp4 (ddp) and with single: the same end point.
    for rank in per_rank:
        assert max_param_diff(rank[-1]["params"], oracle["params"]) <= TOL
        assert rank[-1]["summary"]["steps_this_start"] == 4
    resumed_dir = tmp_path / "single-resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    (resumed_dir / ckpt.name).write_bytes(ckpt.read_bytes())
    single = fit(config(BASE, "strategy.name=single", run_dir=tmp_path / "single-resumed"), resumed_dir / ckpt.name)
    assert max_param_diff(single["params"], oracle["params"]) <= TOL


@pytest.mark.parametrize("sets,world,message", [
    (["strategy.pp=3"], 4, "strategy.pp x strategy.tp = 3 x 1: must divide the number of processes, 4"),
    (["strategy.dp=3", "strategy.pp=2"], 4, "dp=3 x pp=2 x tp=1 = 6: must multiply to the number of processes, 4"),
    (["strategy.tp=2", "model.n_head=3", "model.d_model=30"], 4,
     "model.n_head = 3: must be divisible by the tensor-parallel degree 2"),
    (["strategy.tp=2", "strategy.pp=2", "strategy.tensor.sequence_parallel=true"], 4,
     "strategy.tensor.sequence_parallel = true: not with strategy.pp > 1"),
    (["strategy.pp=4", "model.n_layer=2", "strategy.pipeline.microbatches=4"], 4,
     "model.n_layer = 2: fewer blocks than pipeline stages"),
    (["strategy.pp=2", "strategy.pipeline.microbatches=3"], 4, "strategy.pipeline.microbatches = 3: must divide"),
    (["strategy.pp=4", "strategy.pipeline.microbatches=2"], 4,
     "strategy.pipeline.microbatches = 2: schedule '1f1b' needs at least one per stage (4)"),
])
def test_invalid_meshes(sets, world, message):
    with pytest.raises(ConfigError) as err:
        layout(config(BASE, *sets), world)
    assert message in str(err.value)
