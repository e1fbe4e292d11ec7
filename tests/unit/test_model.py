"""The language model: shapes, causality, KV cache, aux losses, parameter counts, presets and variants; the
training loss without logits and the RoPE tables per compute dtype."""

import pytest
import torch
from helpers import assert_close_scaled
from torch.utils._python_dispatch import TorchDispatchMode

from mhmoe import ConfigError, FFNConfig
from mhmoe.complexity import flops_per_token, model_param_count
from mhmoe.layers.attention import apply_rope, rope_tables
from mhmoe.model import Transformer
from mhmoe.training.presets import (
    PAPER_VARIANTS,
    Base,
    model_config,
    preset,
    variant_ffn,
)

BASE = Base(dim=48, n_layers=4, n_heads=4, hidden_dim=128, num_experts=4)
VARIANTS = list(PAPER_VARIANTS) + ["mhmoe-h3-shared", "smoe-hm", "mhmoe-h2-nohead"]


def _model(variant, **kw):
    cfg = model_config(BASE, variant, 97, 32)
    for k, v in kw.items():
        cfg = cfg.replace(**{k: v})
    return Transformer(cfg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_causality(variant):
    model = _model(variant).eval()
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx)
    assert out.logits.shape == (2, 16, 97)
    n_moe = 0 if variant == "dense" else BASE.n_layers // BASE.moe_every
    assert len(out.aux) == n_moe
    idx2 = idx.clone()
    idx2[:, 9] = (idx2[:, 9] + 1) % 97
    out2 = model(idx2)
    # A future token never changes a past logit; it does change its own position's.
    torch.testing.assert_close(out.logits[:, :9], out2.logits[:, :9], rtol=0, atol=1e-5)
    assert (out.logits[:, 9] - out2.logits[:, 9]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["dense", "mhmoe-h3", "smoe-hm"])
