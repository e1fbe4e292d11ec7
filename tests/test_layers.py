"""The layer family against the slow reference: outputs, every gradient, dtypes, dropping, config errors."""

import math

import pytest
import torch

from mhmoe import ConfigError, FFNConfig, build_ffn
from mhmoe.complexity import fine_grained, solve_parity
from mhmoe.reference import reference_forward
from mhmoe.router import load_balancing_loss

D = 48

VARIANTS = {
    "dense": FFNConfig(kind="dense", dim=D, hidden_dim=40),
    "smoe": FFNConfig(dim=D, hidden_dim=40, num_experts=4, top_k=1),
    "fine-grained": fine_grained(FFNConfig(dim=D, hidden_dim=40, num_experts=4, top_k=1), 2),
    "mhmoe-h2": FFNConfig(dim=D, hidden_dim=16, num_experts=10, top_k=2, heads=2, head_layer=True, merge_layer=True),
    "mhmoe-h3-shared": FFNConfig(dim=D, hidden_dim=16, num_experts=12, top_k=3, heads=3, head_layer=True,
                                 merge_layer=True, shared_hidden_dim=20),
    "mhmoe-h4-renorm-nohead": FFNConfig(dim=D, hidden_dim=8, num_experts=6, top_k=2, heads=4, merge_layer=True,
                                        renormalize=True),
}


def _make(cfg: FFNConfig, dtype=torch.float32):
    layer = build_ffn(cfg)
    with torch.no_grad():  # larger-than-default weights so the outputs and gradients are far from zero
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer.to(dtype)


def assert_close_scaled(a, b, tol, what=""):
    """max |a - b| within tol of the largest |b| (the natural scale of fp32/bf16 rounding in sums)."""
    a, b = a.float(), b.float()
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-6)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x scale {scale:.3g}"


