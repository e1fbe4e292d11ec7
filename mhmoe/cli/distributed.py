"""`python -m mhmoe.cli.distributed {train,consolidate,memory}`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch.distributed as dist

from mhmoe.distributed.dcp import consolidate
from mhmoe.distributed.memory import comm_volume_per_token, memory_table
from mhmoe.errors import ConfigError, UserError
from mhmoe.training.parallel_loop import train_parallel

# ----------------------------------------------------------------------------------------------------------
# CLI: python -m mhmoe.distributed {train,consolidate,memory}


def _cli_train(args: argparse.Namespace) -> int:
    from mhmoe.training.rundir import resolve_config

    cfg = resolve_config(args.preset, args.model, args.set or [], Path(args.out))
    res = train_parallel(cfg, args.out, args.data_root, args.cache_dir, args.ep, args.dp, not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finished at step {res['step']}/{cfg.steps} in {res['wall_s']:.1f}s; run directory: {args.out}")
    return 0


def _cli_consolidate(args: argparse.Namespace) -> int:
    print(f"wrote {consolidate(args.run_dir, args.step)}")
    return 0


def _cli_memory(args: argparse.Namespace) -> int:
    from mhmoe.training.presets import preset

    world = args.gpus * args.nodes
    ep = args.ep or min(args.gpus, preset(args.preset, "smoe").model.moe_ffn.num_experts)
    layouts = (("1 GPU", 1, 1, "ddp"), (f"DDP x{world}", world, 1, "ddp"), (f"FSDP x{world}", world, 1, "fsdp"),
               (f"FSDP x{world} + EP {ep}", world, ep, "fsdp"))
    print(f"GiB per GPU of fp32 parameters + gradients + AdamW moments (+ FSDP gather buffers), preset {args.preset}:")
    print(memory_table(args.preset, tuple(args.models.split(",")), layouts))
    print("\nall-to-all per token per MoE layer and direction (bf16):")
    for v in args.models.split(","):
        ffn = preset(args.preset, v).model.moe_ffn
        c = comm_volume_per_token(ffn, ep)
        print(f"  {v:<10} h={ffn.heads} top-{ffn.top_k}: {c['rows']:>2} rows x {ffn.head_dim:>4} = {c['values']:>5} values "
              f"= {c['bytes']:>5} B ({c['offrank_bytes']:,.0f} B off-rank at ep={ep}); SMoE top-{ffn.top_k}: "
              f"{ffn.top_k} rows x {ffn.dim} = {ffn.top_k * ffn.dim} values")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mhmoe.distributed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train under torchrun: DDP/FSDP2 x expert parallel, DCP checkpoints")
    t.add_argument("--preset", default=None)
    t.add_argument("--model", default=None)
    t.add_argument("--out", required=True)
    t.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides the number of processes)")
    t.add_argument("--dp", choices=["fsdp", "ddp"], default="fsdp", help="data parallelism of the dense parameters")
    t.add_argument("--set", action="append", metavar="KEY=VALUE")
    t.add_argument("--data-root", default=None)
    t.add_argument("--cache-dir", default=None)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cli_train)
    c = sub.add_parser("consolidate", help="DCP checkpoint -> RUN_DIR/checkpoints/step_N (one process)")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--step", type=int, default=None)
    c.set_defaults(func=_cli_consolidate)
    m = sub.add_parser("memory", help="memory per GPU and all-to-all volume for a preset")
    m.add_argument("--preset", default="paper")
    m.add_argument("--models", default="smoe,mhmoe-h2,mhmoe-h3")
    m.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    m.add_argument("--nodes", type=int, default=1)
    m.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: min(gpus, experts))")
    m.set_defaults(func=_cli_memory)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mhmoe.distributed`; user errors are one line and exit code 2."""
    from mhmoe.errors import CheckpointError, DataError, TrainingError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"mhmoe.distributed {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
