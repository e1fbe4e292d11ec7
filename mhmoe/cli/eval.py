"""`mhmoe eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mhmoe.errors import UserError
from mhmoe.training.evaluate import evaluate_run


def _cli(args: argparse.Namespace) -> int:
    if not Path(args.run_dir).is_dir():
        raise UserError(f"RUN_DIR: {args.run_dir} is not a directory; pass the --out of a `mhmoe train` run")
    if args.max_tokens is not None and args.max_tokens < 0:
        raise UserError(f"--max-tokens: must be >= 0 (0 = whole domain), got {args.max_tokens}")
    res = evaluate_run(Path(args.run_dir), args.step, args.domains.split(",") if args.domains else None,
                       args.max_tokens, args.data_root, args.cache_dir, args.text)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    width = max(14, *(len(name) + 2 for name in res["domains"]))  # "text:<file name>" can be long
    print(f"{res['run']}  variant={res['variant']}  step={res['step']}  tokens seen={res['tokens_seen']:,}")
    print(f"  {'domain':<{width}}{'ppl':>10}{'loss':>10}{'tokens':>12}{'docs':>8}")
    for name, r in res["domains"].items():
        print(f"  {name:<{width}}{r['ppl']:>10.3f}{r['loss']:>10.4f}{r['tokens']:>12,}{r['docs']:>8,}")
    sys.stdout.flush()
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation perplexity of a run on RedPajama, Wikipedia and C4, or on your text")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `mhmoe train` run or a `mhmoe export` folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest good one)")
    p.add_argument("--domains", default=None,
                   help="comma-separated eval domains (default: the run's; none when --text is given)")
    p.add_argument("--text", default=None, metavar="PATH",
                   help="also (or, without --domains, only) evaluate your own text: a .txt, .jsonl (\"text\" "
                        "field), .txt.gz or .jsonl.gz file, or a folder of them (recursive, sorted)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per domain (default: the run's cap; all of --text)")
    p.add_argument("--data-root", default=None, help="corpora folder (default: $MHMOE_DATA_ROOT)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: $MHMOE_CACHE_DIR or ~/.cache/mhmoe)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cli)
