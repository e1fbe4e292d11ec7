"""Slow, obviously-correct reference of the layer family, for equivalence tests only.

Loops over tokens, heads and chosen experts with plain matmuls on each expert's own weight slice. It reads the
parameters of a real layer, so the fast path and the reference compute the same function of the same weights.
Under autocast it routes in float32 as the layer does (the rest in autocast's dtype), so it is the reference for
mixed-precision tests too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mhmoe.layers.ffn import DenseFFN
from mhmoe.layers.moe import MoELayer


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def reference_forward(layer: torch.nn.Module, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """y for x: [B, T, D] computed one sub-token and one expert at a time.

    capacity: per-expert slots; an assignment survives when fewer than `capacity` earlier assignments (in
    sub-token order, then k order) went to the same expert. None = dropless.
    """
    if isinstance(layer, DenseFFN):
        f = layer.ffn
        return _swiglu(x, f.w1.weight.t(), f.w3.weight.t(), f.w2.weight.t())
    assert isinstance(layer, MoELayer)
    cfg, ex, dt = layer.cfg, layer.experts, x.dtype
    tokens = x.reshape(-1, cfg.dim)
    head_out = tokens @ layer.head.weight.t() if layer.head is not None else tokens

    # Route every sub-token in float32, as the layer does: autocast off, or its matmul would run in bf16 and
    # near-ties would route differently from the layer.
    subs, routes = [], []
    for t in range(tokens.shape[0]):
        for j in range(cfg.heads):
            sub = head_out[t, j * cfg.head_dim : (j + 1) * cfg.head_dim]
            with torch.autocast(x.device.type, enabled=False):
                probs = (sub.float() @ layer.router.weight.float().t()).softmax(-1)
                w, idx = probs.topk(cfg.top_k)
                if cfg.renormalizes:  # renormalize 'always', or 'auto' at top_k > 1
                    w = w / w.sum()
            subs.append(sub)
            routes.append((w, [int(i) for i in idx]))

    used = [0] * cfg.num_experts
    outs = []
    for sub, (w, idx) in zip(subs, routes):
        acc = torch.zeros_like(sub)
        for k, e in enumerate(idx):
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue
            acc = acc + w[k].to(dt) * _swiglu(sub, ex.w1[e].to(dt), ex.w3[e].to(dt), ex.w2[e].to(dt))
        outs.append(acc)
    y = torch.stack(outs).reshape(tokens.shape[0], cfg.dim)  # sub-tokens of a token are adjacent
    if layer.merge is not None:
        y = y @ layer.merge.weight.t()
    if layer.shared is not None:
        s = layer.shared
        y = y + _swiglu(tokens, s.w1.weight.t(), s.w3.weight.t(), s.w2.weight.t())
    return y.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------
# The authors' MoE layer, from their formulas (yushuiwx/MH-MoE, torchscale's xmoe/tutel_routing.py `topkgating`
# and `gshard_loss`, xmoe/tutel_moe_layer.py): written as their code computes, one sub-token at a time.


def authors_capacity(num_subtokens: int, num_experts: int, top_k: int) -> int:
    """`topkgating`: capacity = top_k * ceil(num_tokens / num_experts), num_tokens the routed (sub-)tokens."""
    return top_k * -(-num_subtokens // num_experts)


def authors_reference_forward(layer: MoELayer, x: torch.Tensor, drop: bool) -> torch.Tensor:
    """y for x [B, T, D] as the authors' layer computes it: x' = x W_head^T + b_head; sub-tokens; softmax gate, its
    top-k probabilities as weights, not renormalised; with `drop`, slots given by choice rank then token
    (locations: cumsum of the k-th choice's one-hot, offset by the earlier choices' totals) and assignments at or
    beyond the capacity left out; concatenate; y = y' W_merge^T + b_merge."""
    cfg, ex = layer.cfg, layer.experts
    tokens = x.reshape(-1, cfg.dim)
    h = tokens @ layer.head.weight.t() + layer.head.bias if layer.head is not None else tokens
    subs = [h[t, j * cfg.head_dim:(j + 1) * cfg.head_dim] for t in range(tokens.shape[0]) for j in range(cfg.heads)]
    gates = torch.stack([(s.float() @ layer.router.weight.float().t()).softmax(-1) for s in subs])  # [S, E]
    top = gates.topk(cfg.top_k, dim=1).indices  # [S, K]
    S, E = gates.shape
    capacity = authors_capacity(S, E, cfg.top_k)
    filled = [0] * E  # slots taken so far: every first choice in token order, then every second choice, ...
    keep = torch.ones(S, cfg.top_k, dtype=torch.bool)
    for k in range(cfg.top_k):
        for n in range(S):
            e = int(top[n, k])
            keep[n, k] = filled[e] < capacity or not drop
            filled[e] += 1
    outs = []
    for n, sub in enumerate(subs):
        acc = torch.zeros_like(sub)
        for k in range(cfg.top_k):
            e = int(top[n, k])
            if keep[n, k]:
                acc = acc + gates[n, e] * _swiglu(sub, ex.w1[e], ex.w3[e], ex.w2[e])
        outs.append(acc)
    y = torch.stack(outs).reshape(tokens.shape[0], cfg.dim)
    if layer.merge is not None:
        y = y @ layer.merge.weight.t() + layer.merge.bias
    return y.reshape(x.shape)


def gshard_loss_reference(gates: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """The authors' `gshard_loss(scores, top_ids)`, line for line: mask = one_hot(top_ids[:, 0]) * E / N,
    me = sum_n gates, ce = sum_n mask, l_aux = sum(me * ce) / N."""
    n, e = gates.shape
    mask = torch.zeros(n, e, dtype=gates.dtype).scatter_(1, top_ids[:, :1], e / n)
    return (gates.sum(0) * mask.sum(0)).sum() / n
