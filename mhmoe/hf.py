"""Hugging Face `transformers` integration: `MHMoEConfig` + `MHMoEForCausalLM`, and `export_hf` for any run.

    import mhmoe.hf                                            # registers model_type "mhmoe" with the Auto classes
    model = AutoModelForCausalLM.from_pretrained(OUT)          # OUT from `mhmoe export RUN_DIR --format hf OUT`
    tok = AutoTokenizer.from_pretrained(OUT)
    model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)

`MHMoEForCausalLM` holds the native `mhmoe.model.Transformer` as `.model` (state-dict keys `model.<native key>`,
safetensors, the tied LM head stored once) and runs its modules, so its logits equal the native model's. It adds
what transformers' callers expect of a causal LM: labels shifted inside (`labels = input_ids`, -100 ignored),
`attention_mask` with left or right padding (padded keys masked, positions counted over real tokens only),
`position_ids`, a `Cache` (DynamicCache by default) for `generate()`, `inputs_embeds`, `logits_to_keep`,
`output_hidden_states`, and Mixtral's router API:
    output_router_logits   return `router_logits` (one [B*T*h, E] tensor per MoE layer: MH-MoE routes
                           sub-tokens, h per token) and `aux_loss`
    aux_loss               sum over MoE layers of the Switch/GShard load-balancing loss (1.0 per layer when
                           balanced), padding excluded; with labels, loss = CE + router_aux_loss_coef * aux_loss
                           + router_z_loss_coef * (sum of router z-losses)
    router_aux_loss_coef   defaults to the run's moe_ffn.lb_coef, 0 for an aux-loss-free run (balancing="bias")
                           (router_z_loss_coef to z_coef), so `output_router_logits=True` trains the native
                           objective; the aux-loss-free bias itself is applied in routing but only moved by
                           `mhmoe train` (mhmoe.layers.balancing)
Everything else of the run (capacity factor, jitter, BitNet) lives in the nested native config and behaves as in
`mhmoe train`. Shape legend: B batch, T new positions, P cached positions, D model dim, A attention heads,
Dh = D / A, V vocab, h MH-MoE heads, E experts, K top-k.

Requires the `hf` extra (`pip install 'mhmoe[hf]'`, the pinned transformers of requirements.txt).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        DynamicCache,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"mhmoe.hf needs Hugging Face transformers ({e}); install it: pip install 'mhmoe[hf]'") from None

from mhmoe.data.corpora import EOS
from mhmoe.data.tokenizer import Tokenizer
from mhmoe.errors import UserError
from mhmoe.layers.router import Routing, load_balancing_loss, z_loss
from mhmoe.layers.sorted_experts import compute_dtype
from mhmoe.model import ModelConfig, Transformer
from mhmoe.training.rundir import load_checkpoint_model, load_config

EXPORT_INFO = "mhmoe_export.json"
REMOTE_MODULE = "modeling_mhmoe"


class MHMoEConfig(PretrainedConfig):
    """transformers config of an mhmoe model: the native `ModelConfig` as the nested dict `mhmoe`, mirrored into
    the standard attribute names (hidden_size, num_hidden_layers, ...) that generic tools read."""

    model_type = "mhmoe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    mhmoe: dict | None = None
    output_router_logits: bool = False
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Derived from `mhmoe` in __post_init__ (stored for tools that read them from config.json).
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None
    num_expert_heads: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        native = self.model_config()  # validates: a bad nested config is a ConfigError naming the field
        self.mhmoe = native.to_dict()
        ffn = native.moe_ffn
        self.vocab_size, self.hidden_size = native.vocab_size, native.dim
        self.num_hidden_layers, self.num_attention_heads = native.n_layers, native.n_heads
        self.max_position_embeddings = native.max_seq_len
        self.tie_word_embeddings = native.tie_embeddings
        moe = ffn.kind == "moe"
        self.num_local_experts = ffn.num_experts if moe else 0
        self.num_experts_per_tok = ffn.top_k if moe else 0
        self.num_expert_heads = ffn.heads if moe else 0
        if self.router_aux_loss_coef is None:
            # Aux-loss-free runs (balancing="bias") train without the lb loss: so does the native objective here.
            self.router_aux_loss_coef = ffn.lb_coef if moe and ffn.uses_aux_loss else 0.0
        if self.router_z_loss_coef is None:
            self.router_z_loss_coef = ffn.z_coef if moe else 0.0
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The native ModelConfig (defaults when `mhmoe` is unset)."""
        return ModelConfig.from_dict(self.mhmoe, prefix="mhmoe.") if self.mhmoe else ModelConfig()


