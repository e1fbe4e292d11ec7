"""Top-k softmax router with load-balancing and z-losses, computed in float32.

G(x) of eq. (1)/(3): softmax over E experts, then the top-k probabilities are the combine weights, renormalised
to sum to 1 when `renormalize` is set (FFNConfig.renormalize resolves it per top_k). MH-MoE routes every sub-token
with this one router.

Shape legend: N (sub-)tokens, Din router input width (D/h), E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """The router's decision for N (sub-)tokens."""

    indices: torch.Tensor  # [N, K] long, chosen experts (descending probability)
    weights: torch.Tensor  # [N, K] float32, combine weights
    probs: torch.Tensor  # [N, E] float32, full softmax
    logits: torch.Tensor  # [N, E] float32


class TopKRouter(nn.Module):
    """Linear gate Din -> E, softmax, top-k; the matmul runs in float32 whatever the activation dtype."""

    def __init__(self, in_dim: int, num_experts: int, top_k: int, renormalize: bool = False, jitter: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize, self.jitter = num_experts, top_k, renormalize, jitter
        self.weight = nn.Parameter(torch.empty(num_experts, in_dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> Routing:  # x: [N, Din]
        # autocast would otherwise run this matmul in bf16 and make near-ties route differently per dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            if self.training and self.jitter > 0:
                x32 = x32 * torch.empty_like(x32).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = x32 @ self.weight.float().t()  # [N, E]
            probs = logits.softmax(dim=-1)  # [N, E]
            weights, indices = probs.topk(self.top_k, dim=-1)  # [N, K]
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(indices=indices, weights=weights, probs=probs, logits=logits)


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how many of the assignments `indices` (any shape) go to each expert. A scatter into [E], not
    torch.bincount, which sizes its output from max(indices) and so syncs with the host on CUDA."""
    flat = indices.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e, f_e counting all K choices; 1.0 when uniform.

    f_e (fraction of the N*K assignments sent to e) carries no gradient; P_e (mean router probability) does.
    0 for an empty batch (no tokens), where the means would be NaN.
    """
    if indices.numel() == 0:
        return probs.sum()  # 0, still attached to the graph
    counts = expert_counts(indices, num_experts).to(probs.dtype)  # [E]
    f = counts / indices.numel()
    p = probs.mean(dim=0)  # [E]
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(logits)^2, keeps logits small; 0 for an empty batch."""
    if logits.numel() == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of the router distribution; log(E) when uniform; 0 for an empty batch."""
    if logits.numel() == 0:
        return logits.sum()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()
