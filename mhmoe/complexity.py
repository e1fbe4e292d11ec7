"""Parameter and FLOP calculator for the layer family, and the section 2.3 SMoE -> MH-MoE parity recipe.

FLOPs here are 2 x multiply-accumulates of the matmuls (the convention of `torch.utils.flop_counter`), per
token. Leading terms with SwiGLU (3 matrices per expert), in multiply-accumulates:
    SMoE     3 * D * F * K
    MH-MoE   2 * D^2 + 3 * D * F' * K'        (head + merge, then h sub-tokens of D/h through K' experts)
so FLOPs parity gives  F' = (F * K - 2 D / 3) / K'     (eq. (8) with the SwiGLU factor)
and parameter parity   3 D F E = 2 D^2 + 3 (D/h) F' E'  (eq. (9) with the SwiGLU factor).
The paper's own scalar-multiplication counts, eq. (6)/(7), are given by `paper_scalar_mults`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from mhmoe.layers.config import FFNConfig
from mhmoe.layers.router import XMOE_DIM
from mhmoe.model import ModelConfig


@dataclass(frozen=True)
class Breakdown:
    """Counts split by component; `experts` is all experts for params, the K activated ones for FLOPs."""

    head: int = 0
    router: int = 0
    experts: int = 0
    shared: int = 0
    merge: int = 0
    dense: int = 0

    @property
    def total(self) -> int:
        return self.head + self.router + self.experts + self.shared + self.merge + self.dense

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def param_count(cfg: FFNConfig) -> Breakdown:
    """Exact number of parameters of `build_ffn(cfg)`."""
    if cfg.kind == "dense":
        return Breakdown(dense=3 * cfg.dim * cfg.hidden_dim)
    d, dh = cfg.dim, cfg.head_dim
    proj = d * d + (d if cfg.head_merge_bias else 0)
    return Breakdown(
        head=proj if cfg.head_layer else 0,
        router=router_params(cfg),
        experts=cfg.num_experts * 3 * dh * cfg.hidden_dim,
        shared=3 * d * cfg.shared_hidden_dim,
        merge=proj if cfg.merge_layer else 0,
    )


def router_params(cfg: FFNConfig) -> int:
    """The gate's parameters: E x D/h, or for X-MoE the reduction D/h x 16 and the expert embeddings E x 16."""
    if cfg.scoring == "xmoe":
        return XMOE_DIM * (cfg.head_dim + cfg.num_experts)
    return cfg.head_dim * cfg.num_experts


def active_param_count(cfg: FFNConfig) -> int:
    """Parameters one token can touch: head, router, its h*K routed experts (at most E), shared expert, merge."""
    p = param_count(cfg)
    if cfg.kind == "dense":
        return p.total
    routed = min(cfg.num_experts, cfg.heads * cfg.top_k) * 3 * cfg.head_dim * cfg.hidden_dim
    return p.head + p.router + routed + p.shared + p.merge


def flops_per_token(cfg: FFNConfig) -> Breakdown:
    """Matmul FLOPs (2 x MACs) per token of a forward pass; dropless routing makes this exact."""
    d = cfg.dim
    if cfg.kind == "dense":
        return Breakdown(dense=2 * 3 * d * cfg.hidden_dim)
    # h sub-tokens of D/h each: router h * (D/h) * E = D * E; experts h * K * 3 * (D/h) * F = 3 * D * F * K.
    return Breakdown(
        head=2 * d * d if cfg.head_layer else 0,
        router=2 * cfg.heads * router_params(cfg),  # per sub-token one pass through the gate's matrices
        experts=2 * 3 * d * cfg.hidden_dim * cfg.top_k,
        shared=2 * 3 * d * cfg.shared_hidden_dim,
        merge=2 * d * d if cfg.merge_layer else 0,
    )


