"""Shared test helpers: the layer variants under test, their construction with large weights, tolerances."""

import torch

from mhmoe import FFNConfig, build_ffn
from mhmoe.complexity import fine_grained

D = 48


VARIANTS = {
    "dense": FFNConfig(kind="dense", dim=D, hidden_dim=40),
    "smoe": FFNConfig(dim=D, hidden_dim=40, num_experts=4, top_k=1),
    "fine-grained": fine_grained(FFNConfig(dim=D, hidden_dim=40, num_experts=4, top_k=1), 2),
    "mhmoe-h2": FFNConfig(dim=D, hidden_dim=16, num_experts=10, top_k=2, heads=2, head_layer=True, merge_layer=True),
    "mhmoe-h3-shared": FFNConfig(dim=D, hidden_dim=16, num_experts=12, top_k=3, heads=3, head_layer=True,
                                 merge_layer=True, shared_hidden_dim=20),
    "mhmoe-h4-renorm-nohead": FFNConfig(dim=D, hidden_dim=8, num_experts=6, top_k=2, heads=4, merge_layer=True,
                                        renormalize=True),
}



def _make(cfg: FFNConfig, dtype=torch.float32):
    layer = build_ffn(cfg)
    with torch.no_grad():  # larger-than-default weights so the outputs and gradients are far from zero
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer.to(dtype)



def assert_close_scaled(a, b, tol, what=""):
    """max |a - b| within tol of the largest |b| (the natural scale of fp32/bf16 rounding in sums)."""
    a, b = a.float(), b.float()
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-6)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x scale {scale:.3g}"



def _grads(layer, x, out, g):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out.backward(g)
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


