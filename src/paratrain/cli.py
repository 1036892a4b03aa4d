"""`paratrain run | worker`: the command line. Bad input: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

from paratrain.config import ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; we promise one line
        print(f"paratrain: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="paratrain", description="Distributed training for PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp):
        sp.add_argument("config", nargs="?", help="TOML config file (built-in defaults when omitted)")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
        sp.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue from a checkpoint file or a run directory (default: run.dir)")

    run = sub.add_parser("run", help="train on N local processes (torch's elastic launcher)")
    common(run)
    run.add_argument("--nproc", type=int, default=None, help="local worker processes (default: run.nproc)")
    worker = sub.add_parser("worker", help="one rank; the entry point for torchrun (-m paratrain worker)")
    common(worker)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from paratrain.launch import launch, train

    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cfg = load_config(args.config, args.set)
        resume = args.resume
        if resume == "":  # bare --resume: the configured run directory
            if not cfg.run.dir:
                raise ConfigError("--resume: give a checkpoint or run directory, or set run.dir")
            resume = cfg.run.dir
        if args.command == "run":
            if args.nproc is not None and args.nproc < 1:
                raise ConfigError(f"--nproc {args.nproc}: must be an integer >= 1")
            return launch(cfg, args.nproc, resume)
        train(cfg, resume=resume)
        return 0
    except ConfigError as e:
        if is_rank0:  # under torchrun every rank sees the same bad input; say it once
            print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paratrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
