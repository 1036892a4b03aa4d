"""paratrain's `ddp` step against a plain hand-written torch DDP loop, alternating in one run.

Both train the same GPT (same seed, same per-rank batch, same AdamW) on the same world size,
in the same processes, in alternating rounds of K steps, so drift of the machine hits both
alike. paratrain's step includes everything the trainer does per step: data slicing, the
learning-rate schedule, the loss all-reduce for logging, timing, the bytes-counting comm hook,
the JSON-lines record, the non-finite guard's all-reduce and the per-step agreement on signals. Goal: ratio <= 1.03.

    python benchmarks/overhead.py [--nproc 2] [--rounds 8] [--steps 10]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

SETS = ["model.name=gpt", "strategy.name=ddp", "optimizer.name=adamw", "optimizer.lr=1e-3",
        "training.steps=1000000", "training.eval_every=0", "run.progress=off", "checkpoint.enabled=false"]


def plain_ddp_loop(cfg, topo, batches):
    """What a user writes by hand from the torch DDP tutorial."""
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.models import GPT

    torch.manual_seed(cfg.training.seed)
    m = cfg.model
    model = DistributedDataParallel(GPT(batches.dataset_vocab, m.n_layer, m.n_head, m.d_model, m.block_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=cfg.optimizer.betas)
    step = 0

    def one_step():
        nonlocal step
        batch = batches.batch(step)
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        step += 1

    return one_step


def bench_rank(sets: list[str], rounds: int, steps: int) -> dict:
    import paratrain
    from paratrain.data import ShardedBatches, build_datasets
    from paratrain.strategies import layout
    from paratrain.topology import Topology
    from paratrain.trainer import Trainer

    cfg = paratrain.load_config(None, sets)
    topo = Topology.from_env(cfg.run, lambda n: layout(cfg, n))
    data = build_datasets(cfg)
    batches = ShardedBatches(data.train, cfg.training.global_batch_size, topo.axis_rank("dp"), topo.size("dp"),
                             cfg.training.seed)
    batches.dataset_vocab = data.vocab_size
    plain = plain_ddp_loop(cfg, topo, batches)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, topo, run_dir, datasets=data)

        def paratrain_step():  # as Trainer.fit: the step, then the agreement on signals (signals.py)
            trainer.step()
            trainer.strategy.agree_to_stop(0)

        for _ in range(3):  # warm up both
            plain()
            paratrain_step()
        times = {"plain": [], "paratrain": []}
        for r in range(rounds):
            # Alternate which goes first, so neither always follows the other's cache state.
            order = [("plain", plain), ("paratrain", paratrain_step)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                times[name].append((time.perf_counter() - t0) / steps)
        trainer.metrics.close()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="steps per round and side")
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = p.parse_args()

    from paratrain.testing import run_ranks

    times = run_ranks(bench_rank, args.nproc, SETS + args.set, args.rounds, args.steps, timeout_s=1800)[0]
    print(f"ddp overhead: GPT (demo size), {args.nproc} ranks, {args.rounds} rounds x {args.steps} steps each side")
    print(f"{'round':>5} {'plain ms/step':>14} {'paratrain ms/step':>18} {'ratio':>7}")
    ratios = []
    for i, (a, b) in enumerate(zip(times["plain"], times["paratrain"])):
        ratios.append(b / a)
        print(f"{i:>5} {1000 * a:>14.2f} {1000 * b:>18.2f} {b / a:>7.3f}")
    total = sum(times["paratrain"]) / sum(times["plain"])
    print(f"median ms/step: plain {1000 * statistics.median(times['plain']):.2f}, "
          f"paratrain {1000 * statistics.median(times['paratrain']):.2f}")
    print(f"median ratio {statistics.median(ratios):.3f}   total-time ratio {total:.3f}   (goal <= 1.03)")


if __name__ == "__main__":
    main()