class MHMoEPreTrainedModel(PreTrainedModel):
    config_class = MHMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # Parameters are initialised by Transformer.__init__ or loaded; from_pretrained builds the model on the meta
        # device and leaves non-persistent buffers uninitialised, so the RoPE tables are recomputed here.
        if isinstance(module, Transformer):
            module.init_rope()


class MHMoEForCausalLM(MHMoEPreTrainedModel, GenerationMixin):
    """Causal LM around `mhmoe.model.Transformer` (see the module docstring for the interface)."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: MHMoEConfig, transformer: Transformer | None = None) -> None:
        super().__init__(config)
        native = config.model_config()
        if transformer is not None and transformer.cfg != native:
            raise ValueError("MHMoEForCausalLM: the given Transformer's cfg differs from config.mhmoe")
        self.model = transformer if transformer is not None else Transformer(native)
        self._routing: list[Routing] | None = None
        for block in self.model.blocks:
            if block.is_moe:  # the routers' decisions, for router_logits / aux_loss (no change to moe.py)
                block.ffn.router.register_forward_hook(self._record_routing)
        self.post_init()

    @classmethod
    def from_native(cls, transformer: Transformer, **config_kwargs: Any) -> "MHMoEForCausalLM":
        """Wrap a native model (sharing its parameters); config_kwargs go to MHMoEConfig (eos_token_id, ...)."""
        return cls(MHMoEConfig(mhmoe=transformer.cfg.to_dict(), **config_kwargs), transformer)

    def _record_routing(self, module: torch.nn.Module, args: Any, out: Routing) -> None:
        if self._routing is not None:
            self._routing.append(out)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast | tuple:
        """input_ids [B, T] (or inputs_embeds [B, T, D]); attention_mask [B, P+T] (1 = real token);
        labels [B, T] aligned with input_ids. Returns logits [B, T, V] (the last `logits_to_keep` if > 0)."""
        cfg, net = self.config, self.model
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MHMoEForCausalLM.forward: pass exactly one of input_ids and inputs_embeds")
        output_router_logits = cfg.output_router_logits if output_router_logits is None else output_router_logits
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = cfg.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        x = net.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > net.cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} positions exceeds ModelConfig.max_seq_len ({net.cfg.max_seq_len})")

        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:  # left padding: a sequence's first real token sits at position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0)
        cos, sin = net.rope(compute_dtype(x))  # the native model's tables for this compute dtype
        cos = cos[position_ids].unsqueeze(1)  # [B or 1, 1, T, Dh/2]
        sin = sin[position_ids].unsqueeze(1)
        mask = None  # None + no past = is_causal, exactly the native path
        if padded or past > 0:
            q_pos = past + torch.arange(T, device=x.device)
            mask = torch.arange(past + T, device=x.device)[None, :] <= q_pos[:, None]  # [T, P+T] causal
            if padded:
                keys = attention_mask.bool()[:, None, None, -(past + T):]  # [B, 1, 1, P+T]
                own = torch.arange(past + T, device=x.device)[None, :] == q_pos[:, None]
                mask = (mask & keys) | own  # a padding query sees itself only: no all-masked row, no NaN

        hidden: list[torch.Tensor] = []
        adapter = _CacheAdapter(cache, past) if cache is not None else None
        self._routing = []  # filled by the router hooks, in depth order
        try:
            for block in net.blocks:
                if output_hidden_states:
                    hidden.append(x)
                x, _ = block(x, cos, sin, adapter, mask)
            routing = self._routing
        finally:
            self._routing = None
        x = net.norm(x)
        if output_hidden_states:
            hidden.append(x)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = net.lm_head(x[:, keep, :])  # [B, T or logits_to_keep, V]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=cfg.vocab_size, **kwargs)
        aux_loss = router_logits = None
        if output_router_logits and routing:
            token_mask = attention_mask[:, -T:] if padded else None
            lb, z = _router_losses(routing, token_mask, net.cfg.moe_ffn.heads, net.cfg.moe_ffn.num_experts,
                                   net.cfg.moe_ffn.balance_choices)
            aux_loss = lb
            router_logits = tuple(r.logits for r in routing)
            if loss is not None:
                loss = loss + cfg.router_aux_loss_coef * lb + cfg.router_z_loss_coef * z
        out = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, cache=cache if use_cache else None,
            hidden_states=tuple(hidden) if output_hidden_states else None, router_logits=router_logits,
        )
        if return_dict is False or (return_dict is None and cfg.return_dict is False):
            return out.to_tuple()
        return out


class _CacheAdapter:
    """A transformers `Cache` in the shape the native attention expects (`pos`, `update(layer, k, v)`)."""

    def __init__(self, cache: Cache, past: int) -> None:
        self.cache, self.pos = cache, past

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)


def _router_losses(routing: list[Routing], token_mask: torch.Tensor | None, heads: int,
                   num_experts: int, choices: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over layers of the load-balancing loss, sum of z-losses), over real tokens only when token_mask [B, T]
    is given (each token's h sub-tokens count); equal to the native per-layer losses without padding."""
    lb = z = torch.zeros((), device=routing[0].logits.device)
    for r in routing:
        w = None if token_mask is None else token_mask.reshape(-1).repeat_interleave(heads)  # [N] sub-token weights
        lb = lb + load_balancing_loss(r.probs, r.indices, num_experts, w, choices)
        z = z + z_loss(r.logits, w)
    return lb, z


