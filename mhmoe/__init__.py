"""mhmoe: Multi-Head Mixture-of-Experts (arXiv 2411.16205), FLOPs- and parameter-matched with SMoE."""

from mhmoe.errors import ConfigError
from mhmoe.layers.build import build_ffn
from mhmoe.layers.config import FFNConfig, MoEAux
from mhmoe.layers.ffn import DenseFFN, SwiGLU
from mhmoe.layers.moe import MoELayer

__all__ = ["ConfigError", "DenseFFN", "FFNConfig", "MoEAux", "MoELayer", "SwiGLU", "build_ffn"]
__version__ = "0.1.0"
