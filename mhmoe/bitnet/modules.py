"""BitNet b1.58 (Ma et al., arXiv 2402.17764) as a module swap: ternary weights, 8-bit activations, for Table 3.

Every model of the paper gets a BitNet twin through one entry point, `convert(model)` (or `ModelConfig.bitnet`,
which calls it at the end of `Transformer.__init__`, after the initialisation, so the twin starts from exactly the
weights of the full-precision model with the same seed): `mhmoe train --set model.bitnet=true`. The recipe's
schedule is `--set optim.schedule=two_stage --set optim.wd_off_at=0.5` with a higher optim.lr (mhmoe.training.optim).

Quantisation (b1.58, per forward; scales and roundings in float32 whatever autocast says, the matmul of the levels
in autocast's dtype, which holds levels up to 127 exactly):
    weights      gamma = max(mean|W|, eps) per matrix (per expert for stacked expert weights, per q/k/v block
                 for the fused qkv projection); levels W~ = clip(round(W / gamma), -1, 1); W_q = gamma * W~
    activations  s = 127 / max(max|x|, eps) per token (row), no zero point; levels x~ = clip(round(x s), -127, 127)
    matmul       y = (x~ @ W~^T) * gamma / s: the integer-valued product is formed first, then rescaled, so the
                 fake-quant forward computes exactly what the integer kernels of `IntBitLinear` compute (in
                 float32 the integer sums are exact for K < 132,104 inputs)
    gradients    straight-through for both quantisers (d x~/dx = s, d W~/dW = 1/gamma, hence dy/dx = W_q and
                 dy/dW = g^T x_q as for x + (q(x) - x).detach()); the scales are computed from detached tensors
Replaced: attention qkv/out, dense SwiGLU w1/w3/w2, every routed expert, the shared expert, MH-MoE head and merge
layers. Full precision: embeddings, LM head, RMSNorms and the router (`router=True` quantises it, an ablation).

Norm layout (the b1.58 recipe normalises every BitLinear input; our blocks are pre-norm, so a sub-norm is added
only where an input is not already normalised; all sub-norms live inside the BitNet modules, gain 1 at init):
    attn.qkv                input = attn_norm(x)                                  (no extra norm)
    attn.out                input = attention output                              sub-norm  attn.out.norm     [D]
    SwiGLU w1/w3            input = ffn_norm(x) (dense FFN, shared expert)        (no extra norm)
    SwiGLU w2               input = silu(x W1) * (x W3)                           sub-norm  w2.norm           [F]
    MoE head                input = ffn_norm(x)                                   (no extra norm)
    experts w1/w3           input = sub-tokens: slices of ffn_norm(x), or of the head output when there is a
                            head layer, which is not normalised                  sub-norm  experts.in_norm  [D/h]
                            (head layer only; shared by all experts, the router still sees the raw sub-token)
    experts w2              per expert row, silu(x W1_e) * (x W3_e)               sub-norm  experts.w2_norm  [E, F]
                                                                                  (one gain vector per expert)
    merge                   input = y' (concatenated expert outputs), or x + y'
                            with merge_after_residual                             sub-norm  merge.norm        [D]
    router (router=True)    input = the raw sub-token, quantised without a norm (as the fp model's router sees it)

Integer inference: `to_integer(model)` (or `mhmoe.export.integer_model` from a packed file) swaps each BitNet module
for an `Int*` twin holding int8 levels and float32 scales (a SwiGLU's w1 and w3 fused into one matmul);
activations are quantised per token to int8 and every matmul is `int8_matmul` (torch._int_mm, int32 accumulation);
MoE rows stay sorted by expert, one int8 matmul per group. Its logits equal the fake-quant model's bit for bit.

Shape legend: N rows (tokens or sub-tokens), K input width, M output width, D model dim, F hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.bitnet.quant import dequant, quant_dtypes, quantize_act, quantize_weight
from mhmoe.layers.attention import Attention
from mhmoe.layers.experts import Experts, RowsImplementation, gathered_experts, rows_dispatch
from mhmoe.layers.ffn import SwiGLU
from mhmoe.layers.moe import MoELayer
from mhmoe.layers.norm import RMSNorm
from mhmoe.layers.router import TopKRouter

# ----------------------------------------------------------------------------------------------------------
# Training modules (fake quantisation with straight-through gradients)


class BitLinear(nn.Module):
    """y = x W^T with W ternarised (one gamma per row block, `groups` blocks) and x quantised per token to 8 bits.

    No bias. With sub_norm, an RMSNorm (gain `norm.weight`) is applied to the input first. The weight Parameter
    keeps the name and shape of the nn.Linear it replaces, so state dicts differ only by the sub-norm gains.
    """

    def __init__(self, in_features: int, out_features: int, sub_norm: bool = False, groups: int = 1,
                 eps: float = 1e-5, weight: nn.Parameter | None = None) -> None:
        super().__init__()
        if out_features % groups:
            raise ValueError(f"BitLinear: out_features ({out_features}) must be divisible by groups ({groups})")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features))
            nn.init.normal_(weight, std=0.02)
        self.weight = weight
        self.norm = RMSNorm(in_features, eps).to(weight.device) if sub_norm else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, sub_norm: bool = False, groups: int = 1, eps: float = 1e-5) -> "BitLinear":
        """The BitNet twin of `lin`, sharing its weight Parameter (no copy, no random draw)."""
        if lin.bias is not None:
            raise ValueError("BitLinear: b1.58 layers have no bias; the model's projections never do")
        return cls(lin.in_features, lin.out_features, sub_norm, groups, eps, weight=lin.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 levels [M, K], gamma [groups] float32): what the integer model and the export store."""
        with torch.no_grad():
            levels, gamma = quantize_weight(self.weight, self.groups)
        return levels.to(torch.int8), gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., M]
        mm, out = quant_dtypes(x)
        with torch.autocast(x.device.type, enabled=False):
            x32 = x.float()
            if self.norm is not None:
                x32 = F.rms_norm(x32, (self.in_features,), self.norm.weight.float(), self.norm.eps)
            qx, sx = quantize_act(x32)
            qw, gamma = quantize_weight(self.weight, self.groups)
            acc = F.linear(qx.to(mm), qw.to(mm)).float()
            return dequant(acc, gamma, sx, self.groups).to(out)


