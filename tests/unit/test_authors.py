"""The authors' MoE settings (`-authors`, each an FFNConfig / ModelConfig field) against a slow reference written
from the authors' formulas (tests/reference.py: `authors_reference_forward`, `gshard_loss_reference`), forward
and gradients; their initialisation, BitNet head and merge, and X-MoE gating."""

import math

import pytest
import torch

from mhmoe import FFNConfig, build_ffn
from mhmoe.errors import ConfigError
from mhmoe.layers.experts import expert_capacity
from mhmoe.layers.router import XMOE_NORM, load_balancing_loss
from mhmoe.model import ModelConfig, Transformer
from mhmoe.training.presets import authors_moe, preset, with_profile
from tests.reference import authors_capacity, authors_reference_forward, gshard_loss_reference

D = 24


def _layer(dispatch: str = "sorted", **kw) -> torch.nn.Module:
    cfg = authors_moe(FFNConfig(dim=D, hidden_dim=16, num_experts=6, top_k=3, heads=3, head_layer=True,
                                merge_layer=True, dispatch=dispatch)).replace(**kw)
    torch.manual_seed(0)
    layer = build_ffn(cfg)
    with torch.no_grad():  # weights far from zero (and router logits spread), so outputs and gradients are too
        for p in layer.parameters():
            p.normal_(0, 0.4)
    return layer


