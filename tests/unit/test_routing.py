"""Routing beyond the paper (issue 16): sigmoid scoring, aux-loss-free bias balancing, the routing-health metrics
against hand-computed values, the dead-expert window, the per-step monitor and the BitNet routers' shared math."""

import copy
import math

import pytest
import torch
from helpers import D, _make
from safetensors.torch import load_model, save_model

from mhmoe import ConfigError, FFNConfig, build_ffn
from mhmoe.bitnet.integer import to_integer
from mhmoe.bitnet.modules import BitRouter, convert
from mhmoe.layers.balancing import moe_routers, update_router_biases
from mhmoe.layers.config import MoEAux
from mhmoe.layers.router import Routing, TopKRouter, load_balancing_loss
from mhmoe.layers.routing_stats import expert_activation, load_cv, load_max_mean, subtoken_distinct
from mhmoe.model import Transformer
from mhmoe.training.config import OptimConfig
from mhmoe.training.optim import build_optimizer
from mhmoe.training.presets import Base, model_config, preset
from mhmoe.training.routing_health import DeadExpertTracker, RoutingMonitor

# ----------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_checks():
    cfg = FFNConfig()
    assert (cfg.scoring, cfg.balancing, cfg.bias_rate) == ("softmax", "aux_loss", 1e-3)
    assert cfg.uses_aux_loss and not cfg.uses_bias
    assert FFNConfig(balancing="both").uses_aux_loss and FFNConfig(balancing="both").uses_bias
    with pytest.raises(ConfigError, match="FFNConfig.renormalize: scoring='sigmoid' normalises .* use renormalize="):
        FFNConfig(scoring="sigmoid", renormalize="never")
    with pytest.raises(ConfigError, match="FFNConfig.balancing: 'bias' with top_k=1 and renormalize='always'"):
        FFNConfig(top_k=1, balancing="bias", renormalize="always")
    FFNConfig(top_k=1, balancing="bias", renormalize="always", z_coef=1e-3)  # the z-loss still trains the router
    FFNConfig(top_k=1, balancing="both", renormalize="always")
    with pytest.raises(ConfigError, match="FFNConfig.bias_rate: must be > 0"):
        FFNConfig(bias_rate=0.0)
    with pytest.raises(ConfigError, match="FFNConfig.scoring: only applies to kind='moe'"):
        FFNConfig(kind="dense", scoring="sigmoid")
    with pytest.raises(ConfigError, match="FFNConfig.balancing: 'none' is not allowed; use one of 'aux_loss'"):
        FFNConfig().override("balancing", "none")


def test_variant_suffixes_compose():
    for variant, scoring, balancing in [("smoe-alf", "softmax", "bias"), ("smoe-sigmoid", "sigmoid", "aux_loss"),
                                        ("mhmoe-h3-alf", "softmax", "bias"),
                                        ("fine-grained-sigmoid-alf", "sigmoid", "bias"),
                                        ("mhmoe-h2-shared-alf", "softmax", "bias"),
                                        ("mhmoe-h2-nohm-hm-sigmoid", "sigmoid", "aux_loss")]:
        ffn = preset("smoke", variant).model.moe_ffn
        base = preset("smoke", variant.replace("-sigmoid", "").replace("-alf", "")).model.moe_ffn
        assert (ffn.scoring, ffn.balancing) == (scoring, balancing), variant
        assert ffn.replace(scoring="softmax", balancing="aux_loss") == base  # sizes and everything else unchanged
    with pytest.raises(ConfigError, match="the dense model takes no suffix"):
        preset("smoke", "dense-alf")
    with pytest.raises(ConfigError, match="appears twice"):
        preset("smoke", "smoe-alf-alf")


# ----------------------------------------------------------------------------------------------------------
# Scoring and the selection bias


def test_sigmoid_scores_normalised_topk_and_lb_on_normalised_scores():
    torch.manual_seed(0)
    for k, mode in [(2, "auto"), (3, "always"), (1, "auto"), (1, "always")]:
        layer = build_ffn(FFNConfig(dim=D, hidden_dim=8, num_experts=6, top_k=k, scoring="sigmoid", renormalize=mode))
        x = torch.randn(40, D)
        r = layer.router(x)
        s = (x @ layer.router.weight.t()).sigmoid()
        top, idx = s.topk(k, dim=-1)
        assert torch.equal(r.indices, idx)
        norm = k > 1 or mode == "always"  # "auto" keeps the raw score at top-1
        torch.testing.assert_close(r.weights, top / top.sum(-1, keepdim=True) if norm else top)
        torch.testing.assert_close(r.probs, s / s.sum(-1, keepdim=True))
        _, aux = layer(x.reshape(4, 10, D))
        torch.testing.assert_close(aux.lb_loss, load_balancing_loss(r.probs, r.indices, 6))
        p = r.probs
        torch.testing.assert_close(aux.router_entropy, -(p * p.log()).sum(-1).mean())


