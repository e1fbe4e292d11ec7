"""The `mhmoe` command line: parity, train, eval, reproduce, export, bench, generate, data prepare.

Every user error (bad flag value, config key, data file, checkpoint) ends as one line on stderr and exit code 2;
tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


from mhmoe.errors import MhmoeError, UserError

__all__ = ["UserError", "build_parser", "main"]  # UserError lives in mhmoe.errors; kept importable from here

MALLOC_TUNED = False  # whether main() applied tune_glibc_malloc (benchmarks record it)


def _parity(args: argparse.Namespace) -> int:
    from mhmoe.complexity import SMOE_PRESETS, solve_parity
    from mhmoe.parity_report import format_parity

    if args.preset:
        if args.preset not in SMOE_PRESETS:
            raise UserError(f"--preset: unknown SMoE preset {args.preset!r}; choose from {', '.join(SMOE_PRESETS)}")
        dim, hidden, experts, top_k = SMOE_PRESETS[args.preset]
    else:
        dim, hidden, experts, top_k = 768, 2048, 8, 1
    dim = args.dim if args.dim is not None else dim
    hidden = args.hidden_dim if args.hidden_dim is not None else hidden
    experts = args.num_experts if args.num_experts is not None else experts
    top_k = args.top_k if args.top_k is not None else top_k
    for flag, value in (("--dim", dim), ("--hidden-dim", hidden), ("--num-experts", experts), ("--top-k", top_k),
                        ("--heads", args.heads)):
        if value < 1:
            raise UserError(f"{flag}: must be >= 1, got {value}")
    if top_k > experts:
        raise UserError(f"--top-k: must be <= --num-experts ({experts}), got {top_k}")
    try:
        result = solve_parity(
            dim, hidden, experts, top_k, args.heads, top_k_new=args.top_k_new, hidden_multiple=args.hidden_multiple,
            expert_multiple=args.expert_multiple, count_head_merge=not args.exclude_head_merge_params,
            head_layer=not args.no_head_layer, merge_layer=not args.no_merge_layer,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_parity(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhmoe", description="Multi-Head Mixture-of-Experts (arXiv 2411.16205)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="section 2.3: the FLOPs/parameter-matched MH-MoE for an SMoE")
    p.add_argument("--preset", help="a well-known SMoE (paper, mixtral-8x7b, mixtral-8x22b, olmoe-1b-7b, ...)")
    p.add_argument("--dim", type=int, help="model dimension D (default 768)")
    p.add_argument("--hidden-dim", type=int, help="SMoE expert hidden F (default 2048)")
    p.add_argument("--num-experts", type=int, help="SMoE experts E (default 8)")
    p.add_argument("--top-k", type=int, help="SMoE top-k K (default 1)")
    p.add_argument("--heads", type=int, default=2, help="MH-MoE heads h (default 2)")
    p.add_argument("--top-k-new", type=int, default=None, help="MH-MoE top-k K' (default h*K)")
    p.add_argument("--hidden-multiple", type=int, default=None, help="round F' to this multiple (default: auto)")
    p.add_argument("--expert-multiple", type=int, default=8, help="round E' to this multiple (default 8)")
    p.add_argument("--exclude-head-merge-params", action="store_true",
                   help="do not count the 2*D^2 head/merge parameters in the parameter budget")
    p.add_argument("--no-head-layer", action="store_true", help="MH-MoE without the head projection")
    p.add_argument("--no-merge-layer", action="store_true", help="MH-MoE without the merge projection")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_parity)

    from mhmoe import evaluate, train

    train.add_cli(sub)
    evaluate.add_cli(sub)
    import importlib.util

    for name in ("reproduce", "export", "bench", "generate", "prepare"):  # subcommand modules with add_cli(sub)
        if importlib.util.find_spec(f"mhmoe.{name}") is not None:
            importlib.import_module(f"mhmoe.{name}").add_cli(sub)
    return parser


def tune_glibc_malloc() -> bool:
    """Keep large tensors out of mmap: glibc hands every allocation over 32 MB to mmap and unmaps it on free,
    so each MoE step pays 10^4-10^5 page faults re-mapping its whole-batch temporaries (measured in
    benchmarks/RESULTS.md: MH-MoE h=3 fwd+bwd 1.24x -> 1.13x of SMoE). Same effect as
    MALLOC_MMAP_MAX_=0 MALLOC_TOP_PAD_=1GiB MALLOC_TRIM_THRESHOLD_=2GiB; skipped if MHMOE_NO_MALLOPT=1 or the
    C library is not glibc. Returns whether it was applied."""
    import ctypes
    import os

    if os.environ.get("MHMOE_NO_MALLOPT") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    ok = mallopt(M_MMAP_MAX, 0) and mallopt(M_TOP_PAD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    return bool(ok)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mhmoe` console script."""
    global MALLOC_TUNED
    MALLOC_TUNED = tune_glibc_malloc()
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
    # Run through the package module so `python -m mhmoe.cli` catches the same UserError class as submodules.
    from mhmoe.cli import main as _main

    sys.exit(_main())
