"""Causal self-attention with rotary position embeddings (RoPE) and an optional KV cache.

Shape legend: B batch, T time, P cached positions, D model dim, A attention heads, Dh = D / A.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim/2] for rotary position embeddings."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, A, T, Dh] rotated pairwise (x1, x2) by the position angles; cos/sin: [T, Dh/2] (or broadcastable).

    Computed in the tables' dtype and returned in x's: float32 tables upcast x (the float32 numerics, and what a
    16-bit x gets from float32 tables); tables in x's 16-bit dtype (Transformer.rope) rotate it with no upcast
    and no [B, A, T, Dh] float32 copy of q and k.
    """
    x1, x2 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)  # [B, A, T, Dh/2] each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class KVCache:
    """Per-layer key/value tensors for incremental decoding; `pos` = number of cached positions.

    The attention needs only `pos` and `update(layer, k, v)`; another cache (transformers' `Cache`, in mhmoe.hf)
    plugs in through an adapter with the same two members.
    """

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, layer: int) -> None:
        super().__init__()
        self.n_heads, self.layer = n_heads, layer
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]. mask: boolean [B or 1, 1, T, P+T] (True = attend), for padded batches;
        None = causal over the cached and new positions."""
        T = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b t (three a d) -> three b a t d", three=3, a=self.n_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = cache.pos if cache is not None else 0
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, A, P+T, Dh]
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new queries sit at positions past..past+T-1 and see every key up to their own position
            mask = torch.arange(past + T, device=x.device)[None, :] <= (past + torch.arange(T, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(rearrange(y, "b a t d -> b t (a d)"))