def test_bias_steers_selection_only_and_is_a_persistent_buffer_not_a_parameter():
    router = TopKRouter(4, 3, 1, scoring="softmax", bias=True, bias_rate=0.1)
    plain = TopKRouter(4, 3, 1)
    assert "expert_bias" in router.state_dict() and "expert_bias" not in plain.state_dict()
    assert plain.expert_bias is None and all(p is not router.expert_bias for p in router.parameters())
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 0.4]])
    p = logits.softmax(-1)
    assert router.route(logits).indices[:, 0].tolist() == [0, 1]
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    r = router.route(logits)
    assert r.indices[:, 0].tolist() == [2, 2]  # chosen on p + b ...
    assert torch.equal(r.weights, p[:, 2:3])  # ... weighted by p alone
    assert torch.equal(r.probs, p)


def test_bias_update_hand_computed():
    router = TopKRouter(4, 4, 1, bias=True, bias_rate=0.1)
    router.update_bias(torch.tensor([6, 2, 0, 4]))  # mean 3: experts 1, 2 under, 0, 3 over
    assert torch.equal(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))
    router.update_bias(torch.tensor([3, 3, 5, 1]))  # expert 0 and 1 at the mean: sign 0, no move
    assert torch.equal(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1 - 0.1, -0.1 + 0.1]))
    with pytest.raises(RuntimeError, match="has no bias"):
        TopKRouter(4, 4, 1).update_bias(torch.ones(4))


def test_update_router_biases_walks_the_model_in_depth_order_and_the_optimizer_never_sees_the_bias():
    base = Base(dim=48, n_layers=4, n_heads=4, hidden_dim=64, num_experts=4)
    cfg = model_config(base, "mhmoe-h2-alf", 97, 16)
    model = Transformer(cfg)
    routers = moe_routers(model)
    assert len(routers) == 2 and all(r.expert_bias is not None for r in routers)
    opt_ids = {id(p) for g in build_optimizer(model, OptimConfig()).param_groups for p in g["params"]}
    assert all(id(r.expert_bias) not in opt_ids for r in routers)
    E = cfg.moe_ffn.num_experts
    loads = [torch.arange(E), torch.arange(E).flip(0)]
    used = update_router_biases(model, loads)
    assert used.dtype == torch.float64 and torch.equal(used, torch.stack(loads).double())
    rate = cfg.moe_ffn.bias_rate
    mean = (E - 1) / 2
    want0 = torch.tensor([rate * math.copysign(1, mean - e) for e in range(E)], dtype=torch.float32)
    assert torch.equal(routers[0].expert_bias, want0) and torch.equal(routers[1].expert_bias, want0.flip(0))
    with pytest.raises(ValueError, match="3 load rows for 2 MoE routers"):
        update_router_biases(model, torch.zeros(3, E))
    # A model without biases is left alone.
    plain = Transformer(model_config(base, "mhmoe-h2", 97, 16))
    update_router_biases(plain, loads)
    assert all(r.expert_bias is None for r in moe_routers(plain))