def test_kv_cache_equals_full_forward(variant):
    model = _model(variant).eval()
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx).logits
    from mhmoe.layers.attention import KVCache

    cache = KVCache(BASE.n_layers)
    pieces = [model(idx[:, :7], cache=cache).logits]
    for t in range(7, 20, 4):  # chunks of several tokens, then single tokens
        pieces.append(model(idx[:, t : t + 4], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    g1 = model.generate(idx[:, :5], 10, temperature=0.0, use_cache=True)
    g2 = model.generate(idx[:, :5], 10, temperature=0.0, use_cache=False)
    assert torch.equal(g1, g2) and g1.shape == (2, 15)
    s1 = model.generate(idx[:, :5], 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    s2 = model.generate(idx[:, :5], 6, temperature=0.8, top_k=5, use_cache=False,
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)


def test_generate_rejects_too_long():
    model = _model("smoe")
    with pytest.raises(ValueError, match="max_new_tokens: prompt \\(30\\) \\+ new tokens \\(5\\) exceed max_seq_len"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 5)


def test_aux_loss_summed_and_reaches_router():
    model = _model("mhmoe-h2")
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx, idx)
    torch.testing.assert_close(out.aux_loss, sum(a.loss for a in out.aux))
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    out.aux_loss.backward()
    routers = [b.ffn.router.weight for b in model.blocks if b.is_moe]
    assert routers and all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)


def test_moe_every_second_layer_and_tied_head():
    model = _model("smoe")
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    assert model.lm_head.weight is model.embed.weight
    untied = _model("smoe", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tie", [True, False])
def test_model_param_count_matches_numel(variant, tie):
    cfg = model_config(BASE, variant, 97, 32).replace(tie_embeddings=tie)
    model = Transformer(cfg)
    assert model_param_count(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_merge_after_residual_option():
    cfg = model_config(BASE, "mhmoe-h2", 97, 32)
    a = Transformer(cfg)
    torch.manual_seed(0)
    b = Transformer(cfg.replace(merge_after_residual=True))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 97, (1, 8))
    assert not torch.allclose(a(idx).logits, b(idx).logits)
    with pytest.raises(ConfigError, match="merge_after_residual: needs moe_ffn.merge_layer=true"):
        model_config(BASE, "smoe", 97, 32).replace(merge_after_residual=True)


def test_tiny_preset_has_the_issue_sizes_and_matched_flops():
    ffn = {v: preset("tiny", v).model.moe_ffn for v in PAPER_VARIANTS}
    assert ffn["dense"].kind == "dense" and ffn["dense"].hidden_dim == 512
    assert (ffn["smoe"].num_experts, ffn["smoe"].hidden_dim, ffn["smoe"].top_k) == (8, 512, 1)
    assert (ffn["fine-grained"].num_experts, ffn["fine-grained"].hidden_dim, ffn["fine-grained"].top_k) == (16, 256, 2)
    h2, h3 = ffn["mhmoe-h2"], ffn["mhmoe-h3"]
    assert (h2.num_experts, h2.hidden_dim, h2.head_dim, h2.top_k) == (40, 192, 96, 2)
    assert (h3.num_experts, h3.hidden_dim, h3.head_dim, h3.top_k) == (96, 128, 64, 3)
    # Leading terms (router excluded) match exactly; the routers of the many small experts add 2-6% at d=192.
    smoe = flops_per_token(ffn["smoe"])
    for v in ("fine-grained", "mhmoe-h2", "mhmoe-h3"):
        f = flops_per_token(ffn[v])
        assert f.total - f.router == smoe.total - smoe.router
        assert abs(f.total / smoe.total - 1) < 0.06


def test_paper_preset_is_section_3():
    cfg = preset("paper", "mhmoe-h3")
    m = cfg.model
    assert (m.n_layers, m.dim, m.n_heads, m.moe_every) == (12, 768, 12, 2)
    assert (m.moe_ffn.num_experts, m.moe_ffn.hidden_dim, m.moe_ffn.top_k) == (96, 512, 3)
    assert cfg.steps == 100_000 and cfg.tokens_per_step == 524_288
    assert preset("paper", "smoe-shared").model.moe_ffn.shared_hidden_dim == 2048


@pytest.mark.parametrize(
    "variant, match",
    [
        ("mixtral", r"--model: unknown variant 'mixtral'"),
        ("dense-shared", r"the dense model takes no suffix"),
        ("smoe-nohm", r"-no\*/-drop\* suffixes apply to mhmoe-hN only"),
        ("mhmoe-h2-hm", r"MH-MoE has head and merge layers already"),
        ("mhmoe-h5", r"--model mhmoe-h5: heads: dim \(48\) must be divisible by heads \(5\)"),
    ],
)
def test_bad_variants(variant, match):
    with pytest.raises(ConfigError, match=match):
        variant_ffn(BASE, variant)


def test_table_ablation_variants_are_matched():
    nohm = variant_ffn(Base(dim=768, n_layers=12, n_heads=12, hidden_dim=2048), "mhmoe-h2-nohm")
    assert (nohm.head_layer, nohm.merge_layer, nohm.hidden_dim, nohm.num_experts) == (False, False, 1024, 32)
    smoe = FFNConfig(dim=768, hidden_dim=2048, num_experts=8, top_k=1)
    assert abs(flops_per_token(nohm).total / flops_per_token(smoe).total - 1) < 0.02


def test_model_config_errors():
    with pytest.raises(ConfigError, match=r"ModelConfig.n_heads: dim \(48\) / n_heads \(5\) must be an even integer"):
        model_config(BASE, "smoe", 97, 32).replace(n_heads=5)
    with pytest.raises(ConfigError, match=r"ModelConfig.moe_ffn.dim: must equal ModelConfig.dim"):
        model_config(BASE, "smoe", 97, 32).replace(moe_ffn=FFNConfig(dim=64))


def _moe_block_rms(preset_name: str, variant: str, **model_changes) -> float:
    """RMS of block 1's MoE output at initialisation for RMS-normed random input. Only that block is
    materialised (the rest stays on the meta device), so the paper size costs one layer, not the model."""
    cfg = preset(preset_name, variant).model.replace(**model_changes)
    with torch.device("meta"):
        model = Transformer(cfg)
    block = model.blocks[1]
    assert block.is_moe
    block.to_empty(device="cpu")
    model.reset_parameters(seed=0)
    x = torch.nn.functional.rms_norm(torch.randn(2, 64, cfg.dim, generator=torch.Generator().manual_seed(1)),
                                     (cfg.dim,))
    with torch.no_grad():
        y, _ = block.ffn(x)
    return y.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("preset_name", ["tiny", "paper"])
def test_every_paper_variant_starts_at_the_scale_of_smoe(preset_name):
    """A 10^4 gap in the MoE block's starting scale (MH-MoE before the fair init) is a bias the comparison must
    not carry: every MoE variant's block output RMS at init is within 3x of SMoE's."""
    smoe = _moe_block_rms(preset_name, "smoe")
    for v in ("fine-grained", "mhmoe-h2", "mhmoe-h3", "smoe-hm", "mhmoe-h2-nohm", "mhmoe-h2-nohm-hm"):
        ratio = _moe_block_rms(preset_name, v) / smoe
        assert 1 / 3 < ratio < 3, (v, ratio)


def test_the_old_init_and_gates_start_mhmoe_orders_of_magnitude_weaker():
    """The negative control: N(0, 0.02) head and a residual-scaled merge, without renormalisation (the code
    before the fix) put h=3 more than 100x below SMoE, so the test above can fail."""
    smoe = _moe_block_rms("tiny", "smoe")
    cfg = preset("tiny", "mhmoe-h3").model
    old = cfg.replace(head_merge_init="init_std", moe_ffn=cfg.moe_ffn.replace(renormalize="never"))
    with torch.device("meta"):
        model = Transformer(old)
    model.blocks[1].to_empty(device="cpu")
    model.reset_parameters(seed=0)
    x = torch.nn.functional.rms_norm(torch.randn(2, 64, old.dim), (old.dim,))
    with torch.no_grad():
        y, _ = model.blocks[1].ffn(x)
    assert y.pow(2).mean().sqrt().item() < smoe / 100


def test_same_seed_gives_shared_modules_the_same_init_across_variants():
    """Seeds pair variants: embeddings, attention, norms and dense FFNs start identical whatever the MoE holds."""
    a, b = _model("smoe"), _model("mhmoe-h3")
    torch.manual_seed(7)
    a = Transformer(a.cfg)
    torch.manual_seed(7)
    b = Transformer(b.cfg)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    shared = [n for n in pa if n in pb and pa[n].shape == pb[n].shape]
    assert "embed.weight" in shared and "blocks.1.attn.qkv.weight" in shared and "blocks.0.ffn.ffn.w1.weight" in shared
    for n in shared:
        assert torch.equal(pa[n], pb[n]), n
    assert not torch.equal(pa["blocks.1.ffn.router.weight"], pa["blocks.3.ffn.router.weight"])
    torch.manual_seed(8)
    c = Transformer(a.cfg)
    assert not torch.equal(dict(c.named_parameters())["embed.weight"], pa["embed.weight"])


def test_head_and_merge_init_is_norm_preserving_and_residual_scaling_is_applied_once():
    torch.manual_seed(0)
    model = _model("mhmoe-h2")
    ffn = model.blocks[1].ffn
    d = BASE.dim
    assert ffn.head.weight.std().item() == pytest.approx(1 / d**0.5, rel=0.1)
    assert ffn.merge.weight.std().item() == pytest.approx(1 / d**0.5, rel=0.1)
    resid = 0.02 / (2 * BASE.n_layers) ** 0.5
    assert ffn.experts.w2.std().item() == pytest.approx(resid, rel=0.1)
    assert ffn.experts.w1.std().item() == pytest.approx(0.02, rel=0.1)


# ----------------------------------------------------------------------------------------------------------
# The training forward's loss (chunked, no logits) against return_logits=True (full logits, F.cross_entropy)


def _loss_grads(model, idx, tgt, **kw):
    model.zero_grad(set_to_none=True)
    out = model(idx, tgt, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("variant, tie", [("dense", True), ("smoe", True), ("mhmoe-h3", False)])
def test_training_forward_has_no_logits_and_the_reference_loss(variant, tie, precision):
    model = _model(variant, tie_embeddings=tie)
    assert model.uses_fused_loss() and (model.lm_head.weight is model.embed.weight) == tie
    idx, tgt = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        fused, g_fused = _loss_grads(model, idx, tgt)
        ref, g_ref = _loss_grads(model, idx, tgt, return_logits=True)
        with torch.no_grad():  # without targets: the logits, as evaluation and generation read them
            logits = model(idx).logits
    assert fused.logits is None and ref.logits.shape == (2, 16, 97)
    assert fused.ce_loss.dtype == torch.float32
    tol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(fused.ce_loss, ref.ce_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(fused.loss, fused.ce_loss + fused.aux_loss)
    assert g_fused.keys() == g_ref.keys() and "embed.weight" in g_fused
    for name in g_ref:
        assert_close_scaled(g_fused[name], g_ref[name], tol, name)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=0)


def test_rope_float32_path_is_unchanged():
    """The float32 rotation computes exactly what it did before the per-dtype tables (the old function, here)."""

    def old_apply_rope(x, cos, sin):
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)

    model = _model("dense")
    cos, sin = model.rope(torch.float32)
    assert cos is model.rope_cos and cos.dtype == torch.float32
    old_cos, old_sin = rope_tables(BASE.dim // BASE.n_heads, 32, 10000.0)
    assert torch.equal(cos, old_cos) and torch.equal(sin, old_sin)
    x = torch.randn(2, 4, 16, BASE.dim // BASE.n_heads)
    assert torch.equal(apply_rope(x, cos[:16], sin[:16]), old_apply_rope(x, old_cos[:16], old_sin[:16]))
    # and a 16-bit x with float32 tables (the hf wrapper's before) still rotates in float32
    xb = x.bfloat16()
    assert torch.equal(apply_rope(xb, cos[:16], sin[:16]), old_apply_rope(xb, old_cos[:16], old_sin[:16]))


def test_rope_bf16_tables_are_cached_and_match_float32():
    model = _model("dense")
    cos, sin = model.rope(torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert model.rope(torch.bfloat16)[0] is cos  # built once, at construction: the same tensor every call
    assert torch.equal(cos, model.rope_cos.bfloat16()) and torch.equal(sin, model.rope_sin.bfloat16())
    assert model.rope(torch.float16)[0].dtype == torch.float16
    x = torch.randn(2, 4, 32, BASE.dim // BASE.n_heads)
    ref = apply_rope(x, *model.rope(torch.float32))  # float32 rotation of the same inputs
    got = apply_rope(x.bfloat16(), cos, sin)
    assert got.dtype == torch.bfloat16  # no float32 copy of q/k: computed in bf16
    assert_close_scaled(got, ref, 2e-2, "bf16 rope")
    with _Ops() as ops:
        apply_rope(x.bfloat16(), cos, sin)
    assert torch.float32 not in ops.dtypes


def test_bf16_model_forward_rotates_in_bf16_and_matches_float32():
    model = _model("dense").eval()
    idx = torch.randint(0, 97, (2, 16))
    ref = model(idx).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _Ops() as ops:
            got = model(idx).logits
    # q and k ([B, A, T, Dh], halves [B, A, T, Dh/2]) never exist in float32 under autocast
    dh = BASE.dim // BASE.n_heads
    assert not any(d == torch.float32 and s in ((2, BASE.n_heads, 16, dh), (2, BASE.n_heads, 16, dh // 2))
                   for d, s in ops.sizes)
    assert any(d == torch.bfloat16 and s == (2, BASE.n_heads, 16, dh) for d, s in ops.sizes)  # the hook sees them
    assert_close_scaled(got, ref, 3e-2, "bf16 autocast logits")


def test_rope_buffers_are_refilled_in_place():
    """init_rope (what the hf wrapper runs after loading on the meta device) restores every table."""
    model = _model("dense")
    want = {n: b.clone() for n, b in model.named_buffers() if n.startswith("rope_")}
    assert sorted(want) == ["rope_cos", "rope_cos_bfloat16", "rope_cos_float16", "rope_sin", "rope_sin_bfloat16",
                            "rope_sin_float16"]
    for n in want:
        getattr(model, n).zero_()
    model.init_rope()
    assert all(torch.equal(getattr(model, n), b) for n, b in want.items())
    assert not any(n.startswith("rope_") for n in model.state_dict())  # not part of checkpoints


class _Ops(TorchDispatchMode):
    """The dtypes and shapes of the tensors aten ops return."""

    def __init__(self):
        super().__init__()
        self.dtypes, self.sizes = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.dtypes.add(o.dtype)
                self.sizes.append((o.dtype, tuple(o.shape)))
        return out