class ExpertRMSNorm(nn.Module):
    """RMSNorm with one gain vector per expert: weight [E, F]."""

    def __init__(self, num_experts: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_experts, dim))


def expert_rows(sx: torch.Tensor, acc13: tuple[torch.Tensor, torch.Tensor], g1: torch.Tensor, g3: torch.Tensor,
                 gain: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """From the integer-valued products x~ W1~, x~ W3~ of expert rows (input scales sx, the experts' gammas and
    w2_norm gains, per group or per row): the quantised w2 input (levels, scale). Shared by the fake-quant and
    the integer experts so both round identically."""
    h = F.silu(dequant(acc13[0], g1, sx)) * dequant(acc13[1], g3, sx)  # [n, F]
    h = F.rms_norm(h, (h.shape[-1],), None, eps) * gain
    return quantize_act(h)


class BitExperts(Experts):
    """Experts with ternary weights (one gamma per expert and matrix) and 8-bit per-row activations.

    Same stacked parameters and dispatch as `Experts` (sorted: one matmul per contiguous group; or grouped_mm;
    "auto" resolved as there, for the quantised matmul dtype). Every dispatch goes through `gathered_experts`:
    gather, this class's quantised `_run_sorted`, weighted combine, under autograd (no fused kernel).
    Sub-norms: `w2_norm` on every expert's down-projection input, `in_norm` (only when the layer has a head
    projection) on the sub-tokens before dispatch.
    """

    implementations = {"sorted": gathered_experts, "grouped_mm": gathered_experts}

    def __init__(self, num_experts: int, in_dim: int, hidden_dim: int, dispatch: str = "auto",
                 in_norm: bool = False, eps: float = 1e-5) -> None:
        super().__init__(num_experts, in_dim, hidden_dim, dispatch)
        self._make_norms(in_norm, eps, self.w1.device)

    def _make_norms(self, in_norm: bool, eps: float, device: torch.device) -> None:
        self.eps = eps
        self.in_norm = RMSNorm(self.in_dim, eps).to(device) if in_norm else None
        self.w2_norm = ExpertRMSNorm(self.num_experts, self.hidden_dim, eps).to(device)

    @classmethod
    def from_experts(cls, ex: Experts, in_norm: bool = False, eps: float = 1e-5) -> "BitExperts":
        """The BitNet twin of `ex`, sharing its weight Parameters (no copy, no random draw)."""
        with torch.device("meta"):  # the placeholder parameters of __init__ cost neither memory nor RNG draws
            new = cls(ex.num_experts, ex.in_dim, ex.hidden_dim, ex.dispatch)
        new.w1, new.w3, new.w2 = ex.w1, ex.w3, ex.w2
        new._make_norms(in_norm, eps, ex.w1.device)
        return new

    def ternary(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"w1"|"w3"|"w2": (int8 levels of the stacked weight, gamma [E] float32)}."""
        out = {}
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):
                levels, gamma = quantize_weight(getattr(self, name), self.num_experts)
                out[name] = (levels.to(torch.int8), gamma)
        return out

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                capacity: int | None = None, priority: str = "token"):  # noqa: ANN201 - as Experts.forward
        if self.in_norm is not None:
            with torch.autocast(x.device.type, enabled=False):
                x = F.rms_norm(x.float(), (self.in_dim,), self.in_norm.weight.float(), self.eps)
        return super().forward(x, indices, weights, capacity, priority)

    def resolved_dispatch(self, x: torch.Tensor) -> RowsImplementation:
        """As `Experts.resolved_dispatch`, for the dtype the quantised levels are multiplied in; through the rows
        seam's `rows_dispatch` (this class's experts have no scatter kernels: "scatter" runs as auto without it)."""
        return rows_dispatch(self.dispatch, x.device, self.in_dim, self.hidden_dim, quant_dtypes(x)[0])

    def _run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        mm, out = quant_dtypes(xs)
        grouped = self.resolved_dispatch(xs) == "grouped_mm"
        with torch.autocast(xs.device.type, enabled=False):
            qx, sx = quantize_act(xs.float())  # [S', Din], [S', 1]: one scale per assignment row
            (q1, g1), (q3, g3), (q2, g2) = (quantize_weight(w, E) for w in (self.w1, self.w3, self.w2))
            gains = self.w2_norm.weight.float()  # [E, F]
            if grouped:
                S = xs.shape[0]
                offs = torch.cumsum(counts, 0).to(torch.int32)
                row_e = torch.repeat_interleave(torch.arange(E, device=xs.device), counts, output_size=S)  # [S']
                acc = [F.grouped_mm(qx.to(mm), q.to(mm), offs=offs).float() for q in (q1, q3)]
                qh, sh = expert_rows(sx, acc, g1[row_e, None], g3[row_e, None], gains[row_e], self.eps)
                y = dequant(F.grouped_mm(qh.to(mm), q2.to(mm), offs=offs).float(), g2[row_e, None], sh)
                return y.to(out)
            sizes = counts.tolist()  # the one host sync of the layer
            outs = []
            groups = zip(qx.to(mm).split(sizes), sx.split(sizes), q1.to(mm).unbind(0), q3.to(mm).unbind(0),
                         q2.to(mm).unbind(0), g1.unbind(0), g3.unbind(0), g2.unbind(0), gains.unbind(0))
            for qxe, sxe, w1, w3, w2, a1, a3, a2, gain in groups:
                if qxe.shape[0] == 0:
                    continue
                qh, sh = expert_rows(sxe, ((qxe @ w1).float(), (qxe @ w3).float()), a1, a3, gain, self.eps)
                outs.append(dequant((qh.to(mm) @ w2.to(mm)).float(), a2, sh))
            if not outs:
                return xs.new_zeros(0, self.in_dim, dtype=out)
            return torch.cat(outs, dim=0).to(out)


def router_args(r: TopKRouter) -> tuple:
    """TopKRouter constructor arguments that rebuild r's settings (scoring, bias, top-k, ...) in a twin."""
    return (r.weight.shape[1], r.num_experts, r.top_k, r.renormalize, r.jitter, r.scoring,
            r.expert_bias is not None, r.bias_rate)


