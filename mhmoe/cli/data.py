"""`mhmoe data prepare` and `mhmoe data pack`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mhmoe.data.corpora import CORPORA, source_files
from mhmoe.data.corpora import resolve_data_root
from mhmoe.data.pack import build_pack
from mhmoe.data.prepare import prepare_corpus, prepare_gpt2_tokenizer, preset_needs
from mhmoe.errors import UserError
from mhmoe.training.presets import preset_names
from mhmoe.training.rundir import default_cache_dir, resolve_config


def _cli(args: argparse.Namespace) -> int:
    if not args.data_root:
        raise UserError("--data-root: required; the folder to fill (it becomes your MHMOE_DATA_ROOT)")
    root = Path(args.data_root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-root: {root} exists and is not a folder; choose another path")
    root.mkdir(parents=True, exist_ok=True)
    cfg = resolve_config(args.preset, "smoe", list(args.set or []))
    for name, need in preset_needs(cfg).items():
        if args.max_bytes:
            need = min(need, args.max_bytes)
        if any(files for _, files in source_files(CORPORA[name], root)):
            print(f"{name}: on disk under {root}, left as it is")
            continue
        m = prepare_corpus(name, root, need, progress=not args.no_progress)
        print(f"{name}: {m['records']:,} documents, {m['bytes']:,} bytes, sha256 {m['sha256'][:16]}... "
              f"({'whole source' if m['complete'] else 'budget reached'})")
    if cfg.data.tokenizer == "gpt2":
        print(f"tokenizer: {prepare_gpt2_tokenizer(root)}")
    print(f"ready: pass --data-root {root} (or export MHMOE_DATA_ROOT={root})")
    return 0


def _pack_cli(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.preset, "smoe", list(args.set or []))
    root = resolve_data_root(args.data_root, cfg.preset)
    if args.max_mib <= 0:
        raise UserError(f"--max-mib: must be > 0, got {args.max_mib}")
    # Every token the preset evaluates: the milestone evaluations (max_eval_tokens; 0 = whole domains) and the
    # periodic ones (eval_tokens).
    need = 0 if cfg.data.max_eval_tokens == 0 else max(cfg.data.max_eval_tokens, cfg.eval_tokens)
    m = build_pack(cfg.data, need + cfg.seq_len, root, Path(args.out), default_cache_dir(args.cache_dir),
                   cfg.preset, args.max_mib)
    for name, c in m["corpora"].items():
        print(f"{name}: {c['num_tokens']:,} tokens, {c['num_docs']:,} documents")
    print(f"pack: {args.out} ({m['bytes'] / 2**20:.1f} MiB, tokenizer {m['tokenizer_name']}); train from it with "
          f"--data-root {args.out}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools: `mhmoe data prepare --preset P --data-root DIR`, "
                                    "`mhmoe data pack --preset P --data-root DIR --out PACK`")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="fetch the corpora a preset needs from the hub into a data root")
    q.add_argument("--preset", required=True, help=preset_names())
    q.add_argument("--data-root", default=os.environ.get("MHMOE_DATA_ROOT"),
                   help="the folder to fill (default: $MHMOE_DATA_ROOT)")
    q.add_argument("--max-bytes", type=int, default=0, help="cap per corpus in bytes of text (default: the preset's)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (as in train)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=_cli)
    k = dsub.add_parser("pack", help="a preset's data tokenised into one small folder that travels with the code "
                                     "(train and evaluate with --data-root PACK)")
    k.add_argument("--preset", required=True, help=preset_names())
    k.add_argument("--data-root", default=os.environ.get("MHMOE_DATA_ROOT"),
                   help="the corpora to read (default: $MHMOE_DATA_ROOT)")
    k.add_argument("--out", required=True, help="the pack folder to write")
    k.add_argument("--cache-dir", default=None, help="token cache (default: $MHMOE_CACHE_DIR or ~/.cache/mhmoe)")
    k.add_argument("--max-mib", type=float, default=40.0, help="refuse a pack larger than this (default 40 MiB)")
    k.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (as in train)")
    k.set_defaults(func=_pack_cli)
