"""mhmoe: Multi-Head Mixture-of-Experts (arXiv 2411.16205), FLOPs- and parameter-matched with SMoE."""

from mhmoe.configbase import ConfigError
from mhmoe.ffn import DenseFFN, FFNConfig, MoEAux, SwiGLU, build_ffn
from mhmoe.moe import MoELayer

__all__ = ["ConfigError", "DenseFFN", "FFNConfig", "MoEAux", "MoELayer", "SwiGLU", "build_ffn"]
__version__ = "0.1.0"