def paper_scalar_mults(cfg: FFNConfig, tokens: int = 1) -> dict[str, int]:
    """The paper's eq. (6) (MH-MoE) / eq. (7) (SMoE) count for B=`tokens`, with its 2-matrix FFN of eq. (5).

    Head 2Bd^2 - Bd, activated experts (4Bd d_moe - Bd - Bd_moe) k, merge 2Bd^2 - Bd. The paper counts
    multiplications and additions of a d x d product as 2d^2 - d, i.e. FLOPs without the last addition.
    """
    B, d, dm, k = tokens, cfg.dim, cfg.hidden_dim, cfg.top_k
    head = 2 * B * d * d - B * d if cfg.head_layer else 0
    experts = (4 * B * d * dm - B * d - B * dm) * k
    merge = 2 * B * d * d - B * d if cfg.merge_layer else 0
    return {"head": head, "experts": experts, "merge": merge, "total": head + experts + merge}


def count_flops(module: torch.nn.Module, *args: torch.Tensor) -> int:
    """FLOPs of `module(*args)` measured by torch.utils.flop_counter (grouped_mm formula registered)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_grouped_mm_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args)
    return counter.get_total_flops()


_GROUPED_MM_REGISTERED = False


def _register_grouped_mm_flops() -> None:
    """FlopCounterMode has no formula for aten._grouped_mm (counts 0); 2D x 3D with offsets = 2 * M * K * N."""
    global _GROUPED_MM_REGISTERED
    if _GROUPED_MM_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.aten._grouped_mm)
    def _grouped_mm_flop(a_shape, b_shape, *args, **kwargs) -> int:  # noqa: ANN001
        # a: [M, K] rows grouped by offsets, b: [G, K, N]: every row meets exactly one group's matrix.
        return 2 * a_shape[0] * a_shape[-1] * b_shape[-1]

    _GROUPED_MM_REGISTERED = True


# ----------------------------------------------------------------------------------------------------------
# Section 2.3: turn an SMoE into an FLOPs- and parameter-matched MH-MoE.


@dataclass(frozen=True)
class ParityResult:
    """Outcome of `solve_parity`: both configs, the unrounded solutions and the achieved ratios."""

    smoe: FFNConfig
    mhmoe: FFNConfig
    hidden_exact: float  # F' before rounding, eq. (8)
    experts_exact: float  # E' before rounding, eq. (9)
    hidden_multiple: int
    expert_multiple: int
    count_head_merge: bool

    @property
    def flops_ratio(self) -> float:
        return flops_per_token(self.mhmoe).total / flops_per_token(self.smoe).total

    @property
    def params_ratio(self) -> float:
        return param_count(self.mhmoe).total / param_count(self.smoe).total

    @property
    def leading_flops_ratio(self) -> float:
        """Ratio of the leading terms only (experts + head + merge; router excluded), as in the paper."""
        m, s = flops_per_token(self.mhmoe), flops_per_token(self.smoe)
        return (m.total - m.router) / (s.total - s.router)

    def to_json(self) -> dict:
        def cfg_json(c: FFNConfig) -> dict:
            return {
                "dim": c.dim, "hidden_dim": c.hidden_dim, "num_experts": c.num_experts, "top_k": c.top_k,
                "heads": c.heads, "head_layer": c.head_layer, "merge_layer": c.merge_layer,
                "params": param_count(c).as_dict(), "active_params": active_param_count(c),
                "flops_per_token": flops_per_token(c).as_dict(),
                "paper_scalar_mults_per_token": paper_scalar_mults(c)["total"],
            }

        return {
            "smoe": cfg_json(self.smoe), "mhmoe": cfg_json(self.mhmoe),
            "hidden_dim_exact": self.hidden_exact, "num_experts_exact": self.experts_exact,
            "hidden_multiple": self.hidden_multiple, "expert_multiple": self.expert_multiple,
            "count_head_merge_params": self.count_head_merge,
            "flops_ratio": self.flops_ratio, "leading_flops_ratio": self.leading_flops_ratio,
            "params_ratio": self.params_ratio,
        }


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)


def solve_parity(
    dim: int, hidden_dim: int, num_experts: int, top_k: int, heads: int, *,
    top_k_new: int | None = None, hidden_multiple: int | None = None, expert_multiple: int | None = None,
    count_head_merge: bool = True, head_layer: bool = True, merge_layer: bool = True,
    shared_hidden_dim: int = 0, flops_tolerance: float = 0.02, router_aware: bool | None = None,
) -> ParityResult:
    """Section 2.3 recipe: the MH-MoE (F', K', E') matching an SMoE in FLOPs and, as closely as integers
    allow, in parameters.

    F' comes from eq. (8) (leading terms, as the paper does). Only when the router of the many small experts
    then costs more than `flops_tolerance` of the total (very fine-grained inputs) is F' re-solved with the
    router FLOPs included.

    Args:
        dim, hidden_dim, num_experts, top_k: the SMoE (D, F, E, K).
        heads: h of the MH-MoE.
        top_k_new: K' (default h * K, as the paper does).
        hidden_multiple: round F' to a multiple of this; None picks the largest power of two <= 256 that keeps
            the total FLOPs ratio within `flops_tolerance` (for the paper's d=768 that is 256).
        expert_multiple: round E' to the nearest multiple of this; None picks the largest of 8, 4, 2, 1 that
            keeps E' within 4% of exact parameter parity (8 gives the paper's 40 and 96: exact 41.3 and 93.0).
        count_head_merge: include the 2 D^2 head/merge parameters in the parameter budget (eq. (9)).
        head_layer, merge_layer: whether the MH-MoE has them (their FLOPs are always paid for by smaller F').
        shared_hidden_dim: a shared expert of this width added to both models (does not affect the solution).
        router_aware: True always includes router FLOPs when solving F'; False never does (the paper's eq. (8),
            as the presets use so that every scale keeps section 3's sizes); None does so only when eq. (8)
            misses the total FLOPs by more than `flops_tolerance`.
    """
    if dim % heads:
        raise ValueError(f"heads: dim ({dim}) must be divisible by heads ({heads})")
    k_new = top_k_new if top_k_new is not None else heads * top_k
    if k_new < 1:
        raise ValueError(f"top_k_new: must be >= 1, got {k_new}")
    if (hidden_multiple is not None and hidden_multiple < 1) or (expert_multiple is not None and expert_multiple < 1):
        raise ValueError("hidden_multiple/expert_multiple: must be >= 1")
    dh = dim // heads
    proj = (int(head_layer) + int(merge_layer)) * dim * dim  # MACs and params of head + merge
    smoe = FFNConfig(
        kind="moe", dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k,
        shared_hidden_dim=shared_hidden_dim,
    )
    smoe_params = param_count(smoe)
    smoe_macs = (flops_per_token(smoe).total - flops_per_token(smoe).shared) // 2  # routed part only

    def experts_for_exact(hidden_new: float) -> float:  # eq. (9), SwiGLU form, routers included
        budget = smoe_params.total - smoe_params.shared - (proj if count_head_merge else 0)
        return budget / (3 * dh * hidden_new + dh)

    def experts_for(hidden_new: int) -> tuple[float, int]:
        exact = experts_for_exact(hidden_new)
        for m in [expert_multiple] if expert_multiple else [8, 4, 2, 1]:
            e_new = max(k_new, _round_to(exact, m))
            if expert_multiple or abs(e_new / exact - 1) <= 0.04:
                return exact, e_new
        return exact, max(k_new, round(exact))

    def build(hidden_new: int) -> tuple[FFNConfig, float]:
        _, e_new = experts_for(hidden_new)
        cfg = FFNConfig(
            kind="moe", dim=dim, hidden_dim=hidden_new, num_experts=e_new, top_k=k_new, heads=heads,
            head_layer=head_layer, merge_layer=merge_layer, shared_hidden_dim=shared_hidden_dim,
        )
        return cfg, flops_per_token(cfg).total / flops_per_token(smoe).total

    def rounded(hidden_exact: float) -> tuple[FFNConfig, int]:
        # Largest multiple whose leading-term error stays within 1% (F' = 768 and 512 for the paper's d=768).
        multiples = [hidden_multiple] if hidden_multiple else [256, 128, 64, 32, 16, 8, 4, 2]
        for m in multiples:
            h_new = _round_to(hidden_exact, m)
            if hidden_multiple or abs(h_new / hidden_exact - 1) <= 0.01:
                return build(h_new)[0], m
        return build(max(1, round(hidden_exact)))[0], 1

    hidden_exact = (3 * dim * hidden_dim * top_k - proj) / (3 * dim * k_new)  # eq. (8), SwiGLU form
    if hidden_exact <= 0:
        raise ValueError(
            "hidden_dim: the SMoE's expert FLOPs (3*D*F*K) do not cover the 2*D^2 of the head and merge layers; "
            "use a larger hidden_dim or top_k, or drop head_layer/merge_layer"
        )
    found = rounded(hidden_exact)
    off = abs(build(found[0].hidden_dim)[1] - 1) > flops_tolerance
    if router_aware or (router_aware is None and hidden_multiple is None and off):
        # Router-aware: total MACs 2D^2 + 3 D F' K' + D E'(F') = the SMoE's. The map F -> g(F) is increasing
        # and g(F) < F at eq. (8)'s F, so iterating from there descends to the largest fixed point, if any.
        f = hidden_exact
        for _ in range(500):
            f_next = (smoe_macs - proj - dim * experts_for_exact(f)) / (3 * dim * k_new)
            if f_next < 1:
                raise ValueError(
                    f"heads: no MH-MoE with h={heads} matches this SMoE's FLOPs: the router over the "
                    f"~{experts_for_exact(hidden_exact):,.0f} small experts parameter parity needs costs more "
                    "than the whole FLOP budget; use fewer heads or fewer, larger SMoE experts"
                )
            if abs(f_next - f) < 1e-9:
                break
            f = f_next
        hidden_exact = f
        found = rounded(hidden_exact)
    mhmoe, multiple = found
    e_exact = experts_for_exact(mhmoe.hidden_dim)
    e_multiple = expert_multiple or next(m for m in (8, 4, 2, 1) if mhmoe.num_experts % m == 0)
    return ParityResult(smoe, mhmoe, hidden_exact, e_exact, multiple, e_multiple, count_head_merge)


def fine_grained(cfg: FFNConfig, granularity: int = 2) -> FFNConfig:
    """Fine-grained SMoE: experts split `granularity` ways (F/g hidden, g*E experts, g*K top-k); same FLOPs
    and parameters up to the router. The paper's 16 x 1024 top-2 is granularity 2 of 8 x 2048 top-1."""
    if cfg.hidden_dim % granularity:
        raise ValueError(f"granularity: hidden_dim ({cfg.hidden_dim}) must be divisible by {granularity}")
    return cfg.replace(
        hidden_dim=cfg.hidden_dim // granularity, num_experts=cfg.num_experts * granularity,
        top_k=cfg.top_k * granularity,
    )


# Well-known SMoE layers (D, F, E, K), for `mhmoe parity --preset NAME`.
SMOE_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "paper": (768, 2048, 8, 1),  # MH-MoE paper, section 3
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "mixtral-8x22b": (6144, 16384, 8, 2),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4),
}


