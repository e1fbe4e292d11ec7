"""The calculator checks itself: analytic counts == sum(p.numel()) and == the FLOP counter (at 2 threads, where
the experts could run on worker threads); section 2.3 recipe."""

import itertools
import json
import subprocess
import sys

import pytest
import torch
from helpers import VARIANTS, D

from mhmoe import FFNConfig, build_ffn
from mhmoe.cli import main
from mhmoe.complexity import (
    SMOE_PRESETS,
    active_param_count,
    count_flops,
    fine_grained,
    flops_per_token,
    model_flops_per_token,
    paper_scalar_mults,
    param_count,
    solve_parity,
)
from mhmoe.model import ModelConfig, Transformer

SMOE = FFNConfig(dim=768, hidden_dim=2048, num_experts=8, top_k=1)
PAPER = {
    "dense": FFNConfig(kind="dense", dim=768, hidden_dim=2048),
    "smoe": SMOE,
    "fine-grained": fine_grained(SMOE, 2),
    "mhmoe-h2": solve_parity(768, 2048, 8, 1, heads=2).mhmoe,
    "mhmoe-h3": solve_parity(768, 2048, 8, 1, heads=3).mhmoe,
}


@pytest.mark.parametrize("name", list(PAPER))
@pytest.mark.parametrize("shared", [0, 2048])
def test_param_count_equals_numel_for_paper_variants(name, shared):
    cfg = PAPER[name] if name == "dense" else PAPER[name].replace(shared_hidden_dim=shared)
    with torch.device("meta"):  # the shapes only: no 100-150 MB of weights to allocate and initialise
        layer = build_ffn(cfg)
    assert param_count(cfg).total == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize(
    "name, dispatch", [(n, d) for n in PAPER for d in ("auto", "sorted", "grouped_mm") if n != "dense" or d == "auto"]
)
def test_flops_equal_flop_counter_for_paper_variants(name, dispatch, two_threads):
    cfg = PAPER[name]
    if cfg.kind == "moe":
        # At 2 threads "inter-expert" would run the experts on worker threads, which the thread-local counter
        # cannot see: the layer must notice the counter and stay on the caller's thread.
        cfg = cfg.replace(dispatch=dispatch, threading="inter-expert", shared_hidden_dim=2048 if name == "smoe" else 0)
    layer = build_ffn(cfg)
    tokens = 48
    measured = count_flops(layer, torch.randn(2, tokens // 2, cfg.dim))
    analytic = flops_per_token(cfg).total * tokens
    assert abs(measured - analytic) <= 0.01 * analytic
    assert measured == analytic  # dropless dispatch makes the count exact


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_flops_equal_flop_counter_at_two_threads(name, two_threads):
    ffn = VARIANTS[name] if VARIANTS[name].kind == "dense" else VARIANTS[name].replace(threading="inter-expert")
    cfg = ModelConfig(vocab_size=96, dim=D, n_layers=2, n_heads=4, max_seq_len=16, moe_every=1,
                      dense_ffn=FFNConfig(kind="dense", dim=D, hidden_dim=64), moe_ffn=ffn)
    model = Transformer(cfg)
    idx = torch.randint(96, (2, 12))
    # Without seq_len: CPU's fused attention kernel has no FLOP formula in torch's counter, the projections do.
    assert count_flops(model, idx) == model_flops_per_token(cfg) * idx.numel()


def test_paper_configs_and_ratios():
    h2, h3 = solve_parity(768, 2048, 8, 1, heads=2), solve_parity(768, 2048, 8, 1, heads=3)
    assert (h2.mhmoe.hidden_dim, h2.mhmoe.top_k, h2.mhmoe.num_experts) == (768, 2, 40)
    assert (h3.mhmoe.hidden_dim, h3.mhmoe.top_k, h3.mhmoe.num_experts) == (512, 3, 96)
    # Why 40 and 96: exact parameter parity with head/merge counted is 41.33 and 93.0 experts.
    budget = 3 * 768 * 2048 * 8 + 768 * 8 - 2 * 768**2  # SMoE experts + router - head/merge
    assert h2.experts_exact == pytest.approx(budget / (3 * 384 * 768 + 384))  # 41.32
    assert h3.experts_exact == pytest.approx(budget / (3 * 256 * 512 + 256))  # 92.96
    assert h2.expert_multiple == 8 and h3.expert_multiple == 8
    for r in (h2, h3):
        assert abs(r.flops_ratio - 1) < 0.02 and r.leading_flops_ratio == pytest.approx(1.0)
        assert abs(r.params_ratio - 1) < 0.04
    # Without head/merge in the budget h=3 gives exactly 8 * 768 * 2048 / (256 * 512) = 96 experts.
    assert solve_parity(768, 2048, 8, 1, heads=3, count_head_merge=False, expert_multiple=1).mhmoe.num_experts == 96


def test_fine_grained_matches_smoe_flops_and_params_up_to_router():
    fg = fine_grained(SMOE, 2)
    assert (fg.hidden_dim, fg.num_experts, fg.top_k) == (1024, 16, 2)
    assert param_count(fg).experts == param_count(SMOE).experts
    assert flops_per_token(fg).experts == flops_per_token(SMOE).experts


@pytest.mark.parametrize(
    "dim, hidden, experts, top_k, heads",
    # "Sensible": expert hidden between D and 4D, sub-tokens of at least 64 features.
    [(d, int(d * r), e, k, h) for d, r, e, k, h in itertools.product(
        [256, 512, 768, 1024, 2048, 4096], [1.0, 8 / 3, 3.5, 4.0], [4, 8, 16, 64], [1, 2], [2, 3, 4, 8])
     if d % h == 0 and d // h >= 64],
)
def test_default_rounding_keeps_flops_within_2_percent(dim, hidden, experts, top_k, heads):
    try:
        r = solve_parity(dim, hidden, experts, top_k, heads)
    except ValueError as e:
        # Allowed only where eq. (8)/(9) ask for so many tiny experts that their router alone costs > 5% of the
        # SMoE's FLOPs, so that no (F', E') can match both budgets.
        f_lead = (3 * dim * hidden * top_k - 2 * dim**2) / (3 * dim * heads * top_k)
        e_lead = (3 * dim * hidden * experts - 2 * dim**2) / (3 * (dim // heads) * f_lead)
        assert dim * e_lead > 0.05 * 3 * dim * hidden * top_k and "no MH-MoE with h=" in str(e)
        return
    assert abs(r.flops_ratio - 1) <= 0.02, r.to_json()
    assert abs(r.params_ratio - 1) <= 0.1, r.to_json()
    assert r.mhmoe.top_k == heads * top_k


def test_paper_scalar_mult_formulas_match_section_2_2():
    d = 96
    smoe = FFNConfig(dim=d, hidden_dim=4 * d, num_experts=4, top_k=1)
    assert paper_scalar_mults(smoe)["total"] == 16 * d * d - 5 * d  # "16Bd^2 - 5Bd"
    mh = FFNConfig(dim=d, hidden_dim=3 * d, num_experts=4, top_k=1, heads=2, head_layer=True, merge_layer=True)
    assert paper_scalar_mults(mh)["total"] == 16 * d * d - 6 * d  # "16Bd^2 - 6Bd"
    assert paper_scalar_mults(smoe, tokens=7)["total"] == 7 * (16 * d * d - 5 * d)


def test_active_params():
    assert active_param_count(SMOE) == 768 * 8 + 3 * 768 * 2048
    h3 = PAPER["mhmoe-h3"]  # 3 sub-tokens x top-3 = 9 experts of 256 x 512
    assert active_param_count(h3) == 2 * 768**2 + 256 * 96 + 9 * 3 * 256 * 512


def test_presets_solve():
    for name, (d, f, e, k) in SMOE_PRESETS.items():
        r = solve_parity(d, f, e, k, heads=2)
        assert abs(r.flops_ratio - 1) < 0.02, name


def test_cli_parity_json(capsys):
    assert main(["parity", "--dim", "768", "--hidden-dim", "2048", "--num-experts", "8", "--top-k", "1",
                 "--heads", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mhmoe"]["hidden_dim"] == 512 and out["mhmoe"]["num_experts"] == 96 and out["mhmoe"]["top_k"] == 3
    assert abs(out["flops_ratio"] - 1) < 0.02 and 0.9 < out["params_ratio"] < 1.1


def test_cli_parity_text_and_errors(capsys):
    assert main(["parity", "--preset", "mixtral-8x7b", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "flops_ratio" in out and "4096" in out
    assert main(["parity", "--heads", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mhmoe parity: error: heads: dim (768) must be divisible by heads (5)"
    assert main(["parity", "--top-k", "9"]) == 2
    assert "--top-k: must be <= --num-experts (8)" in capsys.readouterr().err
    assert main(["parity", "--preset", "gpt5"]) == 2
    assert "--preset: unknown SMoE preset 'gpt5'" in capsys.readouterr().err


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "mhmoe.cli", "parity", "--heads", "2", "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(res.stdout)["mhmoe"]["num_experts"] == 40
