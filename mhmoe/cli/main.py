"""The `mhmoe` command line: parity, train, consolidate, memory, eval, inspect, reproduce, sensitivity, export, bench,
generate, data prepare.

Every user error (bad flag value, config key, data file, checkpoint) ends as one line on stderr and exit code 2;
tracebacks are reserved for bugs. This package is the only place that parses flags and turns errors into exit
codes; the library below it never imports it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mhmoe import runtime
from mhmoe.cli import bench, consolidate, data, export, generate, memory, parity, reproduce, sensitivity, train
from mhmoe.cli import eval as evaluate
from mhmoe.cli import inspect as inspect_run
from mhmoe.errors import MhmoeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhmoe", description="Multi-Head Mixture-of-Experts (arXiv 2411.16205)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (parity, train, consolidate, memory, evaluate, inspect_run, reproduce, sensitivity, export, bench,
                    generate, data):
        command.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mhmoe` console script."""
    runtime.apply()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MhmoeError as e:  # ConfigError, DataError, CheckpointError, TrainingError, UserError
        print(f"mhmoe {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mhmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