AutoConfig.register(MHMoEConfig.model_type, MHMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(MHMoEConfig, MHMoEForCausalLM, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Export of a run


def hf_tokenizer(tokenizer_json: Path, max_seq_len: int) -> PreTrainedTokenizerFast:
    """The run's tokenizer.json as a transformers fast tokenizer; <|endoftext|> is eos, bos and pad (GPT-2's
    convention: every document follows an eos in training) and nothing is added when encoding."""
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=max_seq_len)


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Write OUT as a transformers model directory (config.json, model.safetensors, generation_config.json,
    tokenizer files, modeling_mhmoe.py, mhmoe_export.json) from the run's checkpoint at `step` (default: its
    newest good one).

    `AutoModelForCausalLM.from_pretrained(OUT)` (after `import mhmoe.hf`, or with trust_remote_code=True) then
    gives the native model's logits.
    Returns a report: source_run, step, out, parameters, bytes of model.safetensors.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR: {run_dir} is not a directory; pass the --out of a `mhmoe train` run")
    if out_dir.resolve() == run_dir.resolve():
        raise UserError("OUT: must differ from RUN_DIR")
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"RUN_DIR: {run_dir} has no checkpoints/; pass the --out of a `mhmoe train` run "
                        "(an export directory cannot be re-exported)")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / EXPORT_INFO).is_file())):
        raise UserError(f"OUT: {out_dir} exists and is not an earlier hf export; choose a new folder")
    cfg = load_config(run_dir)
    step, _, native = load_checkpoint_model(run_dir, step)
    tok = Tokenizer.load(run_dir / "tokenizer")
    model = MHMoEForCausalLM.from_native(native.eval(), bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
                                         pad_token_id=tok.eos_id)
    # With trust_remote_code=True, tools that cannot `import mhmoe.hf` first (the lm_eval command line) load the
    # classes through this two-line module, which imports them from the installed mhmoe package.
    model.config.auto_map = {"AutoConfig": f"{REMOTE_MODULE}.MHMoEConfig",
                             "AutoModelForCausalLM": f"{REMOTE_MODULE}.MHMoEForCausalLM"}
    # Written next to OUT and renamed into place, so an interrupted export never looks like a finished one.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    hf_tokenizer(run_dir / "tokenizer" / "tokenizer.json", cfg.model.max_seq_len).save_pretrained(tmp)
    (tmp / f"{REMOTE_MODULE}.py").write_text(
        '"""mhmoe model classes for trust_remote_code=True (needs `pip install mhmoe[hf]`)."""\n'
        "from mhmoe.hf import MHMoEConfig, MHMoEForCausalLM  # noqa: F401\n", encoding="utf-8")
    import transformers

    report = {"format": "hf", "source_run": str(run_dir.resolve()), "step": step, "out": str(out_dir),
              "variant": cfg.variant, "preset": cfg.preset, "parameters": sum(p.numel() for p in native.parameters()),
              "bytes": (tmp / "model.safetensors").stat().st_size, "transformers_version": transformers.__version__}
    (tmp / EXPORT_INFO).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return report


def describe_hf_export(report: dict[str, Any]) -> str:
    """Human-readable lines for `mhmoe export --format hf` (the JSON form is the report itself)."""
    return (f"exported step {report['step']} of {report['source_run']} to {report['out']} (transformers "
            f"{report['transformers_version']}, {report['parameters']:,} parameters, {report['bytes']:,} bytes)\n"
            f"  load: import mhmoe.hf; AutoModelForCausalLM.from_pretrained({report['out']!r})")
