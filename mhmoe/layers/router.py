"""Top-k router with softmax or sigmoid scoring, an optional aux-loss-free selection bias, and the router losses,
computed in float32.

G(x) of eq. (1)/(3): scores over E experts, the top-k scores are the combine weights, renormalised to sum to 1
when `renormalize` is set (FFNConfig.renormalizes resolves it per top_k). MH-MoE routes every sub-token with this
one router. Beyond the paper (FFNConfig.scoring / balancing, docs/ROUTING.md):
    scoring="softmax"   p = softmax(logits)                          (the paper; probs = p)
    scoring="sigmoid"   s = sigmoid(logits), probs = s / sum_e s     (DeepSeek-V3)
    scoring="xmoe"      logits = (x W_red) . g_e / |g_e|, W_red [Din, 16], then softmax   (X-MoE)
    expert_bias b       top-k chosen on s + b, weights gathered from s (aux-loss-free balancing, DeepSeek-V3);
                        b moves after each optimizer step (`update_bias`, mhmoe.layers.balancing)
The routing math lives in `route(logits)`; subclasses (BitNet's BitRouter, IntBitRouter) only compute their
logits differently (`project`).

Shape legend: N (sub-)tokens, Din router input width (D/h), E experts, K top-k, R = 16 X-MoE routing dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """The router's decision for N (sub-)tokens."""

    indices: torch.Tensor  # [N, K] long, chosen experts, by descending selection score (score + bias, if any)
    weights: torch.Tensor  # [N, K] float32, combine weights (from the unbiased scores)
    probs: torch.Tensor  # [N, E] float32, the router distribution: softmax, or sigmoid scores normalised to sum 1
    logits: torch.Tensor  # [N, E] float32


# X-MoE (Chi et al. 2022, arXiv 2204.09179) as the authors' TopkGate(use_xmoe=True) computes it: a 16-dim
# reduction, expert embeddings orthogonal at init with gain 0.32 and rescaled to norm 1.5 before each forward.
XMOE_DIM, XMOE_NORM, XMOE_INIT_GAIN = 16, 1.5, 0.32