def _grads(layer, x, out, g):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out.backward(g)
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize(
    "name, dispatch",
    [(n, d) for n in VARIANTS for d in ("sorted", "grouped_mm") if not (n == "dense" and d == "grouped_mm")],
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


@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm"])
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


def test_router_runs_in_float32_under_autocast():
    layer = _make(VARIANTS["mhmoe-h2"])
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.router(x.reshape(-1, D // 2))
        y, aux = layer(x)
    assert routing.logits.dtype == torch.float32 and routing.weights.dtype == torch.float32
    assert y.dtype == torch.bfloat16 and aux.lb_loss.dtype == torch.float32
    # The autocast routing equals the fp32 routing exactly.
    assert torch.equal(routing.indices, layer.router(x.reshape(-1, D // 2)).indices)


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


def test_load_balancing_loss_values():
    E = 4
    # Perfectly balanced choices and uniform probabilities -> 1.
    probs = torch.full((8, E), 1 / E)
    idx = torch.arange(8).remainder(E).unsqueeze(1)
    assert load_balancing_loss(probs, idx, E).item() == pytest.approx(1.0)
    # Everything on expert 0 with probability 1 -> E.
    probs = torch.zeros(8, E)
    probs[:, 0] = 1
    assert load_balancing_loss(probs, torch.zeros(8, 2, dtype=torch.long), E).item() == pytest.approx(E)


def test_aux_loss_reaches_router():
    layer = _make(VARIANTS["mhmoe-h2"].replace(z_coef=1e-3))
    _, aux = layer(torch.randn(2, 5, D))
    aux.loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w1.grad is None  # the aux loss depends on the router only


def test_jitter_only_in_training():
    layer = _make(VARIANTS["smoe"].replace(jitter=0.5))
    x = torch.randn(4, 8, D)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    torch.manual_seed(1)
    r1 = layer.router(x.reshape(-1, D)).logits
    r2 = layer.router(x.reshape(-1, D)).logits
    assert not torch.equal(r1, r2)


@pytest.mark.parametrize("name", ["smoe", "mhmoe-h2", "mhmoe-h3-shared"])
def test_capacity_dropping_matches_reference_in_training(name):
    cfg = VARIANTS[name].replace(capacity_factor=0.5)
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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=30, heads=4), r"FFNConfig\.heads: dim \(30\) must be divisible by heads \(4\)"),
        (dict(top_k=9, num_experts=8), r"FFNConfig\.top_k: must satisfy 1 <= top_k <= num_experts"),
        (dict(top_k=0), r"FFNConfig\.top_k"),
        (dict(hidden_dim=0), r"FFNConfig\.hidden_dim: must be > 0"),
        (dict(dim=-1), r"FFNConfig\.dim: must be > 0"),
        (dict(num_experts=0, top_k=0), r"FFNConfig\.num_experts: must be >= 1"),
        (dict(shared_hidden_dim=-2), r"FFNConfig\.shared_hidden_dim"),
        (dict(jitter=1.5), r"FFNConfig\.jitter"),
        (dict(capacity_factor=-1.0), r"FFNConfig\.capacity_factor"),
        (dict(kind="sparse"), r"FFNConfig\.kind: 'sparse' is not allowed; use one of 'dense', 'moe'"),
        (dict(dispatch="magic"), r"FFNConfig\.dispatch"),
        (dict(kind="dense", heads=2), r"FFNConfig\.heads: only applies to kind='moe'"),
        (dict(top_k="two"), r"FFNConfig\.top_k: expected an integer"),
        (dict(head_layer="maybe"), r"FFNConfig\.head_layer: expected true/false"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        FFNConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_keys_and_coerces_strings():
    with pytest.raises(ConfigError, match=r"num_expert: unknown key for FFNConfig; valid keys: .*num_experts"):
        FFNConfig.from_dict({"num_expert": 8})
    cfg = FFNConfig.from_dict({"top_k": "2", "head_layer": "true", "lb_coef": "0.02"})
    assert cfg.top_k == 2 and cfg.head_layer is True and cfg.lb_coef == 0.02
    assert FFNConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.override("heads", "3").heads == 3


def test_sorted_experts_gives_16bit_combine_weights_a_gradient_of_their_dtype():
    from mhmoe.experts import sorted_experts

    N, K, E, Din, Fh = 20, 2, 5, 8, 12
    x = torch.randn(N, Din, dtype=torch.bfloat16)
    flat = torch.randint(E, (N * K,))
    order = torch.argsort(flat, stable=True)
    sizes, rows = torch.bincount(flat, minlength=E).tolist(), order // K
    ws = [torch.randn(E, Din, Fh, dtype=torch.bfloat16), torch.randn(E, Din, Fh, dtype=torch.bfloat16),
          torch.randn(E, Fh, Din, dtype=torch.bfloat16)]
    w32 = torch.rand(N * K, requires_grad=True)
    w16 = w32.detach().bfloat16().requires_grad_()
    g = torch.randn(N, Din, dtype=torch.bfloat16)
    sorted_experts(x, w32, *ws, rows, sizes, N).backward(g)
    sorted_experts(x, w16, *ws, rows, sizes, N).backward(g)
    assert w16.grad.dtype == torch.bfloat16
    assert_close_scaled(w16.grad, w32.grad, 1e-2, "grad w")


def _authors_topk_gate(probs: torch.Tensor, k: int) -> torch.Tensor:
    """fairseq/torchscale `topkgating` with --moe-normalize-gate-prob-before-dropping, written from its text:
    top-1 keeps the raw softmax probability; for k > 1 the top-k probabilities are divided by their sum
    (clamped at the dtype's eps)."""
    top = probs.topk(k, dim=-1).values
    if k == 1:
        return top
    return top / top.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).eps)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_renormalize_modes_per_top_k(mode, k):
    torch.manual_seed(k)
    layer = build_ffn(FFNConfig(dim=D, hidden_dim=8, num_experts=6, top_k=k, renormalize=mode))
    x = torch.randn(50, D)
    routing = layer.router(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)
    raw = probs.topk(k, dim=-1).values
    expected = {"auto": _authors_topk_gate(probs, k), "never": raw,
                "always": raw / raw.sum(-1, keepdim=True)}[mode]
    torch.testing.assert_close(routing.weights, expected)
    assert layer.cfg.renormalizes == (mode == "always" or (mode == "auto" and k > 1))
    if mode == "always" and k == 1:
        assert torch.equal(routing.weights, torch.ones_like(routing.weights))


def test_renormalize_default_follows_the_authors_and_old_booleans_load():
    assert FFNConfig().renormalize == "auto"
    assert FFNConfig.from_dict({"renormalize": True}).renormalize == "always"
    assert FFNConfig.from_dict({"renormalize": False}).renormalize == "never"
    assert FFNConfig(renormalize=True).renormalize == "always"
    assert FFNConfig().override("renormalize", "false").renormalize == "never"
    assert FFNConfig().override("renormalize", "never").renormalize == "never"
    with pytest.raises(ConfigError, match="FFNConfig.renormalize: 'sometimes' is not allowed; use one of 'auto'"):
        FFNConfig().override("renormalize", "sometimes")
