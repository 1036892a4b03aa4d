"""Topology degrees and deterministic per-rank sharding (no processes)."""
import pytest
import torch

from paratrain.config import ConfigError, RunConfig
from paratrain.data import ShardedBatches
from paratrain.data.synthetic import TensorDataset
from paratrain.data.text import char_splits, pydoc_corpus
from paratrain.topology import ParallelDims, Topology


def test_parallel_dims_must_multiply_to_world():
    ParallelDims(dp=2, pp=2, tp=1).check(4)
    with pytest.raises(ConfigError, match="dp=2 x pp=2 x tp=2 = 8: must multiply to the number of processes, 4"):
        ParallelDims(dp=2, pp=2, tp=2).check(4)


def test_single_topology():
    topo = Topology.single(RunConfig(device="cpu"))
    assert (topo.world_size, topo.rank, topo.is_main, topo.backend) == (1, 0, True, "gloo")
    assert topo.group("dp") is None and topo.axis_rank("dp") == 0
    assert torch.get_num_threads() == 1


def test_cuda_refused_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="run.device = 'cuda': no CUDA device is visible"):
        Topology.single(RunConfig(device="cuda"))


def _dataset(n=103):
    return TensorDataset(torch.arange(n).unsqueeze(1), torch.zeros(n, 1))


def test_ranks_partition_the_single_batch_and_cover_an_epoch_once():
    ds, B, D = _dataset(), 12, 3
    single = ShardedBatches(ds, B, 0, 1, seed=7)
    ranks = [ShardedBatches(ds, B, r, D, seed=7) for r in range(D)]
    seen = []
    for step in range(single.steps_per_epoch):
        union = torch.cat([r.indices(step) for r in ranks])
        assert torch.equal(union, single.indices(step))
        seen += union.tolist()
    assert len(seen) == len(set(seen)) == single.steps_per_epoch * B  # each sample at most once
    assert single.steps_per_epoch == 103 // 12


def test_epochs_reshuffle_deterministically():
    a, b = ShardedBatches(_dataset(), 10, 0, 1, seed=1), ShardedBatches(_dataset(), 10, 0, 1, seed=1)
    e = a.steps_per_epoch
    assert torch.equal(a.indices(e + 2), b.indices(e + 2))  # a pure function of (seed, step)
    assert not torch.equal(a.indices(0), a.indices(e))
    assert not torch.equal(a.indices(0), ShardedBatches(_dataset(), 10, 0, 1, seed=2).indices(0))


def test_batch_larger_than_data_is_refused():
    with pytest.raises(ConfigError, match="global_batch_size = 200: the train split holds only 103 samples"):
        ShardedBatches(_dataset(), 200, 0, 1, seed=0)


def test_pydoc_corpus_and_char_windows():
    text = pydoc_corpus()
    assert len(text) > 400_000
    train, held_out, vocab = char_splits(text, block_size=16, eval_fraction=0.1)
    batch = train.get(torch.tensor([0, 5]))
    assert batch.inputs.shape == (2, 16) and batch.tokens_per_sample == 16
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # targets are inputs shifted by one
    assert vocab.decode(batch.inputs[0].tolist()) == text[:16]
    assert len(held_out) > 0 and len(train) * 16 < len(text)