def _grads(layer, x, y, g):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    y.backward(g)
    return {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm", "scatter"])
@pytest.mark.parametrize("training", [True, False])
def test_authors_layer_equals_their_formulas_forward_and_gradients(dispatch, training):
    """Raw top-k gates, drops beyond top_k * ceil(S / E) by choice rank then token (in training and, with
    capacity_in_eval, in evaluation), head and merge with bias: the layer equals the reference, and so do the
    gradients of the input and of every parameter, biases included."""
    layer = _layer(dispatch).train(training)
    x = torch.randn(2, 7, D, requires_grad=True)
    y, aux = layer(x)
    assert aux.dropped_fraction.item() > 0  # the case must drop, or the capacity rule is untested
    ref = authors_reference_forward(layer, x, drop=True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got, want = _grads(layer, x, y, g), _grads(layer, x, ref, g)
    assert {"head.bias", "merge.bias"} <= set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_capacity_counts_and_priority():
    """S = 42 sub-tokens, E = 6, K = 3: theirs is 3 * ceil(42/6) = 21 slots; ours ceil(3*42/6) = 21 too, so also a
    case where they differ (S = 10, E = 4, K = 2: 2 * 3 = 6 against ceil(20/4) = 5)."""
    assert expert_capacity(42 * 3, 6, 1.0, 3, "choice_order") == authors_capacity(42, 6, 3) == 21
    assert expert_capacity(10 * 2, 4, 1.0, 2, "choice_order") == authors_capacity(10, 4, 2) == 6
    assert expert_capacity(10 * 2, 4, 1.0, 2, "token_order") == 5


def test_evaluation_drops_only_with_capacity_in_eval():
    x = torch.randn(2, 7, D)
    dropping = _layer().eval()
    lenient = _layer(capacity_in_eval=False).eval()
    lenient.load_state_dict(dropping.state_dict())
    with torch.no_grad():
        y_drop, aux_drop = dropping(x)
        y_all, aux_all = lenient(x)
        torch.testing.assert_close(y_drop, authors_reference_forward(dropping, x, drop=True), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_all, authors_reference_forward(lenient, x, drop=False), rtol=1e-5, atol=1e-5)
    assert aux_drop.dropped_fraction.item() > 0 and aux_all.dropped_fraction.item() == 0


def test_first_choice_balance_loss_equals_gshard_loss_and_its_gradient():
    torch.manual_seed(1)
    logits = torch.randn(50, 8, requires_grad=True)
    probs = logits.softmax(-1)
    idx = probs.topk(3, dim=1).indices
    ours = load_balancing_loss(probs, idx, 8, choices="first")
    theirs = gshard_loss_reference(probs, idx)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, logits, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs)
    # "all" counts every choice: a different number whenever the later choices are spread differently
    assert not torch.isclose(load_balancing_loss(probs, idx, 8, choices="all"), theirs)


def test_layer_reports_the_first_choice_loss():
    layer = _layer()
    x = torch.randn(2, 7, D)
    _, aux = layer(x)
    sub = (layer.head(x.reshape(-1, D))).reshape(-1, D // 3)
    probs = (sub @ layer.router.weight.t()).softmax(-1)
    torch.testing.assert_close(aux.lb_loss, gshard_loss_reference(probs, probs.topk(3, dim=1).indices))


def test_authors_variant_fields():
    """The acceptance fields of `-authors`, and the suffix composing with the others; dense takes none."""
    ffn = preset("cpu", "mhmoe-h3-authors").model.moe_ffn
    assert (ffn.renormalize, ffn.capacity_factor, ffn.capacity_in_eval, ffn.balance_choices) == \
        ("never", 1.0, True, "first")
    assert ffn.capacity_rule == "choice_order" and ffn.head_merge_bias
    m = preset("cpu", "mhmoe-h3-authors").model
    assert (m.head_merge_init, m.moe_init, m.bitnet_head_merge) == ("xavier", "kaiming_uniform", False)
    assert preset("cpu", "smoe-authors").model.moe_ffn.head_merge_bias is False  # no head, no merge, no bias
    shared = preset("cpu", "mhmoe-h3-shared-authors").model.moe_ffn
    assert shared.shared_hidden_dim == 384 and shared.renormalize == "never"
    # sizes are the ours-profile variant's: the suffix changes settings, not the parity solution
    ours = preset("cpu", "mhmoe-h3").model.moe_ffn
    assert (ffn.num_experts, ffn.hidden_dim, ffn.top_k) == (ours.num_experts, ours.hidden_dim, ours.top_k)
    with pytest.raises(ConfigError, match="dense model takes no suffix"):
        preset("cpu", "dense-authors")
    assert with_profile("dense", "authors") == "dense"
    assert with_profile("mhmoe-h2-shared", "authors") == "mhmoe-h2-shared-authors"
    assert with_profile("smoe", "mhmoe") == "smoe"


def test_authors_initialisation():
    """Xavier-uniform head (gain 1/sqrt 2) and merge (gain 1), merge bias 0, head bias U(+-1/sqrt D); experts and
    gate U(+-1/sqrt fan_in): bounds hold and the spread is the uniform's (std = bound / sqrt 3)."""
    cfg = preset("cpu", "mhmoe-h3-authors").model
    torch.manual_seed(0)
    model = Transformer(cfg)
    ffn = model.blocks[1].ffn
    d = cfg.dim

    def check(t, bound, what):
        assert t.abs().max().item() <= bound, what
        assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), what

    check(ffn.head.weight, math.sqrt(6 / (2 * d)) / math.sqrt(2), "head")
    check(ffn.merge.weight, math.sqrt(6 / (2 * d)), "merge")
    check(ffn.head.bias, 1 / math.sqrt(d), "head bias")
    assert torch.count_nonzero(ffn.merge.bias) == 0
    check(ffn.experts.w1, 1 / math.sqrt(ffn.experts.w1.shape[1]), "w1")
    check(ffn.experts.w2, 1 / math.sqrt(ffn.experts.w2.shape[1]), "w2")
    check(ffn.router.weight, 1 / math.sqrt(ffn.router.weight.shape[1]), "gate")
    # ours: N(0, init_std) experts with W2 residual-scaled, N(0, 1/D) head, no biases
    ours = Transformer(preset("cpu", "mhmoe-h3").model).blocks[1].ffn
    assert ours.head.bias is None
    assert ours.experts.w1.std().item() == pytest.approx(0.02, rel=0.1)


def test_bitnet_keeps_head_and_merge_full_precision_under_authors():
    from mhmoe.bitnet.modules import BitExperts, BitLinear

    model = Transformer(preset("smoke", "mhmoe-h3-authors").model.replace(bitnet=True))
    ffn = model.blocks[1].ffn
    assert type(ffn.head) is torch.nn.Linear and type(ffn.merge) is torch.nn.Linear
    assert isinstance(ffn.experts, BitExperts)
    assert isinstance(model.blocks[0].attn.qkv, BitLinear)
    ours = Transformer(preset("smoke", "mhmoe-h3").model.replace(bitnet=True)).blocks[1].ffn
    assert isinstance(ours.head, BitLinear) and isinstance(ours.merge, BitLinear)
    with pytest.raises(ConfigError, match="ModelConfig.bitnet_head_merge"):
        preset("smoke", "mhmoe-h3-authors").model.replace(bitnet=True, bitnet_head_merge=True)


def test_field_validation_one_line():
    with pytest.raises(ConfigError, match="FFNConfig.capacity_in_eval: .*capacity_factor > 0"):
        FFNConfig(dim=D, capacity_in_eval=True)
    with pytest.raises(ConfigError, match="FFNConfig.head_merge_bias: needs head_layer or merge_layer"):
        FFNConfig(dim=D, head_merge_bias=True)
    with pytest.raises(ConfigError, match="FFNConfig.balance_choices"):
        FFNConfig(dim=D, balance_choices="second")


# ----------------------------------------------------------------------------------------------------------
# X-MoE gating (beyond the paper, not in -authors)


def test_xmoe_router_equals_its_formula_and_keeps_norm():
    torch.manual_seed(0)
    layer = build_ffn(FFNConfig(dim=D, hidden_dim=16, num_experts=6, top_k=2, heads=2, scoring="xmoe"))
    r = layer.router
    assert r.weight.shape == (6, 16) and r.reduction.shape == (16, D // 2)
    x = torch.randn(20, D // 2, requires_grad=True)
    routing = r(x)  # a training forward rescales the expert embeddings to norm 1.5 first
    torch.testing.assert_close(r.weight.norm(dim=1), torch.full((6,), XMOE_NORM))
    logits = (x @ r.reduction.t()) @ (r.weight / r.weight.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(routing.logits, logits)
    w, i = logits.softmax(-1).topk(2, dim=1)
    torch.testing.assert_close(routing.weights, w / w.sum(-1, keepdim=True))  # renormalize="auto" at k=2
    assert torch.equal(routing.indices, i)
    routing.weights.sum().backward()
    assert r.reduction.grad.abs().sum() > 0 and r.weight.grad.abs().sum() > 0
    y, aux = layer(torch.randn(2, 5, D))
    assert y.shape == (2, 5, D) and aux.router_entropy.item() > 0


def test_xmoe_model_trains_with_orthogonal_embeddings_and_counts():
    from mhmoe.complexity import model_param_count

    cfg = preset("smoke", "mhmoe-h2").model
    cfg = cfg.replace(moe_ffn=cfg.moe_ffn.replace(scoring="xmoe"))
    model = Transformer(cfg)
    g = model.blocks[1].ffn.router.weight  # [E, 16] with E >= 16: orthogonal columns of norm 0.32
    torch.testing.assert_close(g.t() @ g, 0.32**2 * torch.eye(16), atol=1e-5, rtol=0)
    assert model_param_count(cfg)["total"] == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(idx, idx)
    out.loss.backward()
    assert torch.isfinite(out.loss)
