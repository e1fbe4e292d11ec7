"""`mhmoe data prepare`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mhmoe.data.corpora import CORPORA, source_files
from mhmoe.data.prepare import prepare_corpus, prepare_gpt2_tokenizer, preset_needs
from mhmoe.errors import UserError
from mhmoe.training.presets import preset_names
from mhmoe.training.rundir import resolve_config


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


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools: `mhmoe data prepare --preset P --data-root DIR`")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="fetch the corpora a preset needs from the hub into a data root")
    q.add_argument("--preset", required=True, help=preset_names())
    q.add_argument("--data-root", default=os.environ.get("MHMOE_DATA_ROOT"),
                   help="the folder to fill (default: $MHMOE_DATA_ROOT)")
    q.add_argument("--max-bytes", type=int, default=0, help="cap per corpus in bytes of text (default: the preset's)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (as in train)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=_cli)