class TopKRouter(nn.Module):
    """Linear gate Din -> E, scoring, top-k; the matmul runs in float32 whatever the activation dtype.

    scoring: "softmax" | "sigmoid" | "xmoe" (then `reduction` [R, Din] and `weight` [E, R], the expert
    embeddings; the logits are cosines scaled by |x W_red|, as the authors' `_cosine`). bias: carry the aux-loss-free selection bias `expert_bias` [E] (a persistent
    float32 buffer: in state dicts and checkpoints, never seen by the optimizer), moved by `update_bias` with
    step `bias_rate`. Without it `expert_bias` is None and the state dict is the paper router's.
    """

    def __init__(self, in_dim: int, num_experts: int, top_k: int, renormalize: bool = False, jitter: float = 0.0,
                 scoring: str = "softmax", bias: bool = False, bias_rate: float = 1e-3):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize, self.jitter = num_experts, top_k, renormalize, jitter
        self.scoring, self.bias_rate = scoring, bias_rate
        if scoring == "xmoe":
            self.reduction = nn.Parameter(torch.empty(XMOE_DIM, in_dim))  # [R, Din]
            nn.init.normal_(self.reduction, std=0.02)
            self.weight = nn.Parameter(torch.empty(num_experts, XMOE_DIM))  # [E, R]
            nn.init.orthogonal_(self.weight, gain=XMOE_INIT_GAIN)
        else:
            self.reduction = None
            self.weight = nn.Parameter(torch.empty(num_experts, in_dim))  # [E, Din]
            nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(num_experts) if bias else None, persistent=True)

    def project(self, x32: torch.Tensor) -> torch.Tensor:
        """The gate: float32 x [N, Din] -> logits [N, E]; BitNet's routers override this alone."""
        if self.reduction is not None:  # X-MoE: only the expert embeddings are normalised, not the input
            if self.training:  # the authors rescale in place before each forward; logits do not depend on it,
                with torch.no_grad():  # the optimizer's step sizes relative to |g_e| do
                    self.weight.mul_(XMOE_NORM / self.weight.norm(dim=1, keepdim=True))
            r = x32 @ self.reduction.float().t()  # [N, R]
            return r @ F.normalize(self.weight.float(), dim=1, eps=1e-4).t()  # [N, E]
        return x32 @ self.weight.float().t()  # [N, E]

    def forward(self, x: torch.Tensor) -> Routing:  # x: [N, Din]
        # autocast would otherwise run this matmul in bf16 and make near-ties route differently per dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            if self.training and self.jitter > 0:
                x32 = x32 * torch.empty_like(x32).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return self.route(self.project(x32))

    def route(self, logits: torch.Tensor) -> Routing:
        """Scoring, (biased) top-k selection and renormalisation of float32 logits [N, E]."""
        if self.scoring in ("softmax", "xmoe"):
            probs = logits.softmax(dim=-1)  # [N, E]
            scores = probs
        else:
            scores = logits.sigmoid()  # [N, E], independent per expert
            probs = scores / scores.sum(dim=-1, keepdim=True)  # [N, E], the distribution the lb loss sees
        if self.expert_bias is None:
            weights, indices = scores.topk(self.top_k, dim=-1)  # [N, K]
        else:  # the bias steers the choice only: the weights (and their gradient) come from the scores
            indices = (scores + self.expert_bias.float()).topk(self.top_k, dim=-1).indices  # [N, K]
            weights = scores.gather(-1, indices)  # [N, K]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(indices=indices, weights=weights, probs=probs, logits=logits)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """b_e += bias_rate * sign(mean_e' load - load_e): load [E], the step's assignments per expert summed over
        micro-batches and ranks (mhmoe.layers.balancing.update_router_biases). Underloaded experts move up."""
        if self.expert_bias is None:
            raise RuntimeError("TopKRouter.update_bias: this router has no bias (FFNConfig.balancing='aux_loss')")
        load = load.to(self.expert_bias.device, torch.float64)  # exact counts, exact mean comparison
        self.expert_bias.add_(torch.sign(load.mean() - load).to(self.expert_bias.dtype), alpha=self.bias_rate)

    def extra_repr(self) -> str:
        bias = f", bias_rate={self.bias_rate}" if self.expert_bias is not None else ""
        return (f"in_dim={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"scoring={self.scoring}{bias}")


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how many of the assignments `indices` (any shape) go to each expert. A scatter into [E], not
    torch.bincount, which sizes its output from max(indices) and so syncs with the host on CUDA."""
    flat = indices.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int,
                        weights: torch.Tensor | None = None, choices: str = "all") -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e, f_e counting all K choices; 1.0 when uniform.

    choices="first": f_e counts each row's first choice only (indices[:, 0]), as the authors' `gshard_loss`.

    f_e (fraction of the N*K assignments sent to e) carries no gradient; P_e (mean router probability: softmax,
    or the normalised sigmoid scores) does. 0 for an empty batch (no tokens), where the means would be NaN.
    weights: [N] per-row weights (e.g. 0 for padding), making both means weighted; None = every row counts 1.
    """
    if indices.numel() == 0:
        return probs.sum()  # 0, still attached to the graph
    if choices == "first":
        indices = indices[:, :1]  # [N, 1]
    if weights is not None:
        w = weights.to(probs.dtype)  # [N]
        n = w.sum().clamp(min=1)
        K = indices.shape[1]
        f = torch.zeros(num_experts, device=w.device, dtype=w.dtype).scatter_add_(
            0, indices.reshape(-1), w.repeat_interleave(K)) / (n * K)  # [E]
        return num_experts * (f * ((probs * w[:, None]).sum(0) / n)).sum()
    counts = expert_counts(indices, num_experts).to(probs.dtype)  # [E]
    f = counts / indices.numel()
    p = probs.mean(dim=0)  # [E]
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(logits)^2, keeps logits small; 0 for an empty batch.
    weights: [N] per-row weights of the mean (None = all 1)."""
    if logits.numel() == 0:
        return logits.sum()
    if weights is not None:
        w = weights.to(logits.dtype)
        return (torch.logsumexp(logits, dim=-1).pow(2) * w).sum() / w.sum().clamp(min=1)
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of the softmax router distribution; log(E) when uniform; 0 for an empty batch."""
    if logits.numel() == 0:
        return logits.sum()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def probs_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of rows of a distribution [N, E] (the normalised sigmoid scores); 0 log 0 = 0; 0 for
    an empty batch."""
    if probs.numel() == 0:
        return probs.sum()
    return -torch.special.xlogy(probs, probs).sum(dim=-1).mean()
