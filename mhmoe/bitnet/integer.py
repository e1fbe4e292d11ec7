"""Integer inference twins of the BitNet modules: int8 levels, float32 scales, int8 x int8 -> int32 matmuls.

Their logits equal the fake-quant model's bit for bit (same roundings, exact integer sums).

Shape legend: N rows (tokens or sub-tokens), K input width, M output width, D model dim, F hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.bitnet.modules import BitExperts, BitLinear, BitRouter, ExpertRMSNorm, expert_rows, router_args
from mhmoe.bitnet.quant import dequant, int8_matmul, quantize_act
from mhmoe.layers.ffn import SwiGLU
from mhmoe.layers.norm import RMSNorm
from mhmoe.layers.router import TopKRouter

# ----------------------------------------------------------------------------------------------------------
# Integer inference modules


class IntBitLinear(nn.Module):
    """Inference twin of BitLinear: int8 levels `weight_q` [M, K], float32 `weight_scale` [groups]."""

    def __init__(self, levels: torch.Tensor, scale: torch.Tensor, groups: int = 1, norm: RMSNorm | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = levels.shape
        self.groups = groups
        # Buffers outside the state dict: a loaded model's state dict is exactly the full-precision tensors.
        self.register_buffer("weight_q", levels.to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("weight_scale", scale.float().reshape(groups), persistent=False)
        self.norm = norm

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., M] float32
        x32 = x.float()
        if self.norm is not None:
            x32 = F.rms_norm(x32, (self.in_features,), self.norm.weight.float(), self.norm.eps)
        qx, sx = quantize_act(x32)
        acc = int8_matmul(qx.to(torch.int8).reshape(-1, self.in_features), self.weight_q.t(), 1)
        return dequant(acc.reshape(*x.shape[:-1], self.out_features), self.weight_scale, sx, self.groups)


class IntBitExperts(BitExperts):
    """Inference twin of BitExperts: int8 levels w13_q [E, Din, 2F] (w1 | w3, one matmul for both) and
    w2_q [E, F, Din], float32 scales [E] each; sorted dispatch as in training, one int8 matmul per group."""

    def __init__(self, levels: dict[str, tuple[torch.Tensor, torch.Tensor]], in_norm: RMSNorm | None,
                 w2_norm: ExpertRMSNorm, eps: float) -> None:
        E, Din, Fh = levels["w1"][0].shape
        with torch.device("meta"):
            super().__init__(E, Din, Fh, "sorted")
        del self.w1, self.w3, self.w2  # the levels below replace the float parameters
        self.eps, self.in_norm, self.w2_norm = eps, in_norm, w2_norm
        w13 = torch.cat([levels["w1"][0], levels["w3"][0]], dim=-1).to(torch.int8).contiguous()
        self.register_buffer("w13_q", w13, persistent=False)
        self.register_buffer("w2_q", levels["w2"][0].to(torch.int8).contiguous(), persistent=False)
        for name in ("w1", "w3", "w2"):
            self.register_buffer(f"{name}_scale", levels[name][1].float().reshape(E), persistent=False)

    def _run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Only the int8 matmuls run per expert group; quantisation, rescaling and the norm are row-wise, so they run
        # once over all rows with each row's expert scales and gains (the same values as per group).
        Fh, S = self.hidden_dim, xs.shape[0]
        sizes = counts.tolist()
        qx, sx = quantize_act(xs.float())
        qx = qx.to(torch.int8)
        row_e = torch.repeat_interleave(torch.arange(self.num_experts, device=xs.device), counts, output_size=S)

        def grouped(a: torch.Tensor, w: torch.Tensor, cols: int) -> torch.Tensor:  # a: [S', K] sorted by expert
            parts = [int8_matmul(ae, we, 1) for ae, we in zip(a.split(sizes), w.unbind(0)) if ae.shape[0]]
            return torch.cat(parts) if parts else a.new_zeros(0, cols, dtype=torch.int32)

        acc = grouped(qx, self.w13_q, 2 * Fh)  # [S', 2F] int32
        qh, sh = expert_rows(sx, (acc[:, :Fh], acc[:, Fh:]), self.w1_scale[row_e, None],
                              self.w3_scale[row_e, None], self.w2_norm.weight.float()[row_e], self.eps)
        return dequant(grouped(qh.to(torch.int8), self.w2_q, self.in_dim), self.w2_scale[row_e, None], sh)


class IntBitRouter(TopKRouter):
    """Inference twin of BitRouter: int8 gate levels, float32 gamma; the routing math is TopKRouter.route."""

    def __init__(self, r: TopKRouter, levels: torch.Tensor, scale: torch.Tensor) -> None:
        with torch.device("meta"):
            super().__init__(*router_args(r))
        del self.weight
        self.expert_bias = r.expert_bias  # the aux-loss-free bias (a persistent buffer) stays in the state dict
        self.register_buffer("weight_q", levels.to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("weight_scale", scale.float().reshape(1), persistent=False)

    def project(self, x32: torch.Tensor) -> torch.Tensor:  # [N, Din] float32 -> [N, E] float32
        qx, sx = quantize_act(x32)
        acc = int8_matmul(qx.to(torch.int8), self.weight_q.t(), 1)
        return dequant(acc, self.weight_scale, sx)


class IntSwiGLU(nn.Module):
    """Inference twin of a BitNet SwiGLU: w1 and w3 fused into one int8 matmul (groups=2, each keeps its gamma),
    so the shared input is quantised once; the values are those of the two separate projections."""

    def __init__(self, w1: tuple[torch.Tensor, torch.Tensor], w3: tuple[torch.Tensor, torch.Tensor],
                 w2: tuple[torch.Tensor, torch.Tensor], w2_norm: RMSNorm | None) -> None:
        super().__init__()
        self.hidden_dim = w1[0].shape[0]
        self.w13 = IntBitLinear(torch.cat([w1[0], w3[0]]), torch.cat([w1[1].reshape(1), w3[1].reshape(1)]), 2)
        self.w2 = IntBitLinear(*w2, 1, w2_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        h = self.w13(x).unflatten(-1, (2, self.hidden_dim))
        return self.w2(F.silu(h[..., 0, :]) * h[..., 1, :])


def ternary_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{parameter name: (int8 levels, float32 scales)} of every ternary weight of a converted model; the scales
    are [groups] for BitLinear (1, or 3 for qkv), [E] for stacked expert weights."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, (BitLinear, BitRouter)):
            out[f"{prefix}weight"] = mod.ternary()
        elif isinstance(mod, BitExperts) and not isinstance(mod, IntBitExperts):
            for w, t in mod.ternary().items():
                out[f"{prefix}{w}"] = t
    return out


def integerize(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Swap, in place, every BitNet module of `model` for its integer twin built from `weights` (as returned by
    `ternary_weights`). Sub-norm gains and all full-precision tensors are kept from `model`; the returned model's
    state dict holds only those (levels and scales are non-persistent buffers). Returns `model`, in eval mode."""
    used = set()

    def take(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in weights:
            raise KeyError(f"ternary weight {key!r} is missing")
        used.add(key)
        return weights[key]

    replaced: list[str] = []
    for name, mod in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if any(name.startswith(r) for r in replaced):
            continue  # inside a module swapped as a whole
        new: nn.Module | None = None
        if isinstance(mod, SwiGLU) and all(isinstance(getattr(mod, w), BitLinear) for w in ("w1", "w3", "w2")):
            if mod.w1.norm is None and mod.w3.norm is None:
                new = IntSwiGLU(*(take(f"{prefix}{w}.weight") for w in ("w1", "w3", "w2")), mod.w2.norm)
                replaced.append(prefix)
        elif isinstance(mod, BitLinear):
            levels, scale = take(f"{prefix}weight")
            new = IntBitLinear(levels, scale, mod.groups, mod.norm)
        elif isinstance(mod, BitExperts) and not isinstance(mod, IntBitExperts):
            new = IntBitExperts({w: take(f"{prefix}{w}") for w in ("w1", "w3", "w2")}, mod.in_norm, mod.w2_norm,
                                mod.eps)
        elif isinstance(mod, BitRouter):
            new = IntBitRouter(mod, *take(f"{prefix}weight"))
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    extra = sorted(set(weights) - used)
    if extra:
        raise KeyError(f"ternary weight {extra[0]!r} has no BitNet module in the model")
    return model.eval()


def to_integer(model: nn.Module) -> nn.Module:
    """Integer inference model of a converted (fake-quant) model, in place: integerize(model, ternary_weights(model))."""
    return integerize(model, ternary_weights(model))
