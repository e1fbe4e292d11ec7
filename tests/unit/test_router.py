"""The top-k router: float32 under autocast, aux losses, jitter, renormalisation modes against the authors' gate."""

import pytest
import torch
from helpers import VARIANTS, D, _make

from mhmoe import ConfigError, FFNConfig, build_ffn
from mhmoe.layers.router import expert_counts, load_balancing_loss, router_entropy, z_loss


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


def _renormalised_above_top1(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Top-1 keeps the raw softmax probability; for k > 1 the top-k probabilities are divided by their sum
    (clamped at the dtype's eps), as torchscale's `topkgating` does when its normalise flag is on."""
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
    expected = {"auto": _renormalised_above_top1(probs, k), "never": raw,
                "always": raw / raw.sum(-1, keepdim=True)}[mode]
    torch.testing.assert_close(routing.weights, expected)
    assert layer.cfg.renormalizes == (mode == "always" or (mode == "auto" and k > 1))
    if mode == "always" and k == 1:
        assert torch.equal(routing.weights, torch.ones_like(routing.weights))


def test_renormalize_default_is_auto_and_old_booleans_load():
    assert FFNConfig().renormalize == "auto"
    assert FFNConfig.from_dict({"renormalize": True}).renormalize == "always"
    assert FFNConfig.from_dict({"renormalize": False}).renormalize == "never"
    assert FFNConfig(renormalize=True).renormalize == "always"
    assert FFNConfig().override("renormalize", "false").renormalize == "never"
    assert FFNConfig().override("renormalize", "never").renormalize == "never"
    with pytest.raises(ConfigError, match="FFNConfig.renormalize: 'sometimes' is not allowed; use one of 'auto'"):
        FFNConfig().override("renormalize", "sometimes")



def test_aux_losses_of_an_empty_batch_are_zero_not_nan():
    router = _make(VARIANTS["mhmoe-h2"]).router
    routing = router(torch.randn(0, D // 2, requires_grad=True))
    E = router.num_experts
    for loss in (load_balancing_loss(routing.probs, routing.indices, E), z_loss(routing.logits),
                 router_entropy(routing.logits)):
        assert loss.shape == () and loss.item() == 0.0
    load_balancing_loss(routing.probs, routing.indices, E).backward()  # still part of the graph
    assert router.weight.grad is not None and not router.weight.grad.isnan().any()


def test_expert_counts_equal_bincount():
    idx = torch.randint(7, (13, 3))
    assert torch.equal(expert_counts(idx, 9), torch.bincount(idx.reshape(-1), minlength=9))
    assert expert_counts(idx[:0], 9).tolist() == [0] * 9


def test_weighted_aux_losses_equal_the_losses_of_the_kept_rows():
    """Row weights 0/1 (padding) give the losses of the rows with weight 1 alone; all-ones weights the plain ones."""
    torch.manual_seed(0)
    logits = torch.randn(10, 6)
    probs = logits.softmax(-1)
    indices = probs.topk(2, dim=-1).indices
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    rows = keep.bool()
    assert torch.allclose(load_balancing_loss(probs, indices, 6, keep),
                          load_balancing_loss(probs[rows], indices[rows], 6), atol=1e-6)
    assert torch.allclose(z_loss(logits, keep), z_loss(logits[rows]), atol=1e-6)
    ones = torch.ones(10)
    assert torch.allclose(load_balancing_loss(probs, indices, 6, ones), load_balancing_loss(probs, indices, 6))
    assert torch.allclose(z_loss(logits, ones), z_loss(logits))
