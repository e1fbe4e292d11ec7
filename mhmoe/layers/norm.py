"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) * g, computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.profiling import NORM, label


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with label(NORM):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
