"""Starting work: in this process, or as N local workers through torch's elastic launcher.

`paratrain run` checks the whole config against the process count, settles the run directory
and the checkpoint to resume from, and only then starts workers, through the same code path as
`torchrun ... -m paratrain worker CONFIG` (torch.distributed.run), so one machine and many
behave alike. Multi-node is torchrun's rendezvous, in a store that node 0's launcher hosts
(`--nnodes`, nodes.py). A failed group is restarted by torch's agent up to `run.max_restarts`
times and continues from its newest checkpoint (restarts.py); the strategies that survive a lost
worker run each worker in its own failure domain instead (apart.py), and fault-tolerant ddp one
torchrun job per replica group (replica_groups.py).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.nn as nn

from paratrain import watchdog
from paratrain.apart import SURVIVES_LOSS, run_apart
from paratrain.checkpoint import list_checkpoints, newest_verified, read_checkpoint
from paratrain.config import Config, ConfigError
from paratrain.data import Datasets, as_datasets
from paratrain.nodes import Nodes, await_job, publish
from paratrain.nonfinite import NONFINITE_EXIT, NonFiniteError
from paratrain.preflight import preflight
from paratrain.restarts import OWNED_ENV, attempt, job_dir, record_end
from paratrain.results import LaunchResult, TrainResult
from paratrain.rundir import Plan, claim, notes, record_config, settle, write_json
from paratrain.signals import HANDLED, Stopped
from paratrain.topology import REJOIN_ENV, REPLICA_ENV

# On SIGTERM / Ctrl-C the workers finish their step and write a checkpoint (signals.py); torch's
# agent waits this long for them before SIGKILL.
SHUTDOWN_GRACE_S = 120
# Measured: with the rendezvous store shared with the process group, 4 of 15 restarts hung.
LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# A local run's workers: gloo's pair sockets on the loopback interface, unless the user named one.
LOCAL_ENV = {"GLOO_SOCKET_IFNAME": "lo"}


def _rejoins(cfg: Config):
    """Which ranks apart.py may restart into the running job: the parameter server's workers but
    the chief, and its servers, under SSP and ASP (parameter_server/protocol.rejoins)."""
    if cfg.strategy.name != "parameter_server":
        return lambda rank: False
    from paratrain.strategies.parameter_server.protocol import rejoins

    return lambda rank: rejoins(cfg) and rank != 0


def train(cfg: Config, *, resume: str | Path | None = None, model: nn.Module | None = None,
          loss_fn: Callable | None = None, datasets: Datasets | tuple | None = None,
          discard_newer: bool = False, metrics: dict[str, Callable] | None = None) -> TrainResult:
    """Train in this process: alone (`single`), or as one rank of a job that torchrun started.

    `model`, `loss_fn` and `datasets` (a (train, eval) pair of map-style datasets of (input,
    target) pairs) override what the config names, for use from Python; `metrics` ({name:
    fn(output, target) -> the batch's mean}) are evaluated beside the loss.
    """
    from paratrain.strategies import get_server, layout
    from paratrain.topology import Topology
    from paratrain.trainer import Trainer, initial_model

    datasets = None if datasets is None else as_datasets(datasets)
    distributed = "WORLD_SIZE" in os.environ  # a rank of a torchrun / `paratrain run` job
    if not distributed and cfg.strategy.name != "single":
        raise ConfigError(f"strategy.name = '{cfg.strategy.name}': needs worker processes; start it with "
                          "'paratrain run CONFIG --nproc N' or torchrun")
    derived = distributed and not cfg.run.dir
    if derived:  # under torchrun every rank, on every node, derives this one
        cfg = cfg.replace(f"run.dir={json.dumps(str(job_dir(cfg.run.name)))}")
    owned = os.environ.get(OWNED_ENV)
    owned = bool(owned) and Path(owned) == Path(cfg.run.dir)  # a worker of `paratrain run`: its launcher settled it
    # Restarted by torch's agent: continue from the newest checkpoint (restarts.py). A directory
    # that only this job writes to (its launcher's, or the one derived from the torchrun job) is
    # looked at on every start: on several nodes an agent restarts its workers for a peer node's
    # failure with TORCHELASTIC_RESTART_COUNT unchanged (torch counts a membership change as no
    # restart), and those workers must continue from where the others do.
    newest = newest_verified(Path(cfg.run.dir)) if attempt() > 0 or owned or derived else None
    restarted = attempt() > 0 or (newest is not None and (resume is None or Path(resume) != newest[0]))
    plan = None
    if owned:
        ckpt_path, ckpt = (Path(resume), None) if resume is not None else (None, None)
        if newest is not None:
            ckpt_path, ckpt = newest[0], newest[1]
    else:
        cfg, plan = settle(cfg, cfg.run.dir if newest is not None else resume, discard_newer=discard_newer)
        ckpt_path, ckpt = plan.ckpt_path, plan.ckpt
    if restarted and os.environ.get("RANK", "0") == "0":
        where = f"from {ckpt_path}" if ckpt_path is not None else "from step 0 (no checkpoint yet)"
        group = f"replica group {os.environ.get(REPLICA_ENV)}: " if cfg.fault_tolerance.replica_groups else ""
        print(f"paratrain: {group}restart {max(attempt(), 1)}: continuing {where}", file=sys.stderr)
    if distributed and dist.is_initialized():  # a caller's group: no rank writes there before all have looked
        dist.barrier()
    if distributed:
        topo = Topology.from_env(cfg.run, lambda n: layout(cfg, n), cfg.fault_tolerance.groups,
                                 alone=os.environ.get(REJOIN_ENV) == "1")
    else:
        layout(cfg, 1)
        topo = Topology.single(cfg.run)
    lock, status = None, "failed"
    try:
        if plan is not None and topo.is_main:  # the one owner of the run directory
            cfg, lock = claim(cfg, plan)
            record_config(cfg.run.dir, cfg)
            for line in notes(plan):
                print(f"paratrain: {line}", file=sys.stderr)
        if topo.world_size > 1:
            dist.barrier()  # the directory is settled before any rank writes to it
        run_dir = Path(cfg.run.dir)
        if not topo.dims.trains(topo.rank):  # a serving rank (parameter servers): no trainer here
            model, _ = initial_model(cfg, model, datasets)
            ckpt = ckpt if ckpt is not None or ckpt_path is None else read_checkpoint(ckpt_path)
            report = get_server(cfg.strategy.name)(cfg, topo, run_dir, ckpt, model)
            status = "finished"
            return TrainResult(model, report, run_dir)
        trainer = Trainer(cfg, topo, run_dir, resume=ckpt_path, checkpoint=ckpt, model=model, loss_fn=loss_fn,
                          datasets=datasets, metrics=metrics)
        summary = trainer.fit()
        status = "finished"
        return TrainResult(trainer.strategy.module, summary, run_dir)
    except Stopped as e:  # deliberate ends: a restart must not train on (restarts.py)
        if distributed:
            record_end(cfg.run.dir, e.exit_code, str(e))
        status = "interrupted"
        raise
    except NonFiniteError as e:
        if distributed:
            record_end(cfg.run.dir, NONFINITE_EXIT, str(e))
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if lock is not None:
            lock.finish(status)
        topo.destroy()


@dataclass
class OwnedRun:
    """A run directory this process owns, settled and checked (`owned_run`)."""
    cfg: Config
    plan: Plan
    run_dir: Path
    config_path: Path
    status: str = "failed"  # how it ended, for owner.json: set by the caller


@contextmanager
def owned_run(cfg: Config, world_size: int, resume, discard_newer: bool):
    """Settle the run directory and the checkpoint to resume from, check everything against
    `world_size` processes, then claim the directory and record the config; the workers started
    inside find it settled (OWNED_ENV). `paratrain run` and `paratrain testbed run` start here."""
    cfg, plan = settle(cfg, resume, discard_newer=discard_newer)
    preflight(cfg, world_size, plan.ckpt_path, plan.ckpt)
    cfg, lock = claim(cfg, plan)  # from here on this process owns the run directory
    run = OwnedRun(cfg, plan, Path(cfg.run.dir), Path(cfg.run.dir))
    try:
        run.config_path = record_config(run.run_dir, cfg)
        for line in notes(plan):
            print(f"paratrain: {line}", file=sys.stderr)
        os.environ[OWNED_ENV] = str(run.run_dir)
        yield run
    finally:
        os.environ.pop(OWNED_ENV, None)
        lock.finish(run.status)


def advice(cfg: Config, world: int) -> list[str]:
    """Settings that run but do not do what their name suggests: said, not refused (a smoke test of
    a parameter server on 2 processes is fair)."""
    out = []
    if cfg.strategy.name == "parameter_server":
        from paratrain.strategies.layout import layout

        if layout(cfg, world).dp == 1:
            out.append(f"strategy.name = 'parameter_server' on {world} processes is one worker and its "
                       "server(s): one worker's asynchronous SGD is `single`'s training; use more processes "
                       "for more workers")
    return out


def launch(cfg: Config, nproc: int | None = None, resume: str | Path | None = None,
           discard_newer: bool = False, nodes: Nodes = Nodes()) -> LaunchResult:
    """Check everything, then train on `nproc` local processes (default: run.nproc): the exit code,
    the run directory, its summary and newest checkpoint (results.py). On several machines
    (`nodes`, nodes.py) node 0 does all of this and the others join it."""
    if nodes.many:
        if cfg.strategy.name == "single":
            raise ConfigError("strategy.name = 'single': one process; --nnodes needs a distributed strategy")
        if cfg.fault_tolerance.replica_groups:
            raise ConfigError("fault_tolerance.replica_groups: on several machines each group is a torchrun job "
                              "of its own, typed on its machine (README: 'More than one machine'); not --nnodes")
        if nodes.rank > 0:
            return LaunchResult.of(_join(nproc, nodes), None)
        if not cfg.run.dir:
            raise ConfigError("--nnodes: set run.dir to a directory every node sees (shared storage); "
                              "node 0 writes checkpoints there and every node its ranks' metrics")
        cfg = cfg.replace(f"run.dir={json.dumps(str(Path(cfg.run.dir).resolve()))}")
    nproc = nproc or cfg.run.nproc
    choice = None
    if cfg.strategy.name == "auto":  # the planner's fastest synchronous plan here (planner/commands.py)
        from paratrain.planner.commands import resolve_auto

        cfg, choice = resolve_auto(cfg, nproc * nodes.count)
        print(f"paratrain: auto: {choice.plan.describe()} ({cfg.strategy.name}), predicted "
              f"{choice.estimate.step_s * 1e3:.1f} ms a step: {choice.reason}", file=sys.stderr)
    if cfg.strategy.name == "single":
        # In this process, but bad input is still refused before train() writes a run directory.
        # The checkpoint is settled inside train() and checked by the Trainer, not here.
        preflight(cfg, nproc, None)
        return LaunchResult.of(0, train(cfg, resume=resume, discard_newer=discard_newer).run_dir)
    with owned_run(cfg, nproc * nodes.count, resume, discard_newer) as run:
        if choice is not None:  # what was chosen and why, beside the config that runs it
            write_json(run.run_dir / "plan.json",
                       {"chosen": choice.plan.describe(), "sets": choice.plan.config_sets(), "why": choice.reason,
                        "considered": choice.considered, "predicted": choice.estimate.to_dict()})
        for line in advice(run.cfg, nproc * nodes.count):  # once the run is sure to start
            print(f"paratrain: warning: {line}", file=sys.stderr)
        ckpt = run.plan.ckpt_path
        worker = ["-m", "paratrain", "worker", str(run.config_path)] + (["--resume", str(ckpt)] if ckpt else [])
        store, run_id = (nodes.host_store(), uuid.uuid4().hex) if nodes.many else (None, None)
        if nodes.many:  # the other nodes start what this one settled
            publish(store, {"worker": [*worker[:3], str(run.config_path.resolve()),
                                       *(["--resume", str(ckpt.resolve())] if ckpt else [])],
                            "config": str(run.config_path.resolve()), "nproc": nproc, "id": run_id})
        code, run.status = _start(run.cfg, nproc, worker, run.run_dir, nodes, store, run_id)
    return LaunchResult.of(code, run.run_dir)


def _join(nproc: int | None, nodes: Nodes) -> int:
    """Node R > 0: wait for node 0's settled job, then start this node's part of it."""
    from paratrain.config import load_config

    store = nodes.join_store()
    job = await_job(store)
    if nproc is not None and nproc != job["nproc"]:
        raise ConfigError(f"--nproc {nproc}: node 0 runs {job['nproc']} processes; every node runs as many")
    cfg = load_config(job["config"])
    print(f"paratrain: node {nodes.rank}: joining the job of {nodes.host}:{nodes.port}, run directory {cfg.run.dir}",
          file=sys.stderr)
    os.environ[OWNED_ENV] = cfg.run.dir  # node 0 settled and owns it
    try:
        return _start(cfg, job["nproc"], job["worker"], Path(cfg.run.dir), nodes, store, job["id"])[0]
    finally:
        os.environ.pop(OWNED_ENV, None)


def _start(cfg: Config, nproc: int, worker: list[str], run_dir: Path, nodes: Nodes, store,
           run_id: str | None) -> tuple[int, str]:
    """This node's workers: each apart, one torchrun job per replica group, or torch's agent; (exit
    code, how the run ended: finished, failed or interrupted)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    from paratrain.topology import loopback_store

    os.environ.update(LAUNCH_ENV)
    local_env = {k: v for k, v in LOCAL_ENV.items() if k not in os.environ and (not nodes.many or nodes.loopback)}
    os.environ.update(local_env)
    # torch's agent logs each signal it forwards and each worker it stops; paratrain says it in one line.
    for name in list(logging.root.manager.loggerDict):  # torch sets a level on each of its loggers
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.run.threads_per_rank))
    # Failure domains of their own: a torchrun job per replica group (torchft, replica_groups.py), or
    # each worker alone for the strategies that go on without a lost one (apart.py).
    if cfg.fault_tolerance.replica_groups or cfg.strategy.name in SURVIVES_LOSS:
        try:
            if cfg.fault_tolerance.replica_groups:
                from paratrain.replica_groups import run_replica_groups

                code, sig = run_replica_groups(cfg, nproc, worker, run_dir, SHUTDOWN_GRACE_S)
            else:
                code, sig = run_apart(nproc, worker, run_dir, SHUTDOWN_GRACE_S, _rejoins(cfg), cfg.run.max_restarts,
                                      nodes, store, run_id, cfg.run.timeout_s + 5)
        finally:
            for key in local_env:
                os.environ.pop(key, None)
        status = "interrupted" if sig else "finished" if code == 0 else "failed"
        return (_stopped(signal.Signals(sig), run_dir, killed=False) if sig else code), status
    if nodes.many:  # torch's agents meet in node 0's store: c10d rendezvous over machines
        rdzv = [f"--rdzv-endpoint={nodes.host}:{nodes.port}", f"--rdzv-id={run_id}", f"--nnodes={nodes.count}",
                *(["--local-addr=127.0.0.1"] if nodes.loopback else [])]
    else:
        # Not --standalone, whose stores listen on every interface: the rendezvous store is hosted
        # here on 127.0.0.1 (loopback_store), torch's agent joins it as a client (is_host=false), and
        # --local-addr makes the workers' MASTER_ADDR 127.0.0.1, where rank 0's process-group store
        # then listens (Topology.from_env).
        store = loopback_store()
        rdzv = [f"--rdzv-endpoint=127.0.0.1:{store.port}", f"--rdzv-id={uuid.uuid4()}", "--nnodes=1",
                "--local-addr=127.0.0.1"]
    restarts = f"--max-restarts={cfg.run.max_restarts}"  # each continues from the newest checkpoint
    args = get_args_parser().parse_args(["--rdzv-backend=c10d", "--rdzv-conf=is_host=false", *rdzv,
                                         f"--nproc-per-node={nproc}", restarts,
                                         f"--shutdown-timeout={SHUTDOWN_GRACE_S}", *worker])
    try:
        torchrun(args)
    except SignalException as e:  # torch's agent forwarded it to every worker and waited for them
        return _stopped(e.sigval, run_dir, killed=_kill_children()), "interrupted"
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        # A signal sent to the workers themselves: they stopped at a step (128 + N), or the agent
        # ended the last ones with the same signal once the first had exited.
        stopped = [c - 128 if c > 0 else -c for c in codes if (c - 128 if c > 0 else -c) in HANDLED]
        if stopped and len(stopped) == len(codes) and any(c > 128 for c in codes):
            return _stopped(signal.Signals(stopped[0]), run_dir, killed=False), "interrupted"
        tried = f" after {cfg.run.max_restarts} restart(s)" if cfg.run.max_restarts else ""
        where = f" on node {nodes.rank}" if nodes.many else ""
        print(f"paratrain: {len(e.failures)} of {nproc} workers{where} failed{tried}: "
              f"{_failures(e.failures, run_dir)}; see their messages above; run directory {run_dir}",
              file=sys.stderr)
        return next((c for c in (2, NONFINITE_EXIT) if c in codes), 1), "failed"  # bad input; a non-finite step
    finally:
        for key in local_env:
            os.environ.pop(key, None)
    return 0, "finished"


