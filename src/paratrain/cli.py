"""`paratrain run | worker | compare | report | plan | calibrate | testbed`: the command line.

Bad input: one line, exit code 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from paratrain.config import ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; we promise one line
        print(f"paratrain: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("paratrain")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="paratrain", description="Distributed training for PyTorch models.")
    p.add_argument("--version", action="version", version=f"paratrain {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp):
        sp.add_argument("config", nargs="?", help="TOML config file (built-in defaults when omitted)")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
        sp.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue from a checkpoint file or a run directory (default: run.dir)")
        sp.add_argument("--discard-newer", action="store_true",
                        help="resuming an older checkpoint of a run: delete its newer ones and continue in place "
                             "(default: fork into a new run directory)")

    run = sub.add_parser("run", help="train on N local processes (torch's elastic launcher)")
    common(run)
    run.add_argument("--nproc", type=int, default=None, help="local worker processes (default: run.nproc)")
    run.add_argument("--nnodes", type=int, default=1, help="machines in the job, each running this command "
                     "(default 1)")
    run.add_argument("--node-rank", type=int, default=0, help="this machine's place, 0..nnodes-1; node 0 checks "
                     "the config, owns the run directory and hosts the job's store")
    run.add_argument("--master", default=None, metavar="HOST:PORT",
                     help="node 0's address and a free port there, the same on every node (with --nnodes >= 2)")
    worker = sub.add_parser("worker", help="one rank; the entry point for torchrun (-m paratrain worker)")
    common(worker)

    plan = sub.add_parser("plan", help="predict every plan's step time and memory; rank them and explain the best")
    plan.add_argument("config", nargs="?", help="TOML config whose model to plan (built-in defaults when omitted)")
    plan.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    plan.add_argument("--transformer", metavar="layers=..,hidden=..,heads=..,vocab=..,seq=..",
                      help="a GPT described by its sizes alone, instead of a config's model")
    plan.add_argument("--global-batch", type=int, default=0, help="samples per step (default: the config's)")
    plan.add_argument("--devices", type=int, default=2, help="how many devices (default 2)")
    plan.add_argument("--device", default="local",
                      help="'local' (this machine, calibrated) or presets: a100-40gb, a100-80gb, h100, h200; "
                           "several, comma-separated, with --sweep-devices")
    plan.add_argument("--per-node", type=int, default=None, help="devices per node of a preset (default 8)")
    plan.add_argument("--link", default="loopback", help="with --device local: the calibrated link between the "
                      "devices (loopback, or testbed-<rate> after 'paratrain calibrate --testbed <rate>')")
    plan.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on presets, fp32 locally")
    plan.add_argument("--runnable", action="store_true", help="only plans paratrain runs (no recomputation)")
    plan.add_argument("--slowdown", type=float, default=1.0, help="one device this many times slower (a straggler)")
    plan.add_argument("--top", type=int, default=5, help="plans to show (default 5)")
    plan.add_argument("--json", action="store_true", help="JSON instead of tables")
    plan.add_argument("--sweep-devices", default="", metavar="8,16,..", help="the best plan at each device count")
    plan.add_argument("--tokens", type=float, default=0.0, help="with --sweep-devices: a token budget, for hours "
                      "and cost")
    plan.add_argument("--price", default="", metavar="h100=3.5,..", help="price per device-hour, for the cost")
    plan.add_argument("--out", default="", metavar="PNG", help="with --sweep-devices: draw it here")
    calib = sub.add_parser("calibrate", help="measure this machine's FLOP/s, memory bandwidth and links for 'plan'")
    calib.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    calib.add_argument("--out", default="", metavar="TOML", help="where to write (default: $PARATRAIN_CALIBRATION "
                       "or ~/.config/paratrain/machine.toml)")
    calib.add_argument("--repeats", type=int, default=9, help="timings per figure, their median kept (default 9; "
                       "fewer: sooner and noisier)")
    calib.add_argument("--if-missing", action="store_true", help="only where no calibration exists yet "
                       "(make demo: the planner's predictions in its table)")
    calib.add_argument("--testbed", default="", metavar="RATE", help="also the link between two testbed hosts at "
                       "this rate, e.g. 100mbit (network namespaces; needs root)")

    comp = sub.add_parser("compare", help="run strategies side by side on the same model, data and seed")
    comp.add_argument("configs", nargs="+", metavar="MATRIX_OR_CONFIGS",
                      help="a matrix file ([[entry]] tables over a base config) or two or more config files")
    comp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a config value in every entry (repeatable)")
    comp.add_argument("--nproc", type=int, default=None, help="processes per entry (default: the matrix's, else 2)")
    comp.add_argument("--out", default="", metavar="DIR", help="the comparison directory, new or empty "
                      "(default runs/compare-<time>)")
    comp.add_argument("--target", type=float, default=None, help="eval loss for the time-to-target column")
    comp.add_argument("--json", action="store_true", help="JSON instead of the table")
    rep = sub.add_parser("report", help="one HTML page of plots from comparison or run directories")
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="comparison directories (paratrain compare) or run "
                     "directories")
    rep.add_argument("--out", default="", metavar="HTML", help="where to write (default DIR/report.html)")

    conf = sub.add_parser("config", help="print the resolved config with every default (TOML), or --describe "
                          "every key")
    conf.add_argument("config", nargs="?", help="TOML config file (built-in defaults when omitted)")
    conf.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one config value (repeatable)")
    conf.add_argument("--describe", action="store_true",
                      help="every key: type, default, allowed values, meaning")

    testbed = sub.add_parser("testbed", help="several hosts on this machine: network namespaces, limited links")
    tb = testbed.add_subparsers(dest="testbed_command", required=True, parser_class=_Parser)
    up = tb.add_parser("up", help="create the hosts and their links (needs root)")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    up.add_argument("--rate", default="100mbit", help="each host's link rate, each way (default 100mbit)")
    tb_run = tb.add_parser("run", help="one torchrun node per host, joined by c10d rendezvous")
    common(tb_run)
    tb_run.add_argument("--nproc-per-host", type=int, default=1, help="worker processes per host (default 1)")
    tb.add_parser("down", help="remove everything 'up' made (idempotent)")
    for sp in tb.choices.values():
        sp.add_argument("--state", type=Path, default=None, metavar="PATH",
                        help="state file that 'run' and 'down' read (default /tmp/paratrain-testbed.json)")
    return p


def _testbed(args) -> int:
    """`paratrain testbed up | down`."""
    from paratrain.testbed import DEFAULT_STATE, Testbed

    state = args.state or DEFAULT_STATE
    if args.testbed_command == "up":
        bed = Testbed(args.hosts, args.rate, state).up()
        print(f"testbed up: {bed.hosts} hosts, {args.rate} each way per host, bridge br0 in {bed.hub}")
        for ns, addr in zip(bed.namespaces, bed.addrs):
            print(f"  {ns}  {bed.dev}  {addr}/24")
        print(f"state: {state}; remove with 'paratrain testbed down'")
    elif state.exists():
        Testbed.load(state).down()
        print("testbed down")
    else:
        print(f"testbed down: nothing to remove ({state} missing)")
    return 0


def _testbed_run(args, cfg, resume) -> int:
    """`paratrain testbed run`: as `paratrain run`, everything is checked once, here, and one run
    directory is settled that every node writes to (the namespaces share this file system)."""
    from paratrain.launcher import owned_run
    from paratrain.testbed import DEFAULT_STATE, Testbed

    bed = Testbed.load(args.state or DEFAULT_STATE)
    if args.nproc_per_host < 1:
        raise ConfigError(f"--nproc-per-host {args.nproc_per_host}: must be an integer >= 1")
    with owned_run(cfg, bed.hosts * args.nproc_per_host, resume, args.discard_newer) as run:
        ckpt = run.plan.ckpt_path
        worker = [str(run.config_path.resolve())] + (["--resume", str(ckpt.resolve())] if ckpt else [])
        code = bed.run_job(worker, args.nproc_per_host, rdzv_id=run.run_dir.name)
        run.status = "finished" if code == 0 else "failed"
    print(f"testbed run: exit code {code}; run directory {run.run_dir}", file=sys.stderr if code else sys.stdout)
    return code


def _lab(args) -> int:
    """`paratrain compare | report` (lab/: each entry a `paratrain run` of its own) and `paratrain
    config` (reference.py): none needs torch."""
    try:
        if args.command == "config":
            from paratrain.reference import config_command

            return config_command(args)
        if args.command == "compare":
            from paratrain.lab.compare import compare_command

            return compare_command(args)
        from paratrain.lab.report import report_command

        return report_command(args)
    except ConfigError as e:
        print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside an entry (an entry's own Ctrl-C is compare.py's): nothing to save
        print(f"paratrain {args.command}: interrupted", file=sys.stderr)
        return 130


def _ended_before(args) -> int | None:
    """A worker restarted after its run ended on purpose (restarts.py): that exit code, else None."""
    from paratrain.restarts import previous_end, worker_run_dir

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError:  # said below, as for any start
        return None
    return previous_end(worker_run_dir(cfg.run.dir, cfg.run.name))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from paratrain.imports import add_user_paths
    from paratrain.restarts import OWNED_ENV, JobFinished

    add_user_paths(getattr(args, "config", None))  # user code imports from here and beside the config
    if args.command == "worker" and (code := _ended_before(args)) is not None:
        return code  # before torch is imported: torch's agent's remaining restarts cost a second each
    if args.command in ("compare", "report", "config"):  # they read and start runs; torch is not imported here
        return _lab(args)
    from paratrain.checkpoint import CheckpointWriteError
    from paratrain.launcher import launch, train
    from paratrain.nonfinite import NONFINITE_EXIT, NonFiniteError
    from paratrain.signals import Stopped
    from paratrain.testbed import TestbedError
    from paratrain.watchdog import PeerLost

    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        if args.command == "testbed" and args.testbed_command != "run":
            return _testbed(args)
        if args.command == "calibrate":
            from paratrain.planner.commands import calibrate_command

            return calibrate_command(args)
        if args.command == "plan":
            from paratrain.planner.commands import plan_command

            return plan_command(args, None if args.transformer else load_config(args.config, args.set))
        cfg = load_config(args.config, args.set)
        resume = args.resume
        if resume == "":  # bare --resume: the configured run directory
            if not cfg.run.dir:
                raise ConfigError("--resume: give a checkpoint or run directory, or set run.dir")
            resume = cfg.run.dir
        if args.command == "run":
            if args.nproc is not None and args.nproc < 1:
                raise ConfigError(f"--nproc {args.nproc}: must be an integer >= 1")
            from paratrain.nodes import Nodes

            nodes = Nodes.parse(args.nnodes, args.node_rank, args.master)
            return launch(cfg, args.nproc, resume, discard_newer=args.discard_newer, nodes=nodes).exit_code
        if args.command == "testbed":
            return _testbed_run(args, cfg, resume)
        train(cfg, resume=resume, discard_newer=args.discard_newer)
        # A worker that finished, every file written and closed, leaves without the interpreter's
        # teardown. In it, C++ destructors sometimes aborted the process after its last line of Python
        # ("terminate called without an active exception": a torchft group's hybrid process about 1
        # exit in 10, a plain zero3 rank now and then), and its agent then restarted a worker that had
        # finished. The API's `train()` in a user's own process is left to that process.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except (ConfigError, TestbedError) as e:
        if is_rank0:  # under torchrun every rank sees the same bad input; say it once
            print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGTERM / Ctrl-C: stopped at a step boundary, checkpoint written (signals.py)
        if is_rank0 and not os.environ.get(OWNED_ENV):  # under `paratrain run` the launcher says it
            print(f"paratrain: {e}", file=sys.stderr)
        return e.exit_code
    except NonFiniteError as e:  # training.on_nonfinite = "stop"
        if str(min(e.ranks, default=0)) == os.environ.get("RANK", "0"):  # said once, by the first bad rank
            print(f"paratrain: error: {e}", file=sys.stderr)
        return NONFINITE_EXIT
    except JobFinished as e:  # restarted into a job that ended before it could rejoin
        print(f"paratrain: {e}", file=sys.stderr, flush=True)
        os._exit(0)  # as a finished worker leaves (above)
    except PeerLost as e:  # a peer died or hung: named in a line above (watchdog.py); this rank's error
        print(f"paratrain: {e}", file=sys.stderr)
        return 1
    except CheckpointWriteError as e:  # disk full: older checkpoints are intact
        print(f"paratrain: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: at once
        if not os.environ.get(OWNED_ENV):
            print("paratrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
