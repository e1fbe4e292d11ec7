"""`mhmoe memory`.
"""

from __future__ import annotations

import argparse

from mhmoe.distributed.memory import comm_volume_per_token, memory_table
from mhmoe.errors import UserError
from mhmoe.training.presets import preset, preset_names


def _cli(args: argparse.Namespace) -> int:
    if args.gpus < 1 or args.nodes < 1:
        raise UserError(f"--gpus / --nodes: must be >= 1, got {args.gpus} / {args.nodes}")
    world = args.gpus * args.nodes
    ep = args.ep or min(args.gpus, preset(args.preset, "smoe").model.moe_ffn.num_experts)
    if ep < 1 or world % ep:
        raise UserError(f"--ep: must divide the number of GPUs ({world}), got {ep}")
    variants = [v.strip() for v in args.models.split(",") if v.strip()]
    models = {v: preset(args.preset, v).model for v in variants}
    layouts = (("1 GPU", 1, 1, "ddp"), (f"DDP x{world}", world, 1, "ddp"), (f"FSDP x{world}", world, 1, "fsdp"),
               (f"FSDP x{world} + EP {ep}", world, ep, "fsdp"))
    print(f"GiB per GPU of fp32 parameters + gradients + AdamW moments (+ FSDP gather buffers), preset {args.preset}:")
    print(memory_table(models, layouts))
    print("\nall-to-all per token per MoE layer and direction (bf16):")
    for v, cfg in models.items():
        ffn = cfg.moe_ffn
        c = comm_volume_per_token(ffn, ep)
        print(f"  {v:<10} h={ffn.heads} top-{ffn.top_k}: {c['rows']:>2} rows x {ffn.head_dim:>4} = "
              f"{c['values']:>5} values = {c['bytes']:>5} B ({c['offrank_bytes']:,.0f} B off-rank at ep={ep}); SMoE top-{ffn.top_k}: "
              f"{ffn.top_k} rows x {ffn.dim} = {ffn.top_k * ffn.dim} values")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="memory per GPU and all-to-all volume of a preset's models over GPU layouts")
    p.add_argument("--preset", default="paper", help=f"{preset_names()} (default paper)")
    p.add_argument("--models", default="smoe,mhmoe-h2,mhmoe-h3", help="comma-separated variants")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: min(gpus, experts))")
    p.set_defaults(func=_cli)
