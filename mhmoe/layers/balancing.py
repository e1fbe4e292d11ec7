"""Aux-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, section 2.1.2): the bias update after each step.

Every router with FFNConfig.balancing "bias" or "both" carries a bias b [E] that is added to its scores for the
top-k choice only. Once per optimizer step

    b_e += bias_rate * sign(mean_e' load_e' - load_e)

where load_e counts the step's assignments to expert e over every micro-batch (gradient accumulation) and every
rank (data and expert parallelism: each rank routes its own tokens, so the global load is the sum). The sum over
ranks is one all_reduce when torch.distributed is initialised, so every rank applies the same update and the
replicated routers stay identical. The bias is a persistent buffer: the optimizer never sees it, checkpoints
(model.safetensors, DCP) keep it, and a resumed run continues from it.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.layers.router import TopKRouter


def moe_routers(model: nn.Module) -> list[TopKRouter]:
    """The routers of `model` in depth order (the order of ModelOutput.aux), BitNet's included."""
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def sum_over_ranks(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """t summed over the ranks of `group` (a copy; t itself when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        t = t.clone()
        dist.all_reduce(t, group=group)
    return t


@torch.no_grad()
def update_router_biases(model: nn.Module, loads: torch.Tensor | list[torch.Tensor], reduce: bool = True,
                         group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Apply one bias update to every biased router of `model`, once per optimizer step (before or after
    `optimizer.step()` is the same: the bias is not a parameter, and the next forward sees both).

    loads: [L, E] (or L tensors [E]) assignments per expert of this step, summed over its micro-batches, one row
    per MoE layer in depth order. reduce: sum them over the ranks first (pass False when they already are).
    Returns the [L, E] loads used (global when reduced). Routers without a bias are left alone.
    """
    routers = moe_routers(model)
    stacked = torch.stack([l.to(torch.float64) for l in loads]) if isinstance(loads, list) else loads.double()
    if stacked.shape[0] != len(routers):
        raise ValueError(f"update_router_biases: {stacked.shape[0]} load rows for {len(routers)} MoE routers")
    if reduce:
        stacked = sum_over_ranks(stacked, group)
    for router, load in zip(routers, stacked):
        if router.expert_bias is not None:
            router.update_bias(load)
    return stacked
