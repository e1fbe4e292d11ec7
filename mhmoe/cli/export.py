"""`mhmoe export`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mhmoe.bitnet.ternary import FORMAT, FORMAT_VERSION
from mhmoe.errors import UserError
from mhmoe.export import export_run


def _cli(args: argparse.Namespace) -> int:
    if args.format == "hf":
        try:
            from mhmoe.hf import describe_hf_export, export_hf  # needs the optional transformers extra
        except ImportError as e:
            raise UserError(f"--format hf: needs transformers ({e}); pip install '.[hf]'") from None
        report = export_hf(args.run_dir, args.out, args.step)
        print(json.dumps(report, indent=2) if args.json else describe_hf_export(report))
        return 0
    report = export_run(Path(args.run_dir), Path(args.out), args.step)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    b = report["bytes"]
    print(f"exported step {report['step']} of {args.run_dir} to {args.out} ({FORMAT} v{FORMAT_VERSION})")
    print(f"  {report['ternary_params']:,} ternary weights at 2 bits + {report['full_precision_params']:,} "
          "full-precision values (embeddings, norms, routers) at 32 bits")
    print(f"  {'file':<30}{'bytes':>14}{'x packed':>10}")
    for label, key in (("packed ternary (this export)", "packed"), ("bf16 checkpoint", "bf16"),
                       ("fp32 checkpoint", "fp32")):
        print(f"  {label:<30}{b[key]:>14,}{b[key] / b['packed']:>10.2f}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run: packed ternary BitNet weights, or a Hugging Face model dir")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `mhmoe train` run (model.bitnet=true for ternary)")
    p.add_argument("out", metavar="OUT", help="output folder (ternary: then `mhmoe eval OUT`)")
    p.add_argument("--format", default="ternary", choices=["ternary", "hf"],
                   help="ternary: 2-bit packed weights + fp32 scales and full-precision tensors (default); "
                        "hf: save_pretrained directory for transformers' AutoModelForCausalLM (with the tokenizer)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest good one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cli)
