"""Packed ternary export of a BitNet b1.58 run and its integer CPU inference model (`mhmoe export`).

    mhmoe export RUN_DIR --format ternary OUT [--step N] [--json]

OUT/ holds
    model.ternary.safetensors   packed ternary weights, their scales and the full-precision tensors (format below)
    config.json                 the run's TrainConfig (model.bitnet = true)
    tokenizer/                  the run's tokenizer
    export.json                 source run, step, format version and the sizes (packed vs fp32 / bf16 checkpoint)
`mhmoe eval OUT` (and every caller of `mhmoe.training.rundir.load_run`, so `generate` too) detects such a
directory and runs the integer model: the weights are unpacked once to int8, activations are quantised per token
to int8, every projection is an int8 x int8 -> int32 matmul (`mhmoe.bitnet.quant.int8_matmul`), MoE tokens are grouped
per expert as in training. Its logits equal those of the fake-quant training model (same roundings, exact
integer sums), so the perplexities agree.
The file format and its reader live in `mhmoe.bitnet.ternary`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from mhmoe.bitnet.ternary import FORMAT, FORMAT_VERSION, WEIGHTS_FILE, is_export_dir, ternary_state
from mhmoe.errors import UserError
from mhmoe.fileio import atomic_write_bytes, atomic_write_text
from mhmoe.model import Transformer
from mhmoe.training.rundir import load_checkpoint_model, load_config

# ----------------------------------------------------------------------------------------------------------
# Export of a run


def _bf16_size(model: Transformer) -> int:
    """Bytes of the model's checkpoint saved as bf16 safetensors (tied LM head once), computed in memory."""
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    return len(save(sd))


def export_run(run_dir: Path, out_dir: Path, step: int | None = None) -> dict[str, Any]:
    """Write OUT (see the module docstring) from the run's checkpoint at `step` (default: newest good one)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR: {run_dir} is not a directory; pass the --out of a `mhmoe train` run")
    if out_dir.resolve() == run_dir.resolve():
        raise UserError("OUT: must differ from RUN_DIR")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_export_dir(out_dir))):
        raise UserError(f"OUT: {out_dir} exists and is not an earlier export; choose a new folder")
    cfg = load_config(run_dir)
    if not cfg.model.bitnet:
        raise UserError(f"RUN_DIR: {run_dir} is not a BitNet run (model.bitnet is false); only ternary models "
                        "can be packed: train one with --set model.bitnet=true")
    step, ckpt, model = load_checkpoint_model(run_dir, step)
    tensors, meta = ternary_state(model)
    meta.update(step=str(step), source_run=str(run_dir.resolve()))

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / WEIGHTS_FILE, save(tensors, metadata=meta))
    atomic_write_text(out_dir / "config.json", cfg.to_json())
    shutil.copytree(run_dir / "tokenizer", out_dir / "tokenizer", dirs_exist_ok=True)

    shapes = json.loads(meta["shapes"])
    n_ternary = sum(math.prod(s) for s in shapes.values())
    n_fp = sum(t.numel() for k, t in tensors.items() if k[: k.rfind(".")] not in shapes)
    sizes = {"packed": (out_dir / WEIGHTS_FILE).stat().st_size, "bf16": _bf16_size(model),
             "fp32": (ckpt / "model.safetensors").stat().st_size}
    report = {"format": FORMAT, "format_version": FORMAT_VERSION, "source_run": str(run_dir.resolve()), "step": step,
              "out": str(out_dir), "ternary_params": n_ternary, "full_precision_params": n_fp, "bytes": sizes}
    atomic_write_text(out_dir / "export.json", json.dumps(report, indent=2) + "\n")
    return report
