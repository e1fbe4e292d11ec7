"""The packed ternary format of a BitNet b1.58 model ("mhmoe-ternary"), its writer's tensors and its reader.

File format "mhmoe-ternary", format_version 1 (safetensors; metadata values are strings):
    for each ternary weight with parameter name P (blocks.0.attn.qkv.weight, blocks.1.ffn.experts.w1, ...):
      P.packed   uint8 [ceil(n / 4)], n = numel: the levels in {-1, 0, 1}, row-major in P's shape, 2 bits each:
                 code = level + 1 (0, 1, 2; code 3 is invalid); element i sits in bits 2*(i%4)..2*(i%4)+1 of byte
                 i // 4, the first element in the low bits; the last byte is padded with code 1 (level 0)
      P.scale    float32 [G], gamma = mean|W| of the trained weight: G = 1 per matrix, 3 for the fused qkv
                 (q, k, v row blocks), E for stacked expert weights (one per expert)
    every other tensor of the model's state dict, float32, under its own name: embeddings, RMSNorm gains (block
    norms and BitNet sub-norms), routers, an untied LM head (a tied one is stored once, as embed.weight)
    metadata: format, format_version, shapes (JSON {P: shape}), step, source_run, packing (the layout above)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from mhmoe.bitnet.integer import integerize, ternary_weights
from mhmoe.errors import CheckpointError
from mhmoe.model import ModelConfig, Transformer

FORMAT = "mhmoe-ternary"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.ternary.safetensors"
PACKING = ("2-bit codes level+1 in {0,1,2}, 4 per byte, element i at bits 2*(i%4) of byte i//4 (low bits first), "
           "row-major, last byte padded with code 1 (level 0)")


# ----------------------------------------------------------------------------------------------------------
# 2-bit packing


def pack_ternary(levels: torch.Tensor) -> torch.Tensor:
    """Levels in {-1, 0, 1} (any shape, any integer or integral float dtype) -> uint8 [ceil(numel / 4)]."""
    flat = levels.detach().reshape(-1).cpu()
    if flat.numel() and (flat.abs().max() > 1 or (flat.is_floating_point() and not torch.equal(flat, flat.round()))):
        raise ValueError("pack_ternary: levels must be in {-1, 0, 1}")
    codes = (flat.to(torch.int16) + 1).to(torch.uint8)
    codes = torch.cat([codes, codes.new_ones(-codes.numel() % 4)]).view(-1, 4)  # pad with level 0
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of pack_ternary: uint8 [ceil(n / 4)] -> int8 levels of `shape`; ValueError on a bad size or code 3."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 3) // 4:
        raise ValueError(f"unpack_ternary: expected uint8 [{(n + 3) // 4}] for shape {list(shape)}, got "
                         f"{packed.dtype} {list(packed.shape)}")
    codes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[:n]
    if (codes == 3).any():
        raise ValueError("unpack_ternary: invalid 2-bit code 3 (not a ternary level); the file is corrupted")
    return (codes.to(torch.int8) - 1).reshape(tuple(shape))


# ----------------------------------------------------------------------------------------------------------
# Model <-> tensors


def ternary_state(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file format above, for a converted (model.cfg.bitnet) fake-quant model."""
    weights = ternary_weights(model)
    if not weights:
        raise ValueError("ternary_state: the model has no BitNet modules (ModelConfig.bitnet is false)")
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, (levels, scale) in weights.items():
        tensors[f"{name}.packed"] = pack_ternary(levels)
        tensors[f"{name}.scale"] = scale.detach().float().cpu().contiguous()
        shapes[name] = list(levels.shape)
    for name, t in model.state_dict().items():
        if name in weights or (name == "lm_head.weight" and model.cfg.tie_embeddings):
            continue
        tensors[name] = t.detach().float().cpu().contiguous()
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "shapes": json.dumps(shapes), "packing": PACKING}
    return tensors, meta


def integer_model(model_cfg: ModelConfig, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Transformer:
    """The integer inference model (CPU, eval mode) of ternary_state's output; CheckpointError if it does not fit."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"not an {FORMAT} file (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{FORMAT} format_version {meta.get('format_version')!r} is not supported by this "
                              f"mhmoe (reads version {FORMAT_VERSION}); re-export the run with this version")
    if not model_cfg.bitnet:
        raise CheckpointError("config.json: model.bitnet is false; a ternary export needs the BitNet config")
    shapes = json.loads(meta["shapes"])
    try:
        weights = {n: (unpack_ternary(tensors[f"{n}.packed"], s), tensors[f"{n}.scale"]) for n, s in shapes.items()}
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"ternary weights unreadable ({e})") from None
    with torch.random.fork_rng(devices=[]):  # the throw-away initialisation must not move the caller's RNG
        model = Transformer(model_cfg)
    try:
        integerize(model, weights)
    except KeyError as e:
        raise CheckpointError(f"the export does not fit config.json ({e.args[0]})") from None
    packed = {f"{n}.{suffix}" for n in shapes for suffix in ("packed", "scale")}
    fp = {k: v for k, v in tensors.items() if k not in packed}
    if model_cfg.tie_embeddings and "embed.weight" in fp:
        fp["lm_head.weight"] = fp["embed.weight"]
    missing, unexpected = model.load_state_dict(fp, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"the export does not fit config.json (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    return model.eval()


def read_ternary(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path}: cannot be read ({e}); export the run again") from None
    return tensors, meta


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is an OUT directory of `mhmoe export`."""
    return (Path(path) / WEIGHTS_FILE).is_file()