def _failures(failures: dict, run_dir: Path) -> str:
    """torch's record of the failed workers, with the step each was at (its heartbeat, watchdog.py).
    Those a signal ended come first: the others most often exited on their own because of them (a
    survivor's failed collective), sooner or later than the agent's SIGTERM would have come."""
    said, ended = [], []
    for rank, f in sorted(failures.items(), key=lambda item: (item[1].exitcode >= 0, item[0])):
        if f.exitcode == -signal.SIGTERM:  # the agent's: it stops the others once one has failed
            ended.append(str(rank))
            continue
        said.append(watchdog.describe_exit(run_dir, rank, f.pid, f.exitcode))
    if ended:
        said.append(f"rank{'s' if len(ended) > 1 else ''} {', '.join(ended)} stopped by the launcher (SIGTERM)")
    return "; ".join(said)


def _kill_children() -> bool:
    """SIGKILL this process's children still alive (workers after a second Ctrl-C); any killed?"""
    killed = False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # the parent pid
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
    return killed


def _stopped(sig: signal.Signals, run_dir: Path, killed: bool) -> int:
    """One line for a run stopped by a signal; the exit code 128 + its number."""
    found = list_checkpoints(run_dir)
    newest = f"newest checkpoint {found[-1]}" if found else "no checkpoint"
    how = " (workers killed at a second signal)" if killed else ""
    print(f"paratrain: stopped by {sig.name}{how}; {newest}; continue with --resume {run_dir}", file=sys.stderr)
    return 128 + int(sig)
