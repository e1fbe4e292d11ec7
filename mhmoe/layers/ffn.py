"""The dense SwiGLU FFN, eq. (5) in SwiGLU form: (silu(x W1) * (x W3)) W2, and its layer-family wrapper.

Shape legend: D model dim, F hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.layers.config import FFNConfig, MoEAux
from mhmoe.profiling import DENSE_FFN, label


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN without biases: (silu(x W1) * (x W3)) W2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DenseFFN(nn.Module):
    """kind="dense": a SwiGLU FFN with the layer family's (y, aux) interface."""

    def __init__(self, cfg: FFNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ffn = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:  # [B, T, D]
        with label(DENSE_FFN):
            return self.ffn(x), MoEAux.zeros(x.device)
