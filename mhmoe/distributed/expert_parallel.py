"""Expert parallelism: the E experts of every MoE layer split over the ep ranks of a group, rows exchanged with
all_to_all.

One MoE layer under expert parallelism (`ExpertParallelExperts`, same interface as `Experts`):
    1. route locally, sort the S = N*K assignments by expert: each destination rank's rows are contiguous
    2. all_to_all the per-expert counts [ep, E/ep], then the rows (uneven splits): S rows of D/h features
    3. run the E/ep local experts on their contiguous groups (the same sorted matmuls as one process)
    4. all_to_all the results back (the backward of each all_to_all is the reverse all_to_all), un-sort, combine
MH-MoE sends sub-tokens: h*K rows of D/h per token = K*D values, exactly SMoE's K rows of D at the same top-k
(`comm_volume_per_token`); capacity limits, when set, apply per rank before dispatch, as in data parallelism.

Shape legend: N (sub-)tokens of this rank, Din = D/h, F expert hidden, E experts, El = E/ep local experts, K top-k,
S = N*K assignments (S' after capacity drops), R rows received by this rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.errors import ConfigError
from mhmoe.layers.compile_boundary import eager_under_compile
from mhmoe.layers.experts import DispatchStats, Experts, assignment_order, drop_over_capacity
from mhmoe.layers.moe import MoELayer

# ----------------------------------------------------------------------------------------------------------
# Differentiable all_to_all and the expert-parallel experts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        out_splits, in_splits = ctx.splits
        gx = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:  # noqa: ANN001
    """Send rows in_splits[r] of x (in rank order) to rank r, receive out_splits[r] rows from rank r; autograd-aware."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class CommStats:
    """One forward of an expert-parallel layer, one direction (the results come back the same way)."""

    rows: int = 0  # assignment rows dispatched (kept after capacity), self included
    offrank_rows: int = 0  # of which to other ranks
    bytes: int = 0  # rows * Din * element size
    offrank_bytes: int = 0


class ExpertParallelExperts(Experts):
    """Experts [rank*El, (rank+1)*El) of an expert-parallel group, with `Experts`' forward signature.

    Parameters w1, w3: [El, Din, F], w2: [El, F, Din] keep the names of the module they replace, so the
    state-dict keys are those of the single-process model (DCP checkpoints store them as shards of [E, ...]).
    """

    def __init__(self, experts: Experts, group=None) -> None:  # noqa: ANN001
        nn.Module.__init__(self)
        if type(experts) is not Experts:  # BitExperts (BitNet) carry per-expert norms and quantised kernels
            raise NotImplementedError(f"expert parallelism supports mhmoe.layers.experts.Experts, not {type(experts).__name__}")
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        E = experts.num_experts
        if E % self.ep_size:
            raise ConfigError(f"--ep: num_experts ({E}) must be divisible by the expert-parallel size ({self.ep_size})")
        self.num_experts, self.in_dim, self.hidden_dim = E, experts.in_dim, experts.hidden_dim
        self.dispatch, self.recompute, self.threading = experts.dispatch, experts.recompute, experts.threading
        self.local_experts = E // self.ep_size
        lo, hi = self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts
        self.w1 = nn.Parameter(experts.w1.detach()[lo:hi].clone())
        self.w3 = nn.Parameter(experts.w3.detach()[lo:hi].clone())
        self.w2 = nn.Parameter(experts.w2.detach()[lo:hi].clone())
        self.comm = CommStats()

    def extra_repr(self) -> str:
        return (f"experts {self.ep_rank * self.local_experts}..{(self.ep_rank + 1) * self.local_experts - 1} of "
                f"{self.num_experts}, in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, ep={self.ep_size}")

    @eager_under_compile  # data-dependent splits, as Experts.forward
    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, capacity: int | None = None,
        priority: str = "token",
    ) -> tuple[torch.Tensor, DispatchStats]:
        """x: [N, Din], indices/weights: [N, K] (this rank's routing) -> y: [N, Din], as Experts.forward."""
        N, K = indices.shape
        E, El, P = self.num_experts, self.local_experts, self.ep_size
        flat = indices.reshape(-1)  # [S]
        # [S] grouped by expert, hence by owner rank; within an expert in the order its slots are filled
        order = assignment_order(indices, priority if capacity is not None else "token")
        counts = torch.bincount(flat, minlength=E)  # [E]
        stats = DispatchStats(tokens_per_expert=counts, dropped=0)
        if capacity is not None:  # the same per-rank drop as Experts.forward, before anything is sent
            keep, counts, stats.dropped = drop_over_capacity(flat[order], counts, capacity)
            order = order[keep]
        xs = x.index_select(0, order // K)  # [S', Din] sorted by expert
        send = counts.view(P, El)  # rows for rank p's local expert j
        recv = torch.empty_like(send)  # rows from rank p for my local expert j
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()  # the host sync of the layer
        xr = all_to_all(xs, recv_splits, send_splits, self.group)  # [R, Din] by source rank, then local expert
        # Regroup by local expert; stable, so an expert sees rank 0's rows, then rank 1's, ... (token order).
        expert_of_row = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(P), recv.flatten())
        perm = torch.argsort(expert_of_row, stable=True)  # [R]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        yl = self._run_sorted(xr.index_select(0, perm), recv.sum(0))  # [R, Din]
        ys = all_to_all(yl.index_select(0, inv), send_splits, recv_splits, self.group)  # [S', Din] sorted order
        y_assign = ys.new_zeros(N * K, self.in_dim).index_copy(0, order, ys)  # [S, Din]
        y = (y_assign.view(N, K, self.in_dim) * weights.to(ys.dtype).unsqueeze(-1)).sum(dim=1)  # [N, Din]
        row_bytes = self.in_dim * xs.element_size()
        off = int(xs.shape[0] - send_splits[self.ep_rank])
        self.comm = CommStats(int(xs.shape[0]), off, int(xs.shape[0]) * row_bytes, off * row_bytes)
        return y, stats


def shard_experts(model: nn.Module, group=None) -> nn.Module:  # noqa: ANN001
    """Swap, in place, the experts of every MoE layer of `model` for this rank's ExpertParallelExperts over
    `group` (all ranks of the group must call it on identically initialised models). Returns `model`."""
    for mod in list(model.modules()):
        if isinstance(mod, MoELayer) and not isinstance(mod.experts, ExpertParallelExperts):
            mod.experts = ExpertParallelExperts(mod.experts, group)
    return model


def expert_parallel_modules(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    """(qualified name, module) of every expert-parallel layer, in model order (wrappers' prefixes removed)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelExperts):
            out.append((_clean_fqn(name), mod))
    return out


def _clean_fqn(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name