def test_bias_state_round_trip_is_bit_exact(tmp_path):
    base = Base(dim=48, n_layers=2, n_heads=2, hidden_dim=64, num_experts=4)
    cfg = model_config(base, "smoe-sigmoid-alf", 97, 16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    router = moe_routers(model)[0]
    for _ in range(5):
        router.update_bias(torch.randint(0, 50, (4,)))
    router.expert_bias.add_(torch.randn(4) * 1e-3)  # arbitrary low bits
    save_model(model, str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    again = Transformer(cfg)
    assert not torch.equal(moe_routers(again)[0].expert_bias, router.expert_bias)
    missing, unexpected = load_model(again, str(tmp_path / "m.safetensors"), strict=False)
    assert not missing and not unexpected
    assert torch.equal(moe_routers(again)[0].expert_bias, router.expert_bias)
    idx = torch.randint(0, 97, (2, 16))
    model.eval(), again.eval()
    assert torch.equal(model(idx).logits, again(idx).logits)
    sd = again.state_dict()
    sd2 = copy.deepcopy(sd)
    again.load_state_dict(sd2)
    assert torch.equal(again.state_dict()["blocks.1.ffn.router.expert_bias"], router.expert_bias)


def test_skewed_router_balances_under_bias_updates_and_stays_put_without():
    E, Din, N = 8, 16, 512
    skew = torch.zeros(Din)
    skew[0] = 3.0  # every token shares an offset that the gate maps onto expert 0's logit

    def run(bias: bool) -> list[float]:
        torch.manual_seed(0)
        router = TopKRouter(Din, E, 2, renormalize=True, bias=bias, bias_rate=3e-3)
        with torch.no_grad():
            router.weight.normal_(0, 0.3)
            router.weight[0, 0] = 0.5
        gen = torch.Generator().manual_seed(1)
        cvs = []
        for _ in range(300):
            x = torch.randn(N, Din, generator=gen) + skew
            r = router(x)
            load = torch.bincount(r.indices.reshape(-1), minlength=E)
            cvs.append(load_cv(load).item())
            if bias:
                router.update_bias(load)
        return cvs

    with_bias, without = run(True), run(False)

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    start = mean(without[:20])
    assert start > 0.9  # deliberately skewed: expert 0 in nearly every top-2
    assert mean(with_bias[:20]) > 0.7
    assert mean(with_bias[-20:]) < 0.15 * start and max(with_bias[-20:]) < 0.25  # balanced by the bias alone
    assert mean(without[-20:]) == pytest.approx(start, rel=0.05)  # no updates: stays put


# ----------------------------------------------------------------------------------------------------------
# Health metrics, exact on constructed routings


def test_load_cv_and_max_mean_hand_computed():
    load = torch.tensor([4, 0, 2, 2])  # mean 2, deviations (2, -2, 0, 0): population variance 2
    assert load_cv(load).item() == pytest.approx(math.sqrt(2) / 2, abs=1e-7)
    assert load_max_mean(load).item() == 2.0
    assert load_cv(torch.tensor([3, 3, 3])).item() == 0.0 and load_max_mean(torch.tensor([3, 3, 3])).item() == 1.0
    assert load_cv(torch.tensor([6.0, 0.0, 0.0])).item() == pytest.approx(math.sqrt(2), abs=1e-6)


def test_expert_activation_on_a_two_sequence_batch():
    # E = 4, top-1, 2 sequences of 3 tokens: sequence 0 hits {0, 1} (2/4), sequence 1 hits {1, 2, 3} (3/4).
    idx = torch.tensor([[0], [0], [1], [3], [2], [1]])
    assert expert_activation(idx, 2, 4).item() == pytest.approx((0.5 + 0.75) / 2)
    assert expert_activation(idx, 1, 4).item() == 1.0  # one sequence of 6 tokens hits all 4
    # Top-2, MH-MoE h=2, B=2, T=2: rows b*T*h .. (b+1)*T*h-1 belong to sequence b; E = 6.
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1],  # sequence 0: {0, 1} = 2/6
                        [2, 3], [4, 5], [5, 2], [3, 4]])  # sequence 1: {2, 3, 4, 5} = 4/6
    assert expert_activation(idx, 2, 6).item() == pytest.approx((2 / 6 + 4 / 6) / 2)
    with pytest.raises(ValueError, match="do not split into 3 sequences"):
        expert_activation(idx, 3, 6)
    assert math.isnan(expert_activation(idx[:0], 0, 6).item())  # an empty batch has no activation


def test_subtoken_distinct_h2_h3_and_h1():
    # h=2, 4 tokens: (0,1) yes, (2,2) no, (3,0) yes, (1,1) no -> 0.5; column 1 (second choices) is ignored.
    idx = torch.tensor([[0, 5], [1, 5], [2, 0], [2, 1], [3, 3], [0, 3], [1, 2], [1, 0]])
    assert subtoken_distinct(idx, 2).item() == 0.5
    # h=3: (0,1,2) yes, (0,1,0) no (the repeat is not adjacent), (2,2,2) no, (3,1,2) yes -> 0.5
    top1 = torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 2, 3, 1, 2])
    assert subtoken_distinct(top1[:, None], 3).item() == 0.5
    assert subtoken_distinct(torch.tensor([[0], [1], [2], [3], [4], [5]]), 3).item() == 1.0
    assert math.isnan(subtoken_distinct(top1[:, None], 1).item())


