"""Decoder-only Transformer language model with dense, SMoE and MH-MoE FFNs (section 3 of the paper).

Pre-norm blocks: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)); causal self-attention with RoPE through
`F.scaled_dot_product_attention`; the FFN of every `moe_every`-th block is `moe_ffn`, the others `dense_ffn`.
Aux losses of all MoE layers are summed into the training loss (each already carries its coefficient).
With targets, the token cross-entropy comes from the final hidden states and the LM head's weight through
`linear_cross_entropy` (mhmoe/layers/loss.py), chunk by chunk, so a training forward never holds the [B*T, V]
logits and returns none; without targets (evaluation, generation) the forward returns the logits.

Shape legend: B batch, T time, P cached positions, D model dim, A attention heads, Dh = D / A, V vocab.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.bitnet.modules import convert
from mhmoe.configbase import Config
from mhmoe.errors import ConfigError
from mhmoe.layers.attention import Attention, KVCache, rope_tables
from mhmoe.layers.build import build_ffn
from mhmoe.layers.config import FFNConfig, MoEAux
from mhmoe.layers.loss import linear_cross_entropy
from mhmoe.layers.norm import RMSNorm
from mhmoe.layers.router import XMOE_DIM, XMOE_INIT_GAIN
from mhmoe.layers.sorted_experts import compute_dtype
from mhmoe.profiling import ATTENTION, BLOCK, HEAD_MERGE, label


@dataclass(frozen=True)
class ModelConfig(Config):
    """A decoder-only LM. `moe_ffn` with kind="dense" gives the dense baseline."""

    vocab_size: int = 8192
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    max_seq_len: int = 1024
    moe_every: int = 2
    dense_ffn: FFNConfig = field(default_factory=lambda: FFNConfig(kind="dense", dim=768, hidden_dim=2048))
    moe_ffn: FFNConfig = field(default_factory=lambda: FFNConfig(kind="moe", dim=768, hidden_dim=2048))
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # How the D x D head and merge projections start (docs/REPRODUCTION.md, "What changed"): "fan_in" = N(0, 1/D),
    # norm-preserving (the variance of the authors' Xavier init for a square matrix), the merge not residual-
    # scaled since the experts' W2 already is; "init_std" = N(0, init_std) with the merge residual-scaled as well,
    # the behaviour before the fairness fix, which starts MH-MoE's block output ~1e4 weaker than SMoE's;
    # "xavier" = the authors' code: Xavier-uniform, gain 1/sqrt(2) for the head and 1 for the merge, the head's
    # bias (FFNConfig.head_merge_bias) nn.Linear's default U(+-1/sqrt(D)), the merge's 0. Biases start at 0 under
    # the other two.
    head_merge_init: Literal["fan_in", "init_std", "xavier"] = "fan_in"
    # How the routed experts and the router's gate start: "normal" = N(0, init_std), the experts' W2 residual-
    # scaled by 1/sqrt(2 n_layers) (GPT-2); "kaiming_uniform" = torch's nn.Linear default U(+-1/sqrt(fan_in)) for
    # W1, W3, W2 and the gate, as the authors' experts (`ffn_init_method`) and their gate (a default nn.Linear).
    moe_init: Literal["normal", "kaiming_uniform"] = "normal"
    merge_after_residual: bool = False
    bitnet: bool = False  # BitNet b1.58 twin (Table 3): ternary weights, 8-bit activations; see mhmoe.bitnet
    bitnet_router: bool = False  # with bitnet, quantise the MoE routers too (ablation; full precision otherwise)
    # with bitnet, quantise MH-MoE's head and merge projections (ours); False keeps them full precision, as the
    # authors' plain nn.Linear head and merge in their BitNet runs
    bitnet_head_merge: bool = True

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "moe_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError(
                f"ModelConfig.n_heads: dim ({self.dim}) / n_heads ({self.n_heads}) must be an even integer (RoPE)"
            )
        for name in ("dense_ffn", "moe_ffn"):
            if getattr(self, name).dim != self.dim:
                raise ConfigError(f"ModelConfig.{name}.dim: must equal ModelConfig.dim ({self.dim})")
        if self.dense_ffn.kind != "dense":
            raise ConfigError("ModelConfig.dense_ffn.kind: must be 'dense'")
        if self.merge_after_residual and not (self.moe_ffn.kind == "moe" and self.moe_ffn.merge_layer):
            raise ConfigError("ModelConfig.merge_after_residual: needs moe_ffn.merge_layer=true")
        if self.bitnet_router and not self.bitnet:
            raise ConfigError("ModelConfig.bitnet_router: only applies with bitnet=true (set model.bitnet=true first)")
        if self.bitnet_router and self.moe_ffn.kind == "moe" and self.moe_ffn.scoring == "xmoe":
            raise ConfigError("ModelConfig.bitnet_router: no BitNet form of the X-MoE gate; set bitnet_router=false "
                              "or moe_ffn.scoring='softmax'")
        if self.bitnet and self.bitnet_head_merge and self.moe_ffn.kind == "moe" and self.moe_ffn.head_merge_bias:
            raise ConfigError("ModelConfig.bitnet_head_merge: b1.58 layers have no bias, and moe_ffn.head_merge_bias "
                              "is set; set bitnet_head_merge=false (full-precision head and merge, as the authors)")

    def is_moe_block(self, i: int) -> bool:
        """Blocks moe_every-1, 2*moe_every-1, ... (0-based) carry the MoE FFN: every second layer by default."""
        return self.moe_ffn.kind == "moe" and (i + 1) % self.moe_every == 0

    def ffn_config(self, i: int) -> FFNConfig:
        return self.moe_ffn if self.is_moe_block(i) else self.dense_ffn


def _uniform(shape: torch.Size, bound: float, gen: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) float32 on the CPU from `gen` (as nn.init's uniform inits, with the parameter's own
    generator)."""
    return torch.rand(shape, generator=gen, dtype=torch.float32, device="cpu").mul_(2 * bound).sub_(bound)


