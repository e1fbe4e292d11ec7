"""The layers under test: the paper's five FFNs around an SMoE, and the common per-expert loop as a baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mhmoe.complexity import fine_grained, solve_parity
from mhmoe.layers.config import FFNConfig, MoEAux
from mhmoe.layers.moe import MoELayer, moe_aux

PAPER_LAYERS = ("dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3")


def layer_variants(dim: int = 768, hidden_dim: int = 2048, num_experts: int = 8) -> dict[str, FFNConfig]:
    """The paper's five layers around an SMoE (dim, hidden_dim, num_experts, top-1); MH-MoE sizes by the calculator."""
    smoe = FFNConfig(kind="moe", dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=1)
    return {
        "dense": FFNConfig(kind="dense", dim=dim, hidden_dim=hidden_dim),
        "smoe": smoe,
        "fine-grained": fine_grained(smoe, 2),
        "mhmoe-h2": solve_parity(dim, hidden_dim, num_experts, 1, heads=2).mhmoe,
        "mhmoe-h3": solve_parity(dim, hidden_dim, num_experts, 1, heads=3).mhmoe,
    }


def naive_forward(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    """The same function as `layer(x)`, computed with the common per-expert loop.

    For each expert: a boolean mask over the [N, K] routing choices, `nonzero` for its (sub-)tokens, a gather,
    the SwiGLU with the stacked weights indexed as W[e] inside the loop, and an index_add_ of the weighted result.
    Indexing W[e] makes autograd build a full-size [E, ...] zero gradient per expert: the cost we avoid.
    """
    cfg, ex = layer.cfg, layer.experts
    shape = x.shape
    tokens = x.reshape(-1, cfg.dim)  # [T, D]
    h = layer.head(tokens) if layer.head is not None else tokens
    sub = h.reshape(-1, cfg.head_dim)  # [N, D/H], the sub-tokens of a token adjacent, as the layer splits
    routing = layer.router(sub)
    out = torch.zeros_like(sub)
    for e in range(cfg.num_experts):
        tok, slot = (routing.indices == e).nonzero(as_tuple=True)  # assignments to expert e
        if tok.numel() == 0:
            continue
        xe = sub[tok]
        ye = (F.silu(xe @ ex.w1[e]) * (xe @ ex.w3[e])) @ ex.w2[e]
        out.index_add_(0, tok, ye * routing.weights[tok, slot].unsqueeze(-1).to(ye.dtype))
    y = out.reshape(-1, cfg.dim)
    if layer.merge is not None:
        y = layer.merge(y)
    if layer.shared is not None:
        y = y + layer.shared(tokens)
    counts = torch.bincount(routing.indices.reshape(-1), minlength=cfg.num_experts)
    sequences = shape[0] if x.dim() == 3 else 1
    aux = moe_aux(cfg, routing, counts, torch.zeros((), device=x.device), sequences)
    return y.reshape(shape), aux
