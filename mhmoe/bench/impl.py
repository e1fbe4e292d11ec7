"""One timed callable (an implementation of a layer, or the GEMM reference) and how a mode runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mhmoe.layers.config import MoEAux


@dataclass
class Impl:
    """One timed callable: `fn(x)` returns (y, aux or None) for a [1, T, D] input."""

    variant: str
    impl: str  # sorted | grouped_mm | scatter | naive | dense | <hf implementation> | gemm
    flops_fwd: int  # forward matmul FLOPs of one call
    module: nn.Module
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, MoEAux | None]]
    auto: bool = False  # what dispatch="auto" runs on this device and dtype (`--impls auto`)


def _fwd(impl: Impl, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return impl.fn(x)[0]


def _fwd_bwd(impl: Impl, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    impl.module.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_(True)
    y = impl.fn(xg)[0]
    y.backward(g)
    return y


def _run(impl: Impl, mode: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _fwd(impl, x) if mode == "fwd" else _fwd_bwd(impl, x, g)

