"""Before anything is timed: an implementation computes the reference's outputs and gradients."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """allclose scaled by the reference's magnitude (bf16 sums in a different order per implementation), with an
    absolute floor for gradients that are zero in exact arithmetic (a renormalised top-1 weight is p/p = 1)."""
    tol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (3e-2, 1e-4)
    scale = ref.float().abs().max()
    err = (got.float() - ref.float()).abs().max()
    if not err <= tol * scale + atol:
        raise AssertionError(f"{name}: max abs diff {err.item():.3e} > {tol} * max|ref| ({scale.item():.3e}) + {atol}")


def _grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor, fn: Callable) -> tuple[torch.Tensor, dict]:
    module.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    y = fn(xg)[0]
    y.backward(g)
    out = {"x": xg.grad.detach().clone()}
    out.update({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})
    module.zero_grad(set_to_none=True)
    return y.detach(), out


def check_against(name: str, impl_fn: Callable, impl_module: nn.Module, ref_fn: Callable, ref_module: nn.Module,
                  x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, grad_map: Callable[[dict], dict],
                  ignore: tuple[str, ...] = ()) -> None:
    """Outputs and gradients of impl equal ref's; grad_map turns impl's gradients into ref's names/layout.
    ignore: gradients that are zero in exact arithmetic, so both sides hold only rounding noise."""
    y_ref, g_ref = _grads(ref_module, x, g, ref_fn)
    y, gr = _grads(impl_module, x, g, impl_fn)
    _close(f"{name} output", y, y_ref, dtype)
    gr = grad_map(gr)
    for n in ignore:
        g_ref.pop(n, None)
        gr.pop(n, None)
    if set(gr) != set(g_ref):
        raise AssertionError(f"{name}: gradients for {sorted(gr)} vs {sorted(g_ref)}")
    for n in g_ref:
        _close(f"{name} grad {n}", gr[n], g_ref[n], dtype)
