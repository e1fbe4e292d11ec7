"""The FFN layer family: one config (`FFNConfig`), one builder (`build_ffn`), one aux record (`MoEAux`).

    kind="dense"            SwiGLU FFN  (silu(x W1) * (x W3)) W2                         eq. (5), SwiGLU form
    kind="moe", heads=1     SMoE / fine-grained SMoE: router + E SwiGLU experts         eq. (1)
    kind="moe", heads=h     MH-MoE: head proj, h sub-tokens, shared router, merge proj  eq. (2)-(4)

Shape legend: B batch, T time, D model dim, F hidden dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mhmoe.configbase import Config
from mhmoe.errors import ConfigError

Dispatch = Literal["auto", "sorted", "grouped_mm", "scatter"]
Renormalize = Literal["auto", "always", "never"]
Scoring = Literal["softmax", "sigmoid", "xmoe"]
Balancing = Literal["aux_loss", "bias", "both"]
Threading = Literal["auto", "intra-op", "inter-expert"]
CapacityRule = Literal["token_order", "choice_order"]
BalanceChoices = Literal["all", "first"]


@dataclass(frozen=True)
class FFNConfig(Config):
    """Configuration of one FFN / MoE / MH-MoE layer.

    Attributes:
        kind: "dense" (SwiGLU FFN) or "moe" (routed experts; MH-MoE when heads > 1).
        dim: model dimension D (input and output width of the layer).
        hidden_dim: hidden width F of the dense FFN or of each expert.
        num_experts: E, routed experts (moe only).
        top_k: K, experts per (sub-)token (moe only).
        heads: h, sub-tokens per token; each has D/h features (moe only).
        head_layer: apply the D x D head projection W_head before splitting, eq. (2).
        merge_layer: apply the D x D merge projection W_merge after concatenating, eq. (4).
        shared_hidden_dim: hidden width of an always-on shared expert on the full token; 0 = none.
        renormalize: whether the top-k softmax weights are renormalised to sum to 1. "auto" (default) does so
            when top_k > 1 and keeps the raw softmax probability at top_k = 1; "always" also renormalises top-1
            (weight 1, as Mixtral); "never" keeps the raw probabilities for every k, as the authors' released code
            does (their top-k gate is built without its normalise flag, so its default, off, applies; README,
            "Our defaults and the authors'"). The paper's text is silent. Booleans from older configs load as
            True -> "always", False -> "never".
            With scoring="sigmoid" the same rule decides whether the top-k sigmoid scores are divided by their
            sum (DeepSeek-V3: weights = s_topk / sum s_topk): "auto" normalises at top_k > 1 and keeps the raw
            score s at top_k = 1 (a normalised single score is 1 and the router would learn nothing from the LM
            loss), "always" normalises at every k; "never" is rejected (sigmoid scores are meant to be normalised).
        scoring: how router logits become scores. "softmax" (the paper): p = softmax(logits) over the E experts.
            "sigmoid" (DeepSeek-V3): s_e = sigmoid(logit_e), one independent score per expert; the distribution
            reported and used by the load-balancing loss (its P_e term) and the router entropy is then the
            normalised scores s / sum_e s. "xmoe" (X-MoE, Chi et al. 2022, as the authors' `--use-xmoe` gate): the
            sub-token is projected to 16 dims, and the logits are its dot products with the expert embeddings
            [E, 16] divided by their norms (the embeddings are rescaled to norm 1.5 in place before every
            training forward, as theirs); then softmax as "softmax". Beyond the paper; not in `-authors`.
        balancing: how the load is balanced. "aux_loss" (the paper): lb_coef * the Switch/GShard loss is added to
            the training loss. "bias" (aux-loss-free, DeepSeek-V3): a per-expert bias b (a buffer, not a
            parameter, kept in checkpoints) is added to the scores for the top-k *selection only* (the combine
            weights come from the unbiased scores) and moved after every optimizer step by
            b_e += bias_rate * sign(mean load - load_e) (mhmoe.layers.balancing); the lb loss is still computed
            and reported but not added. "both": the bias and the aux loss.
        bias_rate: the bias update step (DeepSeek-V3's gamma); only with balancing "bias" or "both".
        balance_choices: which choices the load-balancing loss counts in f_e: "all" (default) the N*K
            assignments; "first" each (sub-)token's first choice only, E * sum_e mean(p_e) * f_e(first), as the
            authors' `gshard_loss`. Identical at top_k = 1.
        lb_coef: coefficient of the Switch/GShard load-balancing loss.
        z_coef: coefficient of the router z-loss (0 = off).
        jitter: multiplicative input jitter eps for the router in training (0 = off).
        capacity_factor: 0 = dropless (default); > 0 drops the assignments beyond each expert's capacity (slots
            per `capacity_rule`), in training only unless `capacity_in_eval`. A dropped assignment adds nothing
            to its token's output; the other weights are not renormalised.
        capacity_rule: how the slots are counted and filled, for S = N routed (sub-)tokens of one forward call.
            "token_order" (default): ceil(capacity_factor * N * K / E) slots, filled in token order (a token's
            k choices side by side). "choice_order": K * ceil(capacity_factor * N / E) slots, filled with every
            token's first choice, then every token's second choice, ... (GShard; the authors' `topkgating`).
        capacity_in_eval: drop beyond capacity in evaluation too (the authors' runs: their eval capacity fraction
            -1 selects the training formula). Outputs then depend on which tokens share the forward call.
        head_merge_bias: the head and merge projections carry a bias (the authors' nn.Linear(D, D, bias=True)).
        dispatch: "auto" (default: scatter on CUDA in bfloat16/float16 when Triton imports, else grouped_mm on
            CUDA in bfloat16; sorted on CPU, in float32 on CUDA (cuBLAS's matmuls) and wherever neither can run;
            chosen per call for the input's device and compute dtype), "sorted" (sort
            by expert, one fused matmul loop over the contiguous groups, CPU threads; one host sync),
            "grouped_mm" (torch's grouped GEMM over the same sorted layout; no host sync) or "scatter" (Triton
            grouped GEMMs that gather and scatter rows by index, SwiGLU fused; no host sync, no permuted copies;
            needs Triton, any widths). See mhmoe/layers/experts.py.
        recompute: keep no [N*K, F] expert activations for the backward and recompute the experts' W1/W3
            products there instead (less memory, 2/9 more expert matmul FLOPs in training; sorted and scatter
            dispatch).
        threading: how CPU threads share the experts (sorted dispatch; no effect on CUDA or at 1 thread):
            "intra-op" runs one expert after another, each matmul on all torch threads; "inter-expert" runs T
            ranges of experts at once, one thread each; "auto" = inter-expert when there are at least
            16 non-empty experts per thread (MH-MoE's many small experts), else intra-op.
    """

    kind: Literal["dense", "moe"] = "moe"
    dim: int = 768
    hidden_dim: int = 2048
    num_experts: int = 8
    top_k: int = 1
    heads: int = 1
    head_layer: bool = False
    merge_layer: bool = False
    shared_hidden_dim: int = 0
    head_merge_bias: bool = False
    renormalize: Renormalize = "auto"
    scoring: Scoring = "softmax"
    balancing: Balancing = "aux_loss"
    bias_rate: float = 1e-3
    balance_choices: BalanceChoices = "all"
    lb_coef: float = 0.01
    z_coef: float = 0.0
    jitter: float = 0.0
    capacity_factor: float = 0.0
    capacity_rule: CapacityRule = "token_order"
    capacity_in_eval: bool = False
    dispatch: Dispatch = "auto"
    recompute: bool = False
    threading: Threading = "auto"

    def validate(self) -> None:
        if self.dim <= 0:
            raise ConfigError(f"FFNConfig.dim: must be > 0, got {self.dim}")
        if self.hidden_dim <= 0:
            raise ConfigError(f"FFNConfig.hidden_dim: must be > 0, got {self.hidden_dim}")
        if self.shared_hidden_dim < 0:
            raise ConfigError(f"FFNConfig.shared_hidden_dim: must be >= 0 (0 = no shared expert), got {self.shared_hidden_dim}")
        if self.kind == "dense":
            moe_only = {
                "heads": (self.heads, 1), "head_layer": (self.head_layer, False),
                "merge_layer": (self.merge_layer, False), "shared_hidden_dim": (self.shared_hidden_dim, 0),
                "scoring": (self.scoring, "softmax"), "balancing": (self.balancing, "aux_loss"),
                "head_merge_bias": (self.head_merge_bias, False), "balance_choices": (self.balance_choices, "all"),
                "capacity_rule": (self.capacity_rule, "token_order"),
                "capacity_in_eval": (self.capacity_in_eval, False),
            }
            for name, (value, default) in moe_only.items():
                if value != default:
                    raise ConfigError(f"FFNConfig.{name}: only applies to kind='moe'; leave it at {default!r} for a dense FFN")
            return
        if self.num_experts < 1:
            raise ConfigError(f"FFNConfig.num_experts: must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"FFNConfig.top_k: must satisfy 1 <= top_k <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        if self.heads < 1:
            raise ConfigError(f"FFNConfig.heads: must be >= 1, got {self.heads}")
        if self.dim % self.heads != 0:
            raise ConfigError(f"FFNConfig.heads: dim ({self.dim}) must be divisible by heads ({self.heads})")
        for name in ("lb_coef", "z_coef", "capacity_factor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FFNConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if self.dispatch == "grouped_mm" and (self.head_dim % 8 or self.hidden_dim % 8):
            raise ConfigError(
                f"FFNConfig.dispatch: grouped_mm needs dim/heads ({self.head_dim}) and hidden_dim ({self.hidden_dim}) "
                "to be multiples of 8 (16-byte strides); use dispatch='sorted'"
            )
        # dispatch="scatter" has no layout rule: its kernels mask every tile load, so any width and stride runs
        # (tests/unit/test_scatter_experts.py: D/h = 12, F = 20). Whether Triton imports is a property of the
        # machine, not of the config: checked where the layer runs (TritonUnavailableError, one line).
        if self.head_merge_bias and not (self.head_layer or self.merge_layer):
            raise ConfigError("FFNConfig.head_merge_bias: needs head_layer or merge_layer; set one, or leave it False")
        if self.capacity_in_eval and self.capacity_factor == 0:
            raise ConfigError("FFNConfig.capacity_in_eval: drops need a capacity; set capacity_factor > 0 (e.g. 1.0)")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"FFNConfig.jitter: must be in [0, 1), got {self.jitter}")
        if self.scoring == "sigmoid" and self.renormalize == "never":
            raise ConfigError(
                "FFNConfig.renormalize: scoring='sigmoid' normalises its top-k scores (DeepSeek-V3); 'never' applies "
                "to softmax only; use renormalize='auto' (raw score at top_k=1) or 'always'"
            )
        if not self.bias_rate > 0:
            raise ConfigError(f"FFNConfig.bias_rate: must be > 0, got {self.bias_rate}")
        if self.balancing == "bias" and self.renormalizes and self.top_k == 1 and self.z_coef == 0:
            raise ConfigError(
                f"FFNConfig.balancing: 'bias' with top_k=1 and renormalize={self.renormalize!r} gives every token "
                "weight 1 and adds no aux loss, so the router would get no gradient; use renormalize='auto' or "
                "balancing='both'"
            )

    LEGACY = {"renormalize": {True: "always", False: "never"}}  # configs written before it had three modes

    @property
    def renormalizes(self) -> bool:
        """Whether this layer's router renormalises its top-k weights (`renormalize` resolved for top_k)."""
        return self.renormalize == "always" or (self.renormalize == "auto" and self.top_k > 1)

    @property
    def uses_bias(self) -> bool:
        """Whether the router carries the aux-loss-free selection bias (balancing "bias" or "both")."""
        return self.balancing in ("bias", "both")

    @property
    def uses_aux_loss(self) -> bool:
        """Whether lb_coef * the load-balancing loss is added to the training loss (balancing "aux_loss"/"both")."""
        return self.balancing in ("aux_loss", "both")

    @property
    def head_dim(self) -> int:
        """Width D/h of one sub-token (= D for SMoE)."""
        return self.dim // self.heads


@dataclass
class MoEAux:
    """What a layer reports besides its output; zeros for a dense FFN. Every field is a device tensor (no host
    sync in forward); the routing-health fields are defined in mhmoe.layers.routing_stats and docs/ROUTING.md.

    Attributes:
        loss: lb_coef * lb_loss (balancing "aux_loss"/"both") + z_coef * z_loss: add to the training loss.
        lb_loss: Switch/GShard load-balancing loss, E * sum_e f_e P_e over all K choices (1.0 when balanced);
            reported under every balancing mode.
        z_loss: mean squared log-sum-exp of router logits.
        router_entropy: mean entropy (nats) of the router distribution per (sub-)token.
        tokens_per_expert: [E] assignments routed to each expert (before any capacity drop).
        dropped_fraction: fraction of assignments dropped by the capacity limit (0 when dropless).
        load_cv: coefficient of variation std/mean (population std) of tokens_per_expert over the E experts.
        load_max_mean: max/mean of tokens_per_expert.
        expert_activation: fraction of the E experts that receive at least one (sub-)token of a sequence,
            averaged over the batch's sequences (MH-MoE v1, arXiv 2404.15045).
        subtoken_distinct: MH-MoE: fraction of tokens whose h sub-tokens' top-1 experts are pairwise distinct;
            NaN for heads = 1 (undefined).
    """

    loss: torch.Tensor
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    router_entropy: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    load_cv: torch.Tensor
    load_max_mean: torch.Tensor
    expert_activation: torch.Tensor
    subtoken_distinct: torch.Tensor

    @staticmethod
    def zeros(device: torch.device | str = "cpu") -> "MoEAux":
        z = torch.zeros((), device=device)
        return MoEAux(z, z, z, z, torch.zeros(0, dtype=torch.long, device=device), z, z, z, z, z)