def test_layer_reports_the_health_of_its_own_routing():
    cfg = FFNConfig(dim=D, hidden_dim=8, num_experts=5, top_k=2, heads=3, head_layer=True, merge_layer=True)
    layer = _make(cfg)
    x = torch.randn(2, 7, D)
    captured = []
    layer.router.register_forward_hook(lambda m, a, out: captured.append(out))
    _, aux = layer(x)
    r = captured[0]
    load = torch.bincount(r.indices.reshape(-1), minlength=5)
    assert torch.equal(aux.tokens_per_expert, load)
    assert torch.equal(aux.load_cv, load_cv(load)) and torch.equal(aux.load_max_mean, load_max_mean(load))
    assert torch.equal(aux.expert_activation, expert_activation(r.indices, 2, 5))
    assert torch.equal(aux.subtoken_distinct, subtoken_distinct(r.indices, 3))
    assert math.isnan(_make(FFNConfig(dim=D, hidden_dim=8, num_experts=4))(x)[1].subtoken_distinct.item())
    z = MoEAux.zeros()
    assert z.load_cv.item() == 0 and z.expert_activation.item() == 0


def test_bias_balancing_adds_no_lb_loss_but_reports_it():
    x = torch.randn(2, 6, D)
    torch.manual_seed(0)
    aux_layer = _make(FFNConfig(dim=D, hidden_dim=8, num_experts=4, top_k=2, z_coef=1e-3))
    bias_layer = build_ffn(aux_layer.cfg.replace(balancing="bias"))
    both_layer = build_ffn(aux_layer.cfg.replace(balancing="both"))
    bias_layer.load_state_dict(aux_layer.state_dict(), strict=False)
    both_layer.load_state_dict(aux_layer.state_dict(), strict=False)
    _, a = aux_layer(x)
    _, b = bias_layer(x)  # zero bias: the same routing
    _, c = both_layer(x)
    assert torch.equal(a.lb_loss, b.lb_loss) and not b.lb_loss.requires_grad
    assert torch.equal(b.loss, 1e-3 * b.z_loss)
    assert torch.equal(a.loss, c.loss)


# ----------------------------------------------------------------------------------------------------------
# Dead experts and the per-step monitor


def test_dead_expert_window_hand_computed():
    t = DeadExpertTracker(layers=1, experts=3, window=2)
    t.update(1, torch.tensor([[1, 0, 0]]))
    assert t.dead(1).tolist() == [0]  # step 1 < window: nothing can be dead yet
    t.update(2, torch.tensor([[0, 1, 0]]))
    assert t.dead(2).tolist() == [1]  # expert 2: nothing in steps 1..2
    t.update(3, torch.tensor([[0, 0, 0]]))
    assert t.dead(3).tolist() == [2]  # expert 0 last seen at 1: steps 2..3 empty; expert 2 still dead
    t.update(4, torch.tensor([[0, 0, 5]]))
    assert t.dead(4).tolist() == [2]  # expert 2 back; experts 0 and 1 dead
    state = t.state_dict()
    u = DeadExpertTracker(1, 3, 2, start=4)
    u.load_state_dict(state)
    assert torch.equal(u.last_seen, t.last_seen) and u.last_seen.tolist() == [[1, 2, 4]]
    with pytest.raises(ValueError, match="DeadExpertTracker: state for"):
        DeadExpertTracker(2, 3, 2).load_state_dict(state)


def _aux(load, activation, distinct, entropy):
    t = torch.tensor
    z = t(0.0)
    return MoEAux(z, z, z, t(entropy), t(load), z, z, z, t(activation), t(distinct))


