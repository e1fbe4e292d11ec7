"""The fused sorted-experts autograd function: named modes, 16-bit combine weights, first-order only."""

import pytest
import torch
from helpers import assert_close_scaled

from mhmoe.layers.sorted_experts import (
    DoubleBackwardError,
    SortedExpertsFn,
    sorted_experts_combine,
    sorted_experts_rows,
)


def test_sorted_experts_gives_16bit_combine_weights_a_gradient_of_their_dtype():
    N, K, E, Din, Fh = 20, 2, 5, 8, 12
    x = torch.randn(N, Din, dtype=torch.bfloat16)
    flat = torch.randint(E, (N * K,))
    order = torch.argsort(flat, stable=True)
    sizes, rows = torch.bincount(flat, minlength=E).tolist(), order // K
    ws = [torch.randn(E, Din, Fh, dtype=torch.bfloat16), torch.randn(E, Din, Fh, dtype=torch.bfloat16),
          torch.randn(E, Fh, Din, dtype=torch.bfloat16)]
    w32 = torch.rand(N * K, requires_grad=True)
    w16 = w32.detach().bfloat16().requires_grad_()
    g = torch.randn(N, Din, dtype=torch.bfloat16)
    sorted_experts_combine(x, w32, *ws, rows, sizes).backward(g)
    sorted_experts_combine(x, w16, *ws, rows, sizes).backward(g)
    assert w16.grad.dtype == torch.bfloat16
    assert_close_scaled(w16.grad, w32.grad, 1e-2, "grad w")



def _problem(N=12, K=2, E=4, Din=8, Fh=6):
    x = torch.randn(N, Din, requires_grad=True)
    flat = torch.randint(E, (N * K,))
    order = torch.argsort(flat, stable=True)
    sizes, rows = torch.bincount(flat, minlength=E).tolist(), order // K
    ws = [torch.randn(E, Din, Fh, requires_grad=True), torch.randn(E, Din, Fh, requires_grad=True),
          torch.randn(E, Fh, Din, requires_grad=True)]
    w = torch.rand(N * K, requires_grad=True)
    return x, w, ws, rows, sizes


def test_modes_are_named_and_checked():
    x, w, ws, rows, sizes = _problem()
    dt = torch.float32
    with pytest.raises(ValueError, match="mode must be one of"):
        SortedExpertsFn.apply("scatter", x, w, *ws, rows, sizes, x.shape[0], False, dt, 1)
    with pytest.raises(ValueError, match="mode='rows' takes w and rows as None"):
        SortedExpertsFn.apply("rows", x, w, *ws, rows, sizes, x.shape[0], False, dt, 1)
    with pytest.raises(ValueError, match="mode='combine' takes w and rows both"):
        SortedExpertsFn.apply("combine", x, None, *ws, None, sizes, x.shape[0], False, dt, 1)
    xs = x.detach()[rows]  # the rows mode on gathered rows = the combine mode before weighting and summing
    ys = sorted_experts_rows(xs, *ws, sizes)
    y_ref = torch.zeros_like(x).index_add(0, rows, ys * w.unsqueeze(1))
    torch.testing.assert_close(sorted_experts_combine(x, w, *ws, rows, sizes), y_ref)


@pytest.mark.parametrize("mode", ["combine", "rows"])
@pytest.mark.parametrize("loss", ["sum", "square"])  # constant dY, and dY that itself requires grad
def test_double_backward_raises_a_clear_error(mode, loss):
    x, w, ws, rows, sizes = _problem()
    if mode == "combine":
        y = sorted_experts_combine(x, w, *ws, rows, sizes)
    else:  # x is [S', Din] rows in this mode: one group per expert over its rows
        y = sorted_experts_rows(x, *ws, [5, 0, 4, x.shape[0] - 9])
    out = y.sum() if loss == "sum" else y.square().sum()
    with pytest.raises(DoubleBackwardError, match="create_graph=True .* not supported; use dispatch='grouped_mm'"):
        torch.autograd.grad(out, [x, *ws], create_graph=True)
    # First-order gradients still work (the same graph, retained by nothing: build it again).
    y = sorted_experts_combine(x, w, *ws, rows, sizes)
    y.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in ws)
