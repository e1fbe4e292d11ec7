"""The MoE layer: SMoE (heads=1) and MH-MoE (heads=h), with optional head/merge layers and shared expert.

    x' = x W_head                                   eq. (2)  (head_layer)
    [x'_1, ..., x'_h] = split(x')                   h sub-tokens of D/h, contiguous slices, order kept
    y'_j = sum_{i in Phi} G(x'_j)_i Expert_i(x'_j)  eq. (3)  one router shared by all sub-tokens
    y' = concat(y'_1, ..., y'_h)
    y = y' W_merge                                  eq. (4)  (merge_layer)
    y = y + SharedExpert(x)                         (shared_hidden_dim > 0, applied to the full token)

Besides y, forward returns MoEAux: the aux losses (the lb loss added only under balancing "aux_loss"/"both") and
the routing statistics of this call (mhmoe.layers.routing_stats), all device tensors.

Shape legend: B batch, T time, D model dim, H heads, N = B*T*H sub-tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mhmoe.layers.config import FFNConfig, MoEAux
from mhmoe.layers.experts import Experts, expert_capacity
from mhmoe.layers.ffn import SwiGLU
from mhmoe.layers.router import Routing, TopKRouter, load_balancing_loss, probs_entropy, router_entropy, z_loss
from mhmoe.layers.routing_stats import expert_activation, load_cv, load_max_mean, subtoken_distinct
from mhmoe.profiling import EXPERTS, HEAD_MERGE, ROUTER, ROUTER_AUX, SHARED_EXPERT, label


class MoELayer(nn.Module):
    """kind="moe" of the layer family; see the module docstring for the computation."""

    def __init__(self, cfg: FFNConfig) -> None:
        super().__init__()
        if cfg.kind != "moe":
            raise ValueError(f"FFNConfig.kind: MoELayer needs kind='moe', got {cfg.kind!r}")
        self.cfg = cfg
        self.head = nn.Linear(cfg.dim, cfg.dim, bias=cfg.head_merge_bias) if cfg.head_layer else None
        self.router = TopKRouter(cfg.head_dim, cfg.num_experts, cfg.top_k, cfg.renormalizes, cfg.jitter,
                                 cfg.scoring, cfg.uses_bias, cfg.bias_rate)
        self.experts = Experts(cfg.num_experts, cfg.head_dim, cfg.hidden_dim, cfg.dispatch, cfg.recompute,
                               cfg.threading)
        self.merge = nn.Linear(cfg.dim, cfg.dim, bias=cfg.head_merge_bias) if cfg.merge_layer else None
        self.shared = SwiGLU(cfg.dim, cfg.shared_hidden_dim) if cfg.shared_hidden_dim > 0 else None

    def forward(self, x: torch.Tensor, apply_merge: bool = True) -> tuple[torch.Tensor, MoEAux]:
        """x: [B, T, D] (or [N, D]) -> (y of the same shape, MoEAux).

        apply_merge=False returns y' before W_merge, for models that place the merge after the residual add.
        """
        cfg = self.cfg
        shape = x.shape
        tokens = x.reshape(-1, cfg.dim)  # [BT, D]
        with label(HEAD_MERGE):  # profiler ranges (mhmoe.profiling); no-ops unless a profiler records eager code
            h = self.head(tokens) if self.head is not None else tokens  # eq. (2)
            sub = rearrange(h, "n (h d) -> (n h) d", h=cfg.heads)  # [N, D/H], sub-tokens of a token adjacent
        with label(ROUTER):
            routing = self.router(sub)
        capacity = None
        # Evaluation drops only with capacity_in_eval: otherwise its outputs stay independent of the batch.
        if cfg.capacity_factor > 0 and (self.training or cfg.capacity_in_eval):
            capacity = expert_capacity(routing.indices.numel(), cfg.num_experts, cfg.capacity_factor, cfg.top_k,
                                       cfg.capacity_rule)
        priority = "choice" if cfg.capacity_rule == "choice_order" else "token"
        with label(EXPERTS):
            # eq. (3): y_sub [N, D/H]
            y_sub, stats = self.experts(sub, routing.indices, routing.weights, capacity, priority)
        with label(HEAD_MERGE):
            y = rearrange(y_sub, "(n h) d -> n (h d)", h=cfg.heads)  # [BT, D]
            if self.merge is not None and apply_merge:
                y = self.merge(y)  # eq. (4)
        if self.shared is not None:
            with label(SHARED_EXPERT):
                y = y + self.shared(tokens)
        sequences = shape[0] if x.dim() == 3 else 1  # an [N, D] input counts as one sequence
        with label(ROUTER_AUX):
            # A 0-d tensor of the device from the dispatcher: no host sync.
            dropped = torch.as_tensor(stats.dropped, device=x.device).float() / max(1, routing.indices.numel())
            aux = moe_aux(cfg, routing, stats.tokens_per_expert, dropped, sequences)
        return y.reshape(shape), aux


def moe_aux(cfg: FFNConfig, routing: Routing, tokens_per_expert: torch.Tensor, dropped_fraction: torch.Tensor,
            sequences: int) -> MoEAux:
    """The MoEAux of one layer call: losses per `cfg.balancing`, routing statistics of `routing` ([N, K] rows in
    [B, T, h] order, `sequences` = B); device tensors only."""
    lb = load_balancing_loss(routing.probs, routing.indices, cfg.num_experts, choices=cfg.balance_choices)
    z = z_loss(routing.logits)
    # Under balancing="bias" the lb loss is only reported: the aux loss holds just the z-loss.
    loss = cfg.lb_coef * lb + cfg.z_coef * z if cfg.uses_aux_loss else cfg.z_coef * z
    entropy = router_entropy(routing.logits) if cfg.scoring != "sigmoid" else probs_entropy(routing.probs)
    return MoEAux(
        loss=loss,
        lb_loss=lb if cfg.uses_aux_loss else lb.detach(),
        z_loss=z,
        router_entropy=entropy.detach(),
        tokens_per_expert=tokens_per_expert,
        dropped_fraction=dropped_fraction,
        load_cv=load_cv(tokens_per_expert),
        load_max_mean=load_max_mean(tokens_per_expert),
        expert_activation=expert_activation(routing.indices, sequences, cfg.num_experts),
        subtoken_distinct=subtoken_distinct(routing.indices, cfg.heads),
    )
