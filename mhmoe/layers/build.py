"""`build_ffn`: one builder for the whole layer family (dense, SMoE, fine-grained SMoE, MH-MoE).
"""

from __future__ import annotations

from torch import nn

from mhmoe.layers.config import FFNConfig
from mhmoe.layers.ffn import DenseFFN
from mhmoe.layers.moe import MoELayer


def build_ffn(cfg: FFNConfig) -> nn.Module:
    """Build the layer described by `cfg`: a DenseFFN or an MoELayer (SMoE, fine-grained, MH-MoE)."""
    if not isinstance(cfg, FFNConfig):
        raise TypeError(f"build_ffn expects an FFNConfig, got {type(cfg).__name__}")
    if cfg.kind == "dense":
        return DenseFFN(cfg)
    return MoELayer(cfg)
