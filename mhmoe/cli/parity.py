"""`mhmoe parity`: the FLOPs/parameter-matched MH-MoE of an SMoE (section 2.3)."""

from __future__ import annotations

import argparse
import json

from mhmoe.complexity import SMOE_PRESETS, solve_parity
from mhmoe.errors import UserError
from mhmoe.reproduction.parity_report import format_parity


def _parity(args: argparse.Namespace) -> int:
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


def add_cli(sub: argparse._SubParsersAction) -> None:
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
