"""The transformers peer: Mixtral's sparse MoE block loaded with our SMoE's weights, under each of its
`experts_implementation`s."""

from __future__ import annotations

import torch
from torch import nn

from mhmoe.layers.config import FFNConfig
from mhmoe.layers.moe import MoELayer


def hf_implementations(device: torch.device) -> list[str]:
    """The `experts_implementation`s of transformers that run on `device` ([] without transformers)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return []
    gpu_only = {"deepgemm", "sonicmoe"}  # CUDA kernels
    names = ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]
    return [n for n in names if device.type == "cuda" or n not in gpu_only]


def hf_mixtral_block(smoe: MoELayer, implementation: str) -> nn.Module:
    """transformers' MixtralSparseMoeBlock with the sizes and weights of our top-1 SMoE layer `smoe`.

    Ours stores w1, w3: [E, D, F] and w2: [E, F, D]; Mixtral stores gate_up_proj = [W1^T; W3^T]: [E, 2F, D] and
    down_proj = W2^T: [E, D, F]. The router weight [E, D] is the same in both.
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = smoe.cfg
    if c.heads != 1 or c.head_layer or c.merge_layer or c.shared_hidden_dim:
        raise ValueError("hf_mixtral_block: the peer is a plain SMoE (heads=1, no head/merge/shared expert)")
    hf_cfg = MixtralConfig(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_local_experts=c.num_experts,
                           num_experts_per_tok=c.top_k, hidden_act="silu", router_jitter_noise=0.0,
                           experts_implementation=implementation)
    block = MixtralSparseMoeBlock(hf_cfg)
    ex = smoe.experts
    with torch.no_grad():
        block.gate.weight.copy_(smoe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ex.w1.transpose(1, 2), ex.w3.transpose(1, 2)], dim=1))
        block.experts.down_proj.copy_(ex.w2.transpose(1, 2))
    return block.to(device=ex.w1.device, dtype=ex.w1.dtype)


def _batched_mm_bytes(cfg: FFNConfig, tokens: int, dtype: torch.dtype) -> int:
    """Memory transformers' batched_mm needs: gate_up_proj[ids] and down_proj[ids] are [S, 3 F D] copies, and
    their gradients as much again."""
    return 2 * tokens * cfg.top_k * 3 * cfg.hidden_dim * cfg.dim * torch.finfo(dtype).bits // 8


def _hf_grads_as_ours(gr: dict) -> dict:
    """Mixtral's gradient names/layout -> ours (see hf_mixtral_block)."""
    g13 = gr.pop("experts.gate_up_proj")
    f = g13.shape[1] // 2
    out = {"x": gr.pop("x"), "router.weight": gr.pop("gate.weight"),
           "experts.w1": g13[:, :f].transpose(1, 2), "experts.w3": g13[:, f:].transpose(1, 2),
           "experts.w2": gr.pop("experts.down_proj").transpose(1, 2)}
    out.update(gr)
    return out
