"""The training loop: one-screen step, evaluation, checkpoints, metrics. Knows no strategy by name."""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from paratrain import messages, watchdog
from paratrain.checkpoint import Checkpointer, check_compatible, read_checkpoint
from paratrain.config import Config
from paratrain.data import Datasets, ShardedBatches, build_datasets
from paratrain.evaluation import build_metrics, named
from paratrain.faults import FaultInjector
from paratrain.memory import held, measured
from paratrain.metrics import MetricsLog, Progress, predicted, print_summary
from paratrain.models import build_loss, build_model
from paratrain.nonfinite import NonFiniteError
from paratrain.optim import lr_at
from paratrain.rundir import write_json
from paratrain.signals import Stopped, StopRequest
from paratrain.strategies import get_strategy
from paratrain.topology import Topology


def initial_model(cfg: Config, model: nn.Module | None = None,
                  datasets: Datasets | None = None) -> tuple[nn.Module, Datasets]:
    """The model every rank starts from, bit for bit (the same seed first), and the datasets."""
    torch.manual_seed(cfg.training.seed)
    datasets = datasets or build_datasets(cfg)
    return (model if model is not None else build_model(cfg, datasets.vocab_size)), datasets


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, run_dir: Path, *, resume: Path | None = None,
                 checkpoint: dict | None = None, model: nn.Module | None = None, loss_fn: Callable | None = None,
                 datasets: Datasets | None = None, metrics: dict[str, Callable] | None = None):
        self.cfg, self.topo, self.run_dir = cfg, topo, Path(run_dir)
        t = cfg.training
        model, datasets = initial_model(cfg, model, datasets)
        ckpt = checkpoint if checkpoint is not None or resume is None else read_checkpoint(resume)
        if ckpt is not None:
            check_compatible(ckpt, cfg, resume, model)
        self.faults = FaultInjector(cfg.faults, topo.rank)
        loss_fn = self.faults.wrap_loss(loss_fn or build_loss(cfg))
        # Beating before the strategy is made: a parameter-server worker restarted into the job (apart.py)
        # registers there, and its servers judge it by this file (not the previous process's).
        self.heartbeat = watchdog.Heartbeat(self.run_dir, topo.rank).start(topo.processes)  # watchdog.py
        self.shard = topo.data_shard()  # this rank's share of each batch: (which, of how many)
        self.batches = ShardedBatches(datasets.train, t.global_batch_size, *self.shard, t.seed)
        strategy = get_strategy(cfg.strategy.name, topo.replicas > 1)
        example = {"example": self.batches.batch(0).inputs.to(topo.device)} if strategy.traces_model else {}
        self.strategy = strategy(cfg, topo, model, loss_fn, **example)
        self.strategy.metrics.update(build_metrics((), metrics))  # the Python API's own (evaluation.py)
        self.held_out = ShardedBatches(datasets.eval, t.global_batch_size, *self.shard, t.seed, split="eval")
        self.eval_batches = self._eval_batches()
        self.checkpointer = Checkpointer(self.run_dir, cfg, topo)
        torch.manual_seed(t.seed + 1 + topo.rank)  # dropout streams differ across ranks
        self.step_num = 0
        if ckpt is not None:
            self.step_num = self.checkpointer.restore(ckpt, self.strategy)
        # A worker restarted into the running job keeps its earlier records: it does not train those steps again.
        self.metrics = MetricsLog(self.run_dir, topo.rank, self.step_num, keep_all=topo.alone,
                                  tensorboard=cfg.run.tensorboard)
        # Memory is measured on this start's second step (the optimizer's state exists by then): memory.py
        self.measure_at, self.memory = self.step_num + 1, {}

    def step(self) -> tuple[dict, float | None]:
        """One optimizer step on one global batch, then evaluation and checkpoint when due."""
        t = self.cfg.training
        step = self.step_num = self.strategy.begin_step(self.step_num)  # the index of the batch and the lr
        number = step + 1  # steps count from 1 in records, progress, checkpoints and messages (metrics.py)
        self.heartbeat.at(number, "train_step")
        self.faults.before_step(number)
        if (shard := self.strategy.data_shard()) != self.shard:  # survivors take over a lost replica's share
            self._reshard(shard)
        t0 = time.perf_counter()
        batch = self.batches.batch(step).to(self.topo.device)
        data_s = time.perf_counter() - t0
        lr = lr_at(self.cfg.optimizer, step, t.steps)
        self.strategy.set_lr(lr)
        try:
            with measured(self.strategy, self.memory) if step == self.measure_at else nullcontext():
                stats = self.strategy.train_step(batch)
        except NonFiniteError as e:
            raise NonFiniteError(e.ranks, number, e.where, e.outcome) from None
        if not stats.skipped:  # a straggler computes slower; a step it dropped costs it nothing
            stats.compute_s += self.faults.after_step(stats.compute_s)
        # What a codec saved, counted at its calls; taken once, so a step that sent nothing reports none.
        ratio, self.strategy.meter.compression_ratio = self.strategy.meter.compression_ratio, None
        if ratio is not None:
            stats.extra.setdefault("compression_ratio", ratio)
        self.step_num += 1
        rec = self.metrics.log_step(number, stats, lr, data_s, time.perf_counter() - t0, t.global_batch_size,
                                   batch.tokens_per_sample)
        evals = None
        with self.strategy.paused():
            if self._due(t.eval_every):
                self.heartbeat.at(number, "evaluate")
                evals = named(self.strategy.metrics, self.strategy.evaluate(self.eval_batches))
                self.strategy.meter.take()  # evaluation traffic is not a training step's
                self.metrics.log_eval(number, evals)
            if self.cfg.checkpoint.enabled and self._due(self.cfg.checkpoint.every):
                self.heartbeat.at(number, "checkpoint")
                self.checkpointer.save(self.step_num, self.strategy, self.batches.position(self.step_num))
        return rec, evals

    def _reshard(self, shard: tuple[int, int]) -> None:
        self.shard = shard
        self.batches.reshard(*shard)
        self.held_out.reshard(*shard)
        self.eval_batches = self._eval_batches()

    def _eval_batches(self) -> list:
        n = self.cfg.training.eval_batches
        n = self.held_out.steps_per_epoch if n == "all" else n
        return [self.held_out.batch(i).to(self.topo.device) for i in range(n)]

    def _checkpoint_now(self) -> Path | None:
        """The checkpoint of the step just done, written now unless the step wrote it."""
        if not (self.cfg.checkpoint.enabled and self.strategy.checkpoints_on_stop):
            return None
        if self._due(self.cfg.checkpoint.every):
            return self.checkpointer.path(self.step_num)
        return self.checkpointer.save(self.step_num, self.strategy, self.batches.position(self.step_num))

    def _due(self, every: int) -> bool:
        return self.step_num == self.cfg.training.steps or (every > 0 and self.step_num % every == 0)

    def fit(self) -> dict:
        """Run the remaining steps; returns rank 0's summary (every rank returns its own)."""
        cfg, total = self.cfg, self.cfg.training.steps
        progress = Progress(cfg.run.progress, total, self.step_num, cfg.training.log_every, self.topo.is_main)
        stop = StopRequest().install()  # SIGTERM / Ctrl-C: see signals.py
        ended = "failed"
        try:
            while self.step_num < total:
                progress.update(*self.step())
                self.heartbeat.at(self.step_num, "agree_to_stop")
                if signum := self.strategy.agree_to_stop(stop.signum):
                    ended = "stopped"
                    raise Stopped(signum, self.step_num, self._checkpoint_now())
            ended = "finished"
        except (Stopped, NonFiniteError):
            raise
        except Exception as e:  # most often a peer died or hung: say which, while SIGTERM is still ours
            if self.topo.world_size > 1 and watchdog.report(self.run_dir, self.topo.rank, self.strategy.lockstep):
                raise watchdog.PeerLost(f"rank {self.topo.rank}: stopped on {type(e).__name__}: "
                                        f"{str(e).partition(chr(10))[0]}") from e
            raise
        finally:
            progress.close()
            self.metrics.close()
            stop.restore()
            self.heartbeat.close(ended)
        finished = self.strategy.close(self.run_dir)  # the group of the ranks that finished
        summary = self.metrics.summary()
        mine = (summary["bytes_sent_per_step"], held(self.memory))
        per_rank = messages.all_gather(mine, group=finished) if self.topo.world_size > 1 else [mine]
        summary["bytes_sent_per_step_per_rank"] = bytes_per_rank = [b for b, _ in per_rank]
        summary["memory_bytes_per_rank"] = [m for _, m in per_rank]
        if self.topo.is_main:
            summary.update(predicted(cfg, self.topo.processes, summary))
            write_json(self.run_dir / "summary.json", summary)
        if self.topo.is_main and cfg.run.progress != "off":
            title = f"paratrain: {cfg.model.name} with {cfg.strategy.name} on {self.topo.world_size} process(es)"
            print_summary(summary, bytes_per_rank, self.run_dir, title)
        return summary
