"""`mhmoe consolidate`.
"""

from __future__ import annotations

import argparse

from mhmoe.training.consolidate import consolidate


def _cli(args: argparse.Namespace) -> int:
    print(f"wrote {consolidate(args.run_dir, args.step)}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("consolidate", help="a sharded run's distributed checkpoint (RUN_DIR/dcp/) as a native "
                                           "RUN_DIR/checkpoints/step_N, in one process")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `mhmoe train --dp fsdp` or `--ep N` run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.set_defaults(func=_cli)
