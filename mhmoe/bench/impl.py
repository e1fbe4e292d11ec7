"""One timed callable (an implementation of a layer, or the GEMM reference), how a mode runs it, and its peak
memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mhmoe.ffn import MoEAux


@dataclass
class Impl:
    """One timed callable: `fn(x)` returns (y, aux or None) for a [1, T, D] input."""

    variant: str
    impl: str  # sorted | grouped_mm | naive | dense | <hf implementation> | gemm
    flops_fwd: int  # forward matmul FLOPs of one call
    module: nn.Module
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, MoEAux | None]]


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


def peak_memory_mb(module: nn.Module, run: Callable[[], object]) -> float:
    """Peak live tensor memory (MiB, parameters included) while `run()` executes, via torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module)
    with tracker:
        run()
    peak = tracker.get_tracker_snapshot("peak")
    return max((snap["Total"] for snap in peak.values()), default=0) / 2**20