def model_param_count(cfg: "ModelConfig") -> dict[str, int]:
    """Exact parameters of `Transformer(cfg)` (tied embedding counted once), and those active per token."""
    d, L = cfg.dim, cfg.n_layers
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    attn = L * (4 * d * d)
    norms = (2 * L + 1) * d
    ffn_total = ffn_active = 0
    for i in range(L):
        f = cfg.ffn_config(i)
        ffn_total += param_count(f).total
        ffn_active += active_param_count(f)
    total = embed + head + attn + norms + ffn_total
    return {"total": total, "active": total - ffn_total + ffn_active, "embedding": embed + head,
            "non_embedding": total - embed - head}


def model_flops_per_token(cfg: "ModelConfig", seq_len: int | None = None) -> int:
    """Forward matmul FLOPs per token of `Transformer(cfg)`: projections, FFNs, LM head, and (if seq_len is
    given) the causal attention scores and values, 2 * 2 * D * (seq_len + 1) / 2 per layer on average."""
    d, L = cfg.dim, cfg.n_layers
    total = L * 2 * 4 * d * d + 2 * d * cfg.vocab_size
    total += sum(flops_per_token(cfg.ffn_config(i)).total for i in range(L))
    if seq_len:
        total += L * 2 * d * (seq_len + 1)
    return total