class BitRouter(TopKRouter):
    """The router with a ternary gate and 8-bit inputs (ablation only: `router=True` / ModelConfig.bitnet_router).

    Only the logits differ: scoring, bias, top-k and renormalisation are TopKRouter.route."""

    @classmethod
    def from_router(cls, r: TopKRouter) -> "BitRouter":
        """The BitNet twin of `r`, sharing its weight Parameter and its aux-loss-free bias (no copy, no draw)."""
        with torch.device("meta"):
            new = cls(*router_args(r))
        new.weight, new.expert_bias = r.weight, r.expert_bias
        return new

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            levels, gamma = quantize_weight(self.weight)
        return levels.to(torch.int8), gamma

    def project(self, x32: torch.Tensor) -> torch.Tensor:  # [N, Din] float32 -> [N, E] float32, autocast off
        qx, sx = quantize_act(x32)
        qw, gamma = quantize_weight(self.weight)
        return dequant(F.linear(qx, qw), gamma, sx)


# ----------------------------------------------------------------------------------------------------------
# Conversion


def convert(model: nn.Module, router: bool = False, eps: float | None = None, head_merge: bool = True) -> nn.Module:
    """Swap, in place, every projection of `model` (a Transformer, Block, MoELayer, SwiGLU, ...) for BitNet modules.

    The weight Parameters are kept (same objects, same values), sub-norm gains start at 1 and nothing draws from
    the RNG, so a converted model equals the full-precision one at init. `router` also quantises MoE routers;
    `eps` is the sub-norms' epsilon (default: the model's norm_eps, else 1e-5). `head_merge=False` keeps MH-MoE's
    head and merge in full precision (the authors' BitNet runs). Idempotent. Returns `model`.
    """
    if eps is None:
        eps = getattr(getattr(model, "cfg", None), "norm_eps", 1e-5)
    for mod in list(model.modules()):
        if isinstance(mod, Attention):
            if not isinstance(mod.qkv, BitLinear):
                mod.qkv = BitLinear.from_linear(mod.qkv, groups=3, eps=eps)  # q, k, v: one gamma each
            if not isinstance(mod.out, BitLinear):
                mod.out = BitLinear.from_linear(mod.out, sub_norm=True, eps=eps)
        elif isinstance(mod, SwiGLU):  # dense FFNs and shared experts
            for name in ("w1", "w3", "w2"):
                if not isinstance(getattr(mod, name), BitLinear):
                    setattr(mod, name, BitLinear.from_linear(getattr(mod, name), sub_norm=name == "w2", eps=eps))
        elif isinstance(mod, MoELayer):
            if head_merge and mod.head is not None and not isinstance(mod.head, BitLinear):
                mod.head = BitLinear.from_linear(mod.head, eps=eps)
            if head_merge and mod.merge is not None and not isinstance(mod.merge, BitLinear):
                mod.merge = BitLinear.from_linear(mod.merge, sub_norm=True, eps=eps)
            if not isinstance(mod.experts, BitExperts):
                mod.experts = BitExperts.from_experts(mod.experts, in_norm=mod.head is not None, eps=eps)
            if router and not isinstance(mod.router, BitRouter):
                mod.router = BitRouter.from_router(mod.router)
    # A projection added to the model later must be classified here, not silently left in full precision.
    kept = ("lm_head",) if head_merge else ("lm_head", ".head", ".merge")  # full precision on purpose
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(kept)]
    if left:
        raise NotImplementedError(f"mhmoe.bitnet.modules.convert: no BitNet rule for nn.Linear {left[0]!r}")
    return model