def test_monitor_sums_micro_batches_updates_biases_and_records_one_value_per_layer():
    base = Base(dim=48, n_layers=4, n_heads=4, hidden_dim=64, num_experts=4)
    cfg = preset("smoke", "smoe").replace(model=model_config(base, "mhmoe-h2-alf", 97, 64), dead_expert_window=2)
    model = Transformer(cfg.model)
    E = cfg.model.moe_ffn.num_experts
    mon = RoutingMonitor(model, cfg, "cpu")
    loads1 = [[4] + [0] * (E - 1), [1] * E]
    loads2 = [[0, 4] + [0] * (E - 2), [1] * E]
    mon.add([_aux(loads1[0], 0.5, 1.0, 2.0), _aux(loads1[1], 0.25, 0.5, 1.0)])
    mon.add([_aux(loads2[0], 0.7, 0.0, 3.0), _aux(loads2[1], 0.75, 0.5, 2.0)])
    mon.end_step(1)
    rec = mon.record()
    assert rec["tokens_per_expert"] == [[4, 4] + [0] * (E - 2), [2] * E]
    assert rec["expert_activation"] == pytest.approx([0.6, 0.5])
    assert rec["subtoken_distinct"] == pytest.approx([0.5, 0.5])
    assert rec["router_entropy_per_layer"] == pytest.approx([2.5, 1.5])
    summed = torch.tensor(rec["tokens_per_expert"][0], dtype=torch.float64)
    assert rec["load_cv"] == pytest.approx([load_cv(summed).item(), 0.0])
    assert rec["load_max_mean"] == pytest.approx([E / 2, 1.0])
    assert rec["expert_load_max_over_mean"] == pytest.approx(rec["load_max_mean"])  # float32, as before
    assert rec["dead_experts"] == [0, 0]
    rate = cfg.model.moe_ffn.bias_rate
    want = torch.tensor([-rate, -rate] + [rate] * (E - 2))  # the update of the summed load, once
    routers = moe_routers(model)
    assert torch.equal(routers[0].expert_bias, want) and torch.equal(routers[1].expert_bias, torch.zeros(E))
    assert rec["bias_norm"] == pytest.approx([want.double().norm().item(), 0.0])
    mon.add([_aux(loads1[0], 0.5, 1.0, 2.0), _aux(loads1[1], 0.5, 1.0, 2.0)])
    mon.end_step(2)
    assert mon.record()["dead_experts"] == [E - 2, 0]  # experts 2.. had nothing in steps 1..2
    # SMoE: subtoken_distinct is null; a dense model records empty lists.
    smoe = preset("smoke", "smoe")
    mon = RoutingMonitor(Transformer(smoe.model), smoe, "cpu")
    mon.add([_aux([2, 2, 2, 2], 1.0, float("nan"), 1.0)])
    mon.end_step(1)
    rec = mon.record()
    assert rec["subtoken_distinct"] is None and "bias_norm" not in rec and rec["load_cv"] == [0.0]
    dense = preset("smoke", "dense")
    mon = RoutingMonitor(Transformer(dense.model), dense, "cpu")
    mon.add([])
    mon.end_step(1)
    assert mon.record()["load_cv"] == [] and mon.record()["tokens_per_expert"] == []


# ----------------------------------------------------------------------------------------------------------
# BitNet routers reuse the routing math


@pytest.mark.parametrize("variant", ["mhmoe-h2-sigmoid-alf", "smoe-alf", "fine-grained-sigmoid"])
def test_bitnet_routers_share_route_and_bias(variant):
    base = Base(dim=48, n_layers=2, n_heads=2, hidden_dim=64, num_experts=4)
    cfg = model_config(base, variant, 97, 16)
    torch.manual_seed(0)
    fp = Transformer(cfg)
    if cfg.moe_ffn.uses_bias:
        moe_routers(fp)[0].expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]).repeat(
            cfg.moe_ffn.num_experts // 4))
    bit = convert(copy.deepcopy(fp), router=True)
    r_fp, r_bit = moe_routers(fp)[0], moe_routers(bit)[0]
    assert isinstance(r_bit, BitRouter) and r_bit.scoring == cfg.moe_ffn.scoring
    assert (r_bit.expert_bias is None) == (not cfg.moe_ffn.uses_bias)
    if r_bit.expert_bias is not None:
        assert torch.equal(r_bit.expert_bias, r_fp.expert_bias)
    x = torch.randn(30, r_fp.weight.shape[1])
    routed = r_bit(x)
    with torch.no_grad():
        direct = r_bit.route(r_bit.project(x))
    assert torch.equal(routed.indices, direct.indices) and torch.equal(routed.weights, direct.weights)
    bit.eval()
    integer = to_integer(copy.deepcopy(bit))
    r_int = moe_routers(integer)[0]
    if r_bit.expert_bias is not None:
        assert torch.equal(r_int.expert_bias, r_bit.expert_bias) and "blocks.1.ffn.router.expert_bias" in \
            integer.state_dict()
    with torch.no_grad():
        a, b = r_bit(x), r_int(x)
    assert isinstance(a, Routing) and torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(bit(idx).logits, integer(idx).logits)
