"""Fallback check: does each model run its MoE layers on the fused path, and does its training forward compile
whole? Exit 1 if any variant falls back to an unfused dispatch or to eager code (a graph break).

    python benchmarks/gpu_fallback_check.py [--device cuda] [--preset gpu] [--variants dense,smoe,...]
                                            [--expect scatter] [--dispatch auto] [--dtype bfloat16] [--json FILE]

For each variant, built at the preset's sizes on --device:
  1. dispatch: one eager training forward (the preset's autocast, or --dtype's) with a hook on every Experts
     module that records what its dispatch resolves to for the input it gets (`Experts.resolved_dispatch`:
     device, compute dtype, widths). Every MoE layer must resolve to --expect; anything else (grouped_mm, sorted,
     or another) is a fallback;
  2. graph breaks: `torch._dynamo.explain` of the same training forward (inputs and targets, train mode, under
     the autocast): the count of graph breaks must be 0. A dispatch that runs eagerly under torch.compile (the
     sorted path, grouped_mm outside bfloat16) shows up here as a break.
One line per variant: `PASS <variant>: ...` or `FAIL <variant>: ...`, then `fallback check: PASS|FAIL`.
--expect defaults to "scatter", the fused Triton experts that dispatch="auto" takes on CUDA in bf16 (the gpu
preset's autocast) when Triton imports; in float32 auto takes the cuBLAS-backed sorted path (layers/experts.py), so
`--dtype float32` fails the check unless it expects sorted. --dispatch sets FFNConfig.dispatch of the
MoE layers (default: the preset's, "auto"). The dry run of benchmarks/gpu_check.sh uses --device cpu --preset smoke
--dtype bfloat16 --dispatch grouped_mm --expect grouped_mm (the fullgraph path on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

import torch
import torch._dynamo

from mhmoe.errors import ConfigError
from mhmoe.fileio import atomic_write_text
from mhmoe.layers.experts import Experts
from mhmoe.model import Transformer
from mhmoe.training.presets import PAPER_VARIANTS, PRESETS, preset

SEQ_LEN = 128  # tokens per sequence of the checked forward: the dispatch and the graph do not depend on it


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as the CLI's errors
        print(f"gpu_fallback_check.py: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def check_variant(variant: str, args: argparse.Namespace, device: torch.device) -> dict:
    """The dispatch of every MoE layer and the graph breaks of the training forward of one variant."""
    cfg = preset(args.preset, variant)
    if args.dtype:
        cfg = cfg.override("dtype", args.dtype)
    if args.dispatch and cfg.model.moe_ffn.kind == "moe":
        cfg = cfg.override("model.moe_ffn.dispatch", args.dispatch)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device).train()
    resolved: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: resolved.append(mod.resolved_dispatch(inp[0])))
             for m in model.modules() if isinstance(m, Experts)]
    seq = min(SEQ_LEN, cfg.seq_len)
    idx = torch.randint(cfg.model.vocab_size, (2, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    inp, tgt = idx[:, :-1], idx[:, 1:]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext())
    with autocast:
        model(inp, tgt)
    for h in hooks:
        h.remove()
    torch._dynamo.reset()
    with autocast:
        exp = torch._dynamo.explain(model)(inp, tgt)
    reasons = [str(getattr(r, "reason", r)).splitlines()[0][:200] for r in exp.break_reasons]
    fallbacks = sorted({d for d in resolved if d != args.expect})
    ok = not fallbacks and exp.graph_break_count == 0
    if not resolved:
        where = "no MoE layer"
    elif fallbacks:
        where = (f"{len(resolved)} MoE layer(s) on {', '.join(sorted(set(resolved)))} (a fallback; expected "
                 f"{args.expect})")
    else:
        where = f"{len(resolved)} MoE layer(s) on {args.expect}"
    breaks = f"{exp.graph_break_count} graph break(s)" + (f": {reasons[0]}" if reasons else "")
    return {"variant": variant, "ok": ok, "dispatch": resolved, "expected": args.expect, "fallbacks": fallbacks,
            "graph_breaks": exp.graph_break_count, "graphs": exp.graph_count, "break_reasons": reasons,
            "dtype": cfg.dtype, "line": f"{'PASS' if ok else 'FAIL'} {variant}: {where}, {breaks}"}


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--preset", default="gpu", help=f"{', '.join(PRESETS)} (default gpu)")
    p.add_argument("--variants", default=",".join(PAPER_VARIANTS), help="comma-separated (default: Table 1's five)")
    p.add_argument("--expect", default="scatter", help="the dispatch every MoE layer must run (default scatter)")
    p.add_argument("--dispatch", default=None, help="FFNConfig.dispatch of the MoE layers (default: the preset's)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the preset's; bfloat16 = autocast)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the details as JSON to FILE")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device: cuda requested but torch sees no CUDA device; use --device cpu")
    if args.preset not in PRESETS:
        p.error(f"--preset: unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants:
        p.error("--variants: expected comma-separated model variants, e.g. smoe,mhmoe-h3")
    # Every flag judged before the first model is built.
    for flag, judge in (("--variants", lambda: [preset(args.preset, v) for v in variants]),
                        ("--dtype", lambda: args.dtype and preset(args.preset, "smoe").override("dtype", args.dtype)),
                        ("--dispatch", lambda: args.dispatch and preset(args.preset, "smoe").override(
                            "model.moe_ffn.dispatch", args.dispatch))):
        try:
            judge()
        except ConfigError as e:
            p.error(f"{flag}: {str(e).removeprefix('--model: ')}")
    device = torch.device(args.device)
    results = []
    for variant in variants:
        r = check_variant(variant, args, device)
        print(r["line"], flush=True)
        results.append(r)
    ok = all(r["ok"] for r in results)
    print(f"fallback check: {'PASS' if ok else 'FAIL'} (expected dispatch {args.expect}, 0 graph breaks; "
          f"{args.preset} preset on {args.device})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"ok": ok, "expect": args.expect, "preset": args.preset,
                                                 "device": args.device, "variants": results}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
