"""`mhmoe inspect`: a run's routing health from its metrics.jsonl (computation in mhmoe.reproduction.routing_report).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mhmoe.errors import UserError
from mhmoe.reproduction.routing_report import (
    COLLAPSE_PERSIST,
    COLLAPSE_SHARE,
    format_inspect,
    inspect_run,
    plot_load_heatmap,
    read_metrics,
)


def _cli(args: argparse.Namespace) -> int:
    info = inspect_run(Path(args.run))
    if args.plot:
        made = plot_load_heatmap(read_metrics(args.run), args.plot, f"{args.run}: tokens per expert / mean")
        if made is None:
            raise UserError(f"--plot: {args.run}'s metrics.jsonl records no tokens_per_expert to plot")
        info["plot"] = str(made)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_inspect(info))
    if args.plot:
        print(f"\nwrote {info['plot']}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="routing health of a run: expert activation, load CV, dead experts, entropy, collapse",
        description="Print a run's routing health from RUN/metrics.jsonl: per MoE layer, at the first, middle and "
                    "last recorded step, the expert activation (fraction of experts that receive a (sub-)token of "
                    "a sequence, averaged over sequences), the load CV (std/mean of tokens per expert), load "
                    "max/mean, dead experts (no token in the last TrainConfig.dead_expert_window steps), router "
                    "entropy as a fraction of ln E, and for MH-MoE the fraction of tokens whose sub-tokens' top-1 "
                    f"experts differ. Collapse: the first step at which one expert receives at least "
                    f"{COLLAPSE_SHARE:.0%} of the (sub-)tokens (load max/mean >= {COLLAPSE_SHARE:g} * E/K) and keeps "
                    f"doing so for {COLLAPSE_PERSIST} recorded steps (or to the end of the run). Metrics a run did "
                    "not record (runs older than them) print as 'not measured'. See docs/ROUTING.md.")
    p.add_argument("run", metavar="RUN", help="a `mhmoe train` run directory (its --out)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="also write a heatmap of the load per expert over training, one panel per MoE layer (PNG)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cli)
