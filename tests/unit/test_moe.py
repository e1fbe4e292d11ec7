"""The MoE / MH-MoE layer against the slow reference: outputs, every gradient, dtypes (bf16 weights, fp32 weights
under bf16 autocast), dropping, shapes; empty batches; double backward."""

import math

import pytest
import torch
from helpers import VARIANTS, D, _grads, _make, assert_close_scaled
from reference import reference_forward

from mhmoe import ConfigError, FFNConfig, build_ffn
from mhmoe.complexity import solve_parity
from mhmoe.layers.sorted_experts import DoubleBackwardError


@pytest.mark.parametrize(
    "name, dispatch",
    [(n, d) for n in VARIANTS for d in ("auto", "sorted", "grouped_mm", "scatter")
     if not (n == "dense" and d != "auto")],
)
def test_fast_path_equals_reference_fp32(name, dispatch):
    cfg = VARIANTS[name]
    if cfg.kind == "moe":
        if dispatch == "grouped_mm" and (cfg.head_dim % 8 or cfg.hidden_dim % 8):
            with pytest.raises(ConfigError, match="grouped_mm needs .* multiples of 8"):
                cfg.replace(dispatch=dispatch)
            return
        cfg = cfg.replace(dispatch=dispatch)
    layer = _make(cfg)
    x = torch.randn(3, 7, D, requires_grad=True)
    y, _ = layer(x)
    g = torch.randn_like(y)
    fast = _grads(layer, x, y, g)
    y_ref = reference_forward(layer, x)
    ref = _grads(layer, x, y_ref, g)
    assert_close_scaled(y, y_ref, 1e-6, "output")
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    assert len(fast) == len(ref) == len(names)
    for n, a, b in zip(names, fast, ref):
        assert_close_scaled(a, b, 1e-5, f"grad {n}")


@pytest.mark.parametrize("dispatch", ["auto", "sorted", "grouped_mm", "scatter"])
@pytest.mark.parametrize("name", ["smoe", "mhmoe-h2", "mhmoe-h3-shared"])
def test_fast_path_equals_reference_bf16(name, dispatch):
    cfg = VARIANTS[name].replace(dispatch=dispatch)
    layer = _make(cfg, torch.bfloat16)
    x = torch.randn(2, 6, D, dtype=torch.bfloat16, requires_grad=True)
    y, _ = layer(x)
    g = torch.randn_like(y)
    fast = _grads(layer, x, y, g)
    y_ref = reference_forward(layer, x)
    ref = _grads(layer, x, y_ref, g)
    assert y.dtype == torch.bfloat16
    # Same routing (router in fp32 in both), so only bf16 rounding of the sums differs.
    assert_close_scaled(y, y_ref, 2e-2, "output")
    for n, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], fast, ref):
        assert_close_scaled(a, b, 3e-2, f"grad {n}")


def test_mhmoe_splits_tokens_into_contiguous_ordered_subtokens():
    # Identity head, identity merge and one expert that is the identity-ish map: the output of sub-token j
    # must land back in slice j of its own token.
    cfg = FFNConfig(dim=6, hidden_dim=4, num_experts=3, top_k=1, heads=3, head_layer=True, merge_layer=True)
    layer = build_ffn(cfg)
    x = torch.randn(2, 4, 6)
    y, _ = layer(x)
    y_ref = reference_forward(layer, x)
    torch.testing.assert_close(y, y_ref)
    # Changing slice 1 of token (0, 2) changes only token (0, 2)'s output.
    x2 = x.clone()
    x2[0, 2, 2:4] += 1.0
    layer.eval()
    y1, _ = layer(x)
    y2, _ = layer(x2)
    changed = (y1 - y2).abs().sum(-1) > 0
    assert changed[0, 2] and changed.sum() == 1


def test_smoe_is_heads1_without_head_and_merge():
    layer = build_ffn(VARIANTS["smoe"])
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"router.weight", "experts.w1", "experts.w3", "experts.w2"}
    assert layer.head is None and layer.merge is None


def test_aux_statistics_and_no_global_state():
    cfg = VARIANTS["mhmoe-h3-shared"]
    layer = _make(cfg)
    x = torch.randn(2, 5, D)
    _, aux1 = layer(x)
    _, aux2 = layer(x)
    n_sub = 2 * 5 * cfg.heads
    assert aux1.tokens_per_expert.sum().item() == n_sub * cfg.top_k
    assert aux1.tokens_per_expert.shape == (cfg.num_experts,)
    assert torch.equal(aux1.tokens_per_expert, aux2.tokens_per_expert)  # nothing accumulates between calls
    assert 0 < aux1.router_entropy.item() <= math.log(cfg.num_experts) + 1e-6
    torch.testing.assert_close(aux1.loss, cfg.lb_coef * aux1.lb_loss + cfg.z_coef * aux1.z_loss)
    assert aux1.dropped_fraction.item() == 0.0
    _, dense_aux = build_ffn(VARIANTS["dense"])(x)
    assert dense_aux.loss.item() == 0 and dense_aux.lb_loss.item() == 0 and dense_aux.tokens_per_expert.numel() == 0


