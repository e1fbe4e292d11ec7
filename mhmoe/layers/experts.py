"""E SwiGLU experts with stacked weights and dropless sorted dispatch.

sum_{i in Phi} G(x)_i * Expert_i(x) of eq. (1)/(3), computed for all (sub-)tokens at once:
  1. sort the N*K assignments by expert (stable, so ties keep token order): one permutation per layer call,
     reused by the backward,
  2. run each expert on its contiguous group of rows,
  3. weight each row by its combine weight and add it straight into its (sub-)token's output row.

Fast path (dispatch="sorted", the plain `Experts`): one custom autograd function, `SortedExpertsFn`, does the
gather, the experts and the weighted combine per expert group (rows gathered with index_select, products
written with `out=` into preallocated buffers, outputs index_add_-ed into [N, Din]), and a hand-written backward:
  * saves only x, the combine weights, the routing rows and the pre-activations x W1, x W3 ([S, F] each; the
    SwiGLU product and silu are recomputed per group), or nothing of size [S, F] with `recompute=True` (then the
    backward recomputes x W1, x W3: 2/9 more expert matmul FLOPs for the [S, F] activations' memory);
  * writes the weight gradients per expert into [E, ...] buffers (no unbind/stack), accumulates dX per group
    with index_add_ (no zero-filled [N*K, D] buffer, no [N, K, D] product);
  * takes the combine-weight gradient as the row dot product <dY W2^T, silu(x W1) * x W3> (no [S, D] expert
    output kept);
  * accumulates the combine (and dX) in float32 for bfloat16/float16 activations.
Subclasses that override `_run_sorted` (BitNet's BitExperts) and dispatch="grouped_mm" keep the generic path:
gather, `_run_sorted`, then a weighted index_add_ combine, all under autograd.

CPU threading (`threading`): with T > 1 torch threads, "inter-expert" runs T contiguous ranges of experts (about
S'/T rows each) concurrently in T worker threads of one intra-op thread each, instead of one expert after another
with every matmul split T ways ("intra-op"). The small matmuls of many fine experts (MH-MoE h=3: 96 experts of
[~384 x D/3] x [D/3 x F']) gain little from intra-op threads. Each range adds into its own [N, Din] output (and dX)
buffer, summed after the join, so the result is deterministic for a given T. "auto" picks inter-expert on CPU when
every worker gets at least `MIN_EXPERTS_PER_WORKER` experts.

Weights are stacked [E, ...]; the generic sorted path splits them with `unbind(0)` once per forward: indexing
W[e] inside the loop would make autograd build a full-size zero gradient per expert (O(E * |W|) in backward).

Shape legend: N (sub-)tokens, Din expert input width (D/h), F expert hidden, E experts, K top-k,
S = N*K assignments (S' after capacity drops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.layers.sorted_experts import sorted_experts
from mhmoe.layers.threads import expert_workers


@dataclass
class DispatchStats:
    tokens_per_expert: torch.Tensor  # [E] long, assignments routed to each expert (before dropping)
    dropped: int  # assignments dropped by the capacity limit


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert when dropping: ceil(capacity_factor * N*K / E)."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


class Experts(nn.Module):
    """E SwiGLU experts Din -> F -> Din, weights stacked as w1, w3: [E, Din, F] and w2: [E, F, Din].

    recompute: keep no [S, F] activation for the backward (recompute x W1, x W3 there); sorted dispatch only.
    threading: "auto" | "intra-op" | "inter-expert", how CPU threads share the expert loop (module docstring);
        sorted dispatch only.
    """

    def __init__(self, num_experts: int, in_dim: int, hidden_dim: int, dispatch: str = "sorted",
                 recompute: bool = False, threading: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.in_dim, self.hidden_dim, self.dispatch = num_experts, in_dim, hidden_dim, dispatch
        self.recompute, self.threading = recompute, threading
        self.w1 = nn.Parameter(torch.empty(num_experts, in_dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, in_dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, in_dim))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)

    def _fused(self) -> bool:
        """Whether forward takes the one-function fast path (plain sorted experts, `_run_sorted` not overridden)."""
        return self.dispatch == "sorted" and type(self)._run_sorted is Experts._run_sorted

    # Under torch.compile the dispatch stays eager: its group sizes are data (one host sync), and a graph
    # specialised on them would recompile for every new routing.
    @torch.compiler.disable
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
        rows = order // K if K > 1 else order  # [S'] (sub-)token of each sorted assignment
        w_sorted = weights.reshape(-1).index_select(0, order)  # [S'] combine weight of each sorted assignment
        if self._fused():
            sizes = kept_counts.tolist()  # the one host sync of the layer
            workers = expert_workers(self.threading, x.device, sizes)
            y = sorted_experts(x, w_sorted, self.w1, self.w3, self.w2, rows, sizes, N, self.recompute, workers)
            return y, stats
        xs = x.index_select(0, rows)  # [S', Din] rows sorted by expert
        ys = self._run_sorted(xs, kept_counts)  # [S', Din]
        # Weighted combine straight into [N, Din] (index_add_'s backward is a gather of dY).
        ys_w = ys * w_sorted.to(ys.dtype).unsqueeze(-1)
        y = ys.new_zeros(N, self.in_dim).index_add(0, rows, ys_w)  # [N, Din]
        return y, stats

    def _run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert e to its contiguous rows of xs ([S', Din], grouped by expert)."""
        if self.dispatch == "grouped_mm":
            offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end offset of each group
            w1, w3, w2 = (w.to(xs.dtype) for w in (self.w1, self.w3, self.w2))
            h = F.silu(F.grouped_mm(xs, w1, offs=offs)) * F.grouped_mm(xs, w3, offs=offs)  # [S', F]
            return F.grouped_mm(h, w2, offs=offs)
        sizes = counts.tolist()  # the one host sync of the layer
        workers = expert_workers(self.threading, xs.device, sizes)
        return sorted_experts(xs, None, self.w1, self.w3, self.w2, None, sizes, xs.shape[0], self.recompute, workers)
