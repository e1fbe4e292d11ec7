"""`mhmoe train`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mhmoe.distributed.parallel import ParallelConfig, dist_env
from mhmoe.training.loop import train
from mhmoe.training.presets import preset_names
from mhmoe.training.rundir import resolve_config


def _cli(args: argparse.Namespace) -> int:
    parallel = ParallelConfig(dp=args.dp, ep=args.ep)
    cfg = resolve_config(args.preset, args.model, args.set or [], Path(args.out))
    state = train(cfg, args.out, args.data_root, args.cache_dir, progress=not args.no_progress, parallel=parallel)
    if dist_env().rank == 0:
        msg = "finished" if state.finished else "stopped"
        print(f"{msg} at step {state.step}/{cfg.steps} in {state.wall_s:.1f}s; run directory: {args.out}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a language model run; under torchrun: DDP, FSDP2, experts "
                                     "over ranks")
    p.add_argument("--preset", default=None, help=preset_names())
    p.add_argument("--model", default=None,
                   help="dense, smoe, fine-grained, mhmoe-h2, mhmoe-h3 (suffix -shared for a shared expert, "
                        "-sigmoid / -alf for sigmoid scoring / aux-loss-free balancing: docs/ROUTING.md)")
    p.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. optim.lr=1e-3")
    p.add_argument("--data-root", default=None,
                   help="corpora folder (default: $MHMOE_DATA_ROOT, else the embedded sample: smoke and demo)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: $MHMOE_CACHE_DIR or ~/.cache/mhmoe)")
    p.add_argument("--dp", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun, the dense parameters: replicated (ddp, default) or sharded over all "
                        "processes (fsdp; checkpoints in RUN_DIR/dcp/)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel degree: the experts of every MoE layer split over this many processes "
                        "(divides the number of processes; default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