# compacted rows; rows kept with weight 0; dropped rows not computed
@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm", "scatter"])
@pytest.mark.parametrize("name", ["smoe", "mhmoe-h2", "mhmoe-h3-shared"])
def test_capacity_dropping_matches_reference_in_training(name, dispatch):
    cfg = VARIANTS[name].replace(capacity_factor=0.5, dispatch=dispatch)
    layer = _make(cfg)
    layer.train()
    x = torch.randn(2, 6, D, requires_grad=True)
    y, aux = layer(x)
    n_assign = 2 * 6 * cfg.heads * cfg.top_k
    cap = math.ceil(0.5 * n_assign / cfg.num_experts)
    assert aux.dropped_fraction.item() > 0
    y_ref = reference_forward(layer, x, capacity=cap)
    assert_close_scaled(y, y_ref, 1e-6, "output")
    g = torch.randn_like(y)
    fast = _grads(layer, x, y, g)
    ref = _grads(layer, x, reference_forward(layer, x, capacity=cap), g)
    for a, b in zip(fast, ref):
        assert_close_scaled(a, b, 1e-5, "grad")


@pytest.mark.parametrize("name", ["smoe", "fine-grained", "mhmoe-h3-shared"])
def test_eval_is_batch_independent_even_with_capacity(name):
    layer = _make(VARIANTS[name].replace(capacity_factor=0.25)).eval()
    batch = torch.randn(4, 9, D)
    y_batch, aux = layer(batch)
    assert aux.dropped_fraction.item() == 0
    for b in range(4):
        y_alone, _ = layer(batch[b : b + 1, 3:5])
        # Equal up to GEMM blocking order; a dropped or re-routed assignment would differ by O(1).
        assert_close_scaled(y_alone, y_batch[b : b + 1, 3:5], 1e-5, "token output")


def test_paper_configs_build_with_expected_shapes():
    smoe = FFNConfig(dim=768, hidden_dim=2048, num_experts=8, top_k=1)
    h3 = solve_parity(768, 2048, 8, 1, heads=3).mhmoe
    layer = build_ffn(h3)
    assert tuple(layer.experts.w1.shape) == (96, 256, 512)
    assert tuple(layer.router.weight.shape) == (96, 256)
    assert tuple(build_ffn(smoe).experts.w2.shape) == (8, 2048, 768)



@pytest.mark.parametrize("name, dispatch", [
    (n, d) for n in ("smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3-shared") for d in ("sorted", "grouped_mm", "scatter")
    if (n, d) != ("fine-grained", "grouped_mm")  # hidden_dim 20: not grouped_mm's 16-byte rows
])
def test_bf16_autocast_with_fp32_weights_matches_the_fp32_routing_reference(name, dispatch, two_threads):
    """Mixed-precision training: fp32 parameters, bf16 autocast; the reference routes in fp32 as the layer does."""
    threading = "inter-expert" if dispatch == "sorted" else "auto"  # the worker threads under autocast too
    layer = _make(VARIANTS[name].replace(dispatch=dispatch, threading=threading)).train()
    with torch.no_grad():  # experts 0 and 1 nearly tie for every sub-token: a router in bf16 would flip many
        layer.router.weight[1] = layer.router.weight[0] + 1e-3 * torch.randn_like(layer.router.weight[0])
    x = torch.randn(2, 8, D, requires_grad=True)
    g = torch.randn(2, 8, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    fast = _grads(layer, x, y, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = reference_forward(layer, x)
    ref = _grads(layer, x, y_ref, g)
    assert y.dtype == torch.bfloat16 and aux.lb_loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert_close_scaled(y, y_ref, 2e-2, "output")
    for n, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], fast, ref):
        assert a.dtype == b.dtype == torch.float32  # gradients in the parameters' (and input's) dtype
        assert_close_scaled(a, b, 3e-2, f"grad {n}")


@pytest.mark.parametrize("dispatch", ["auto", "grouped_mm", "scatter"])
@pytest.mark.parametrize("name", ["smoe", "mhmoe-h3-shared"])
def test_an_empty_batch_gives_zero_aux_losses(name, dispatch, two_threads):
    layer = _make(VARIANTS[name].replace(dispatch=dispatch, threading="inter-expert", capacity_factor=0.5)).train()
    x = torch.randn(0, 4, D, requires_grad=True)
    y, aux = layer(x)
    for field in ("loss", "lb_loss", "z_loss", "router_entropy", "dropped_fraction"):
        assert getattr(aux, field).item() == 0.0, field  # not NaN (means over no tokens)
    (y.sum() + aux.loss).backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert all(p.grad is None or not p.grad.isnan().any() for p in layer.parameters())


def test_double_backward_of_the_sorted_experts_raises_a_clear_error():
    layer = _make(VARIANTS["mhmoe-h2"].replace(dispatch="sorted"))
    x = torch.randn(2, 3, D, requires_grad=True)
    y, _ = layer(x)
    with pytest.raises(DoubleBackwardError, match="first-order backward only"):
        torch.autograd.grad(y.sum(), x, create_graph=True)  # a gradient penalty's first step


def test_grouped_mm_is_twice_differentiable_like_the_reference():
    """The way out the error names: grouped_mm's gradient penalty equals the reference's."""
    layer = _make(VARIANTS["mhmoe-h2"].replace(dispatch="grouped_mm"))
    x = torch.randn(2, 3, D, requires_grad=True)
    out = []
    for fn in (lambda t: layer(t)[0], lambda t: reference_forward(layer, t)):
        gx, = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        out.append(_grads(layer, x, gx.square().sum(), torch.ones(())))
    for n, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], *out):
        assert_close_scaled(a, b, 1e-4, f"second-order grad {n}")