# The 16-bit dtypes whose RoPE tables are cached (Transformer.rope); any other dtype rotates in float32.
ROPE_16BIT = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None for a forward with targets (unless return_logits=True)
    loss: torch.Tensor | None  # ce_loss + aux_loss, when targets were given
    ce_loss: torch.Tensor | None  # mean token cross-entropy
    aux_loss: torch.Tensor  # sum over MoE layers of their weighted aux losses
    aux: list[MoEAux]  # one per MoE block, in depth order


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = build_ffn(cfg.ffn_config(layer))
        self.is_moe = cfg.is_moe_block(layer)
        self.merge_after_residual = cfg.merge_after_residual and self.is_moe

    def forward(self, x: torch.Tensor, cos, sin, cache: KVCache | None,  # noqa: ANN001
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        with label(BLOCK):  # profiler ranges (mhmoe.profiling); no-ops unless a profiler records eager code
            with label(ATTENTION):
                a = self.attn(self.attn_norm(x), cos, sin, cache, mask)
            x = x + a
            if self.merge_after_residual:  # the alternative placement: W_merge applied to (x + y') instead of y'
                y, aux = self.ffn(self.ffn_norm(x), apply_merge=False)
                with label(HEAD_MERGE):
                    return self.ffn.merge(x + y), aux
            y, aux = self.ffn(self.ffn_norm(x))
            return x + y, aux


class Transformer(nn.Module):
    """The language model. forward(idx[B, T], targets[B, T] | None) -> ModelOutput."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Drawn before any submodule is built: their constructors consume torch's generator by amounts that
        # differ per variant, and the init must depend on the seed alone (reset_parameters).
        init_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # RoPE tables [max_seq_len, Dh/2]: float32, and copies rounded once to each 16-bit dtype (`rope`).
        for dtype, suffix in ((torch.float32, ""), *((d, f"_{n}") for d, n in ROPE_16BIT.items())):
            for part in ("cos", "sin"):
                table = torch.empty(cfg.max_seq_len, cfg.dim // cfg.n_heads // 2, dtype=dtype)
                self.register_buffer(f"rope_{part}{suffix}", table, persistent=False)
        self.init_rope()
        self.reset_parameters(init_seed)
        if cfg.bitnet:  # swap in the BitNet modules around the initialised weights: same init as the fp model
            convert(self, router=cfg.bitnet_router, head_merge=cfg.bitnet_head_merge)

    @torch.no_grad()
    def init_rope(self) -> None:
        """Fill the RoPE buffers (in place, on their device): the float32 tables and their 16-bit copies."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for dtype, name in ROPE_16BIT.items():
            getattr(self, f"rope_cos_{name}").copy_(cos.to(dtype))
            getattr(self, f"rope_sin_{name}").copy_(sin.to(dtype))

    def rope(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) tables [max_seq_len, Dh/2] to rotate q/k of `dtype` with: for bfloat16/float16 the copies
        cached in that dtype, so q and k rotate without an upcast (apply_rope computes in the tables' dtype); for
        any other dtype the float32 tables (float32 runs: the same numbers as ever)."""
        name = ROPE_16BIT.get(dtype)
        if name is None:
            return self.rope_cos, self.rope_sin
        return getattr(self, f"rope_cos_{name}"), getattr(self, f"rope_sin_{name}")

    def uses_fused_loss(self) -> bool:
        """Whether the loss goes through `linear_cross_entropy` (a plain bias-free LM head) rather than logits."""
        return type(self.lm_head) is nn.Linear and self.lm_head.bias is None

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2 init: N(0, init_std), norms 1, projections into the residual stream (attention out, every
        SwiGLU W2, the experts' W2) N(0, init_std / sqrt(2 n_layers)); head and merge per `head_merge_init`,
        experts and gate per `moe_init`; an X-MoE gate's expert embeddings orthogonal with gain 0.32.

        Every parameter draws from its own generator, seeded by (seed, parameter name): two variants built with
        the same seed start with identical embeddings, attention and dense FFNs, whatever their MoE blocks hold,
        so seeds pair the variants' shared modules as well as their data order. seed=None draws the base seed
        from torch's global generator; the constructor draws its seed first thing, so `torch.manual_seed(s)`
        before construction fixes the init.
        """
        cfg = self.cfg
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))
        std = cfg.init_std
        resid_std = std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if p.is_meta:  # built on the meta device to be loaded (from_pretrained, export): no values to draw
                continue
            gen = torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            fan_in = p.shape[1] if p.dim() > 1 else cfg.dim
            if name.endswith((".head.weight", ".merge.weight")) and cfg.head_merge_init == "xavier":
                gain = 1 / math.sqrt(2) if name.endswith(".head.weight") else 1.0  # theirs, tutel_moe_layer
                p.copy_(_uniform(p.shape, gain * math.sqrt(6 / (p.shape[0] + p.shape[1])), gen))
                continue
            if name.endswith(".head.bias") and cfg.head_merge_init == "xavier":
                p.copy_(_uniform(p.shape, 1 / math.sqrt(cfg.dim), gen))  # nn.Linear's default bias: not re-set
                continue
            if name.endswith((".head.bias", ".merge.bias")):
                p.zero_()
                continue
            if name.endswith(".router.weight") and p.shape[1] == XMOE_DIM and self._xmoe(name):
                p.copy_(torch.nn.init.orthogonal_(torch.empty(p.shape), XMOE_INIT_GAIN, generator=gen))
                continue
            if cfg.moe_init == "kaiming_uniform" and name.endswith(
                    ("experts.w1", "experts.w3", "experts.w2", ".router.weight", ".router.reduction")):
                p.copy_(_uniform(p.shape, 1 / math.sqrt(fan_in), gen))  # kaiming_uniform_(a=sqrt(5))
                continue
            if name.endswith((".head.weight", ".merge.weight")) and cfg.head_merge_init == "fan_in":
                p_std = 1.0 / math.sqrt(fan_in)  # eq. (2)/(4): x W_head keeps |x| (E|xW|^2 = |x|^2)
            elif name.endswith(("attn.out.weight", ".w2.weight", "experts.w2", "merge.weight")):
                p_std = resid_std  # once per residual branch: for MH-MoE that is the experts' W2, not the merge
            else:
                p_std = std
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu").mul_(p_std))

    def _xmoe(self, name: str) -> bool:
        """Whether parameter `name` belongs to an X-MoE gate."""
        return getattr(self.get_submodule(name.rsplit(".", 1)[0]), "reduction", None) is not None

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
        return_logits: bool = False,
    ) -> ModelOutput:
        """idx [B, T] -> ModelOutput. With targets [B, T]: the mean token cross-entropy (ce_loss) plus the aux
        losses (loss), through the chunked `linear_cross_entropy`, and logits None; return_logits=True computes
        the full logits as well and takes the loss from them (F.cross_entropy on float32 logits: the reference).
        Without targets: the logits [B, T, V]."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds ModelConfig.max_seq_len ({self.cfg.max_seq_len})")
        x = self.embed(idx)  # [B, T, D]
        cos, sin = self.rope(compute_dtype(x))  # the dtype q and k come out of the qkv projection in
        cos, sin = cos[start : start + T], sin[start : start + T]  # [T, Dh/2]
        auxes: list[MoEAux] = []
        aux_loss = torch.zeros((), device=idx.device)
        for block in self.blocks:
            x, aux = block(x, cos, sin, cache)
            if block.is_moe:
                auxes.append(aux)
                aux_loss = aux_loss + aux.loss
        if cache is not None:
            cache.pos += T
        h = self.norm(x)  # [B, T, D]
        logits = ce = loss = None
        if targets is None or return_logits or not self.uses_fused_loss():
            logits = self.lm_head(h)  # [B, T, V]
        if targets is not None:
            if logits is not None:
                ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            else:  # [B*T, V] never materialised: chunks of rows, gradients for h and W computed chunk by chunk
                ce = linear_cross_entropy(h, self.lm_head.weight, targets)
            loss = ce + aux_loss
        return ModelOutput(logits=logits, loss=loss, ce_loss=ce, aux_loss=aux_loss, aux=auxes)

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        use_cache: bool = True, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of idx [B, T]; temperature 0 means greedy. Returns [B, T + max_new_tokens]."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        if idx.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(
                f"max_new_tokens: prompt ({idx.shape[1]}) + new tokens ({max_new_tokens}) exceed max_seq_len "
                f"({self.cfg.max_seq_len})"
            )
        cache = KVCache(self.cfg.n_layers) if use_cache else None
        out = idx
        step_input = idx
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else out, cache=cache).logits[:, -1, :].float()  # [B, V]
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            step_input = nxt
        return out
