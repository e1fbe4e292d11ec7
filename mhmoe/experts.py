"""E SwiGLU experts with stacked weights and dropless sorted dispatch.

sum_{i in Phi} G(x)_i * Expert_i(x) of eq. (1)/(3), computed for all (sub-)tokens at once:
  1. sort the N*K assignments by expert (stable, so ties keep token order),
  2. gather the rows once, run each expert on its contiguous group,
  3. un-permute, and take the K-way weighted sum per (sub-)token.
Weights are stacked [E, ...] and split with `unbind(0)` once per forward: indexing W[e] inside the loop would
make autograd build a full-size zero gradient per expert (O(E * |W|) in backward).

Shape legend: N (sub-)tokens, Din expert input width (D/h), F expert hidden, E experts, K top-k,
S = N*K assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DispatchStats:
    tokens_per_expert: torch.Tensor  # [E] long, assignments routed to each expert (before dropping)
    dropped: int  # assignments dropped by the capacity limit


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert when dropping: ceil(capacity_factor * N*K / E)."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


class Experts(nn.Module):
    """E SwiGLU experts Din -> F -> Din, weights stacked as w1, w3: [E, Din, F] and w2: [E, F, Din]."""

    def __init__(self, num_experts: int, in_dim: int, hidden_dim: int, dispatch: str = "sorted") -> None:
        super().__init__()
        self.num_experts, self.in_dim, self.hidden_dim, self.dispatch = num_experts, in_dim, hidden_dim, dispatch
        self.w1 = nn.Parameter(torch.empty(num_experts, in_dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, in_dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, in_dim))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, capacity: int | None = None
    ) -> tuple[torch.Tensor, DispatchStats]:
        """x: [N, Din], indices/weights: [N, K] -> y: [N, Din] = sum_k weights[:, k] * Expert_{indices[:, k]}(x)."""
        N, K = indices.shape
        E = self.num_experts
        flat = indices.reshape(-1)  # [S]
        order = torch.argsort(flat, stable=True)  # [S] assignment ids grouped by expert
        counts = torch.bincount(flat, minlength=E)  # [E]
        stats = DispatchStats(tokens_per_expert=counts, dropped=0)
        if capacity is not None:
            # Position of each sorted assignment inside its expert's group; keep the first `capacity`.
            starts = torch.cumsum(counts, 0) - counts  # [E]
            pos = torch.arange(order.numel(), device=x.device) - starts[flat[order]]  # [S]
            order = order[pos < capacity]
            kept_counts = counts.clamp(max=capacity)
            stats.dropped = int(N * K - order.numel())
        else:
            kept_counts = counts
        xs = x.index_select(0, order // K)  # [S', Din] rows sorted by expert
        ys = self._run_sorted(xs, kept_counts)  # [S', Din]
        # Un-permute into assignment order (dropped assignments stay zero), then the K-way weighted sum.
        y_assign = ys.new_zeros(N * K, self.in_dim).index_copy(0, order, ys)  # [S, Din]
        w = weights.to(ys.dtype).unsqueeze(-1)  # [N, K, 1]
        y = (y_assign.view(N, K, self.in_dim) * w).sum(dim=1)  # [N, Din]
        return y, stats

    def _run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert e to its contiguous rows of xs ([S', Din], grouped by expert)."""
        if self.dispatch == "grouped_mm":
            offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end offset of each group
            w1, w3, w2 = (w.to(xs.dtype) for w in (self.w1, self.w3, self.w2))
            h = F.silu(F.grouped_mm(xs, w1, offs=offs)) * F.grouped_mm(xs, w3, offs=offs)  # [S', F]
            return F.grouped_mm(h, w2, offs=offs)
        sizes = counts.tolist()  # the one host sync of the layer
        outs = []
        for xe, w1, w3, w2 in zip(xs.split(sizes), self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)):
            if xe.shape[0] == 0:
                continue
            outs.append((F.silu(xe @ w1.to(xe.dtype)) * (xe @ w3.to(xe.dtype))) @ w2.to(xe.dtype))
        if not outs:
            return xs.new_zeros(0, self.in_dim)
        return torch.cat(outs, dim=0)
