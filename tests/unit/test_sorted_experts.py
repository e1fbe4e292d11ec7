"""The fused sorted-experts autograd function."""

import torch
from helpers import assert_close_scaled


def test_sorted_experts_gives_16bit_combine_weights_a_gradient_of_their_dtype():
    from mhmoe.layers.sorted_experts import sorted_experts

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
    sorted_experts(x, w32, *ws, rows, sizes, N).backward(g)
    sorted_experts(x, w16, *ws, rows, sizes, N).backward(g)
    assert w16.grad.dtype == torch.bfloat16
    assert_close_scaled(w16.grad, w32.grad, 1e-2, "grad w")

