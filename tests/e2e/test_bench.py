"""`mhmoe bench`: the transformers peer computes our SMoE's function, the naive loop ours, the intervals of the
per-round ratios and the sampling that narrows them, and the JSON contract. Nothing here asserts a speed."""

import json
import math

import numpy as np
import pytest
import torch

from mhmoe import FFNConfig, build_ffn
from mhmoe.bench import (
    hf_implementations,
    hf_mixtral_block,
    layer_variants,
    naive_forward,
)
from mhmoe.cli import main

RECORD_KEYS = {"variant", "dtype", "mode", "threads", "median_ms", "gflops", "frac_of_gemm", "peak_mem_mb",
               "ratio_to_smoe", "ratio_ci", "frac_of_gemm_ci", "ci_coverage", "rounds", "target_reached", "mfu",
               "device"}
FAST = ["--max-seconds", "0"]  # exactly --rounds rounds: the tests check plumbing, not the stopping rule


def _out_and_grads(module, fn, x, g):
    module.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = fn(xg)
    y.backward(g)
    return y.detach(), xg.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


# transformers' experts implementations that run on a CPU, written out: asking transformers (hf_implementations)
# when pytest collects imports its MoE integrations, DTensor and sympy in every xdist worker (about 2 s each).
HF_CPU = ["eager", "batched_mm", "grouped_mm"]


def test_the_peer_covers_every_cpu_implementation_of_transformers():
    pytest.importorskip("transformers")
    assert hf_implementations(torch.device("cpu")) == HF_CPU  # a new one: add it to HF_CPU


@pytest.mark.parametrize("implementation", HF_CPU)
def test_hf_mixtral_block_equals_our_smoe(implementation):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = build_ffn(FFNConfig(kind="moe", dim=64, hidden_dim=96, num_experts=4, top_k=2, renormalize=True))
    block = hf_mixtral_block(ours, implementation)
    x, g = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    y, gx, gp = _out_and_grads(ours, lambda t: ours(t)[0], x, g)
    y_hf, gx_hf, gp_hf = _out_and_grads(block, block, x, g)
    torch.testing.assert_close(y_hf, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_hf, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp_hf["gate.weight"], gp["router.weight"], rtol=1e-4, atol=1e-6)
    g13 = gp_hf["experts.gate_up_proj"]  # [E, 2F, D] = [W1^T; W3^T]
    torch.testing.assert_close(g13[:, :96].transpose(1, 2), gp["experts.w1"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g13[:, 96:].transpose(1, 2), gp["experts.w3"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp_hf["experts.down_proj"].transpose(1, 2), gp["experts.w2"], rtol=1e-5, atol=1e-6)


def test_hf_peer_rejects_mh_moe():
    pytest.importorskip("transformers")
    mh = build_ffn(layer_variants(96, 256, 4)["mhmoe-h2"])
    with pytest.raises(ValueError, match="plain SMoE"):
        hf_mixtral_block(mh, "eager")


@pytest.mark.parametrize("variant", ["smoe", "fine-grained", "mhmoe-h3"])
def test_naive_loop_equals_layer(variant):
    torch.manual_seed(1)
    layer = build_ffn(layer_variants(96, 256, 4)[variant])
    x, g = torch.randn(1, 40, 96), torch.randn(1, 40, 96)
    ref = _out_and_grads(layer, lambda t: layer(t)[0], x, g)
    got = _out_and_grads(layer, lambda t: naive_forward(layer, t)[0], x, g)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-6)


def test_bench_layers_json_contract(capsys):
    argv = ["bench", "layers", "--json", "--tokens", "64", "--dim", "96", "--hidden-dim", "256", "--num-experts",
            "4", "--rounds", "2", "--dtypes", "float32", "--impls", "sorted,naive", *FAST]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    recs = out["records"]
    hf = {f"hf-{n}" for n in hf_implementations(torch.device("cpu"))}
    assert {r["variant"] for r in recs} == {"dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"} | hf
    assert {(r["mode"], r["dtype"]) for r in recs} == {("fwd", "float32"), ("fwd+bwd", "float32")}
    for r in recs:
        assert RECORD_KEYS <= set(r), sorted(RECORD_KEYS - set(r))
        assert r["threads"] == 1 and r["median_ms"] > 0 and r["gflops"] > 0 and r["frac_of_gemm"] > 0
        assert r["peak_mem_mb"] > 0 and r["rounds"] == 2 and r["device"] == "cpu" and r["mfu"] is None
        for value, ci in ((r["ratio_to_smoe"], r["ratio_ci"]), (r["frac_of_gemm"], r["frac_of_gemm_ci"])):
            assert ci[0] <= value <= ci[1]
        if r["ratio_to_sorted"] is not None:
            assert r["ratio_to_sorted_ci"][0] <= r["ratio_to_sorted"] <= r["ratio_to_sorted_ci"][1]
    smoe = [r for r in recs if r["variant"] == "smoe" and r["impl"] == "sorted"]
    assert [r["ratio_to_smoe"] for r in smoe] == [1.0, 1.0] and [r["ratio_ci"] for r in smoe] == [[1.0, 1.0]] * 2
    # Two rounds cannot give a 95% interval, whatever the spread.
    assert not any(r["target_reached"] for r in recs if r["variant"] != "smoe")
    meta = out["meta"]
    assert meta["sampling"]["float32"]["rounds"] == 2 and meta["target_reached"] is False
    assert meta["target_ci"] == 0.03 and meta["min_rounds"] == 2 and meta["peak_tflops"] is None
    # Two implementations of each MoE variant (sorted, naive); the peer and dense once per mode.
    assert sum(r["variant"] == "mhmoe-h3" for r in recs) == 4 and sum(r["variant"] == "dense" for r in recs) == 2
    assert set(out["meta"]["gemm_gflops"]) == {"float32/fwd", "float32/fwd+bwd"}


def test_bench_layers_scatter_impl_and_the_default_impls(capsys):
    """--impls scatter: each MoE variant rebuilt with dispatch="scatter" (its torch twin on CPU), checked against the
    sorted layer, timed. By default CUDA runs also time grouped_mm and auto's pick there (scatter with Triton)."""
    from mhmoe.cli.bench import default_impls

    assert default_impls("cpu") == ["sorted"]
    assert default_impls("cuda") == ["auto", "sorted", "grouped_mm"]  # auto: scatter with Triton
    argv = ["bench", "layers", "--json", "--tokens", "64", "--dim", "96", "--hidden-dim", "256", "--num-experts",
            "4", "--rounds", "1", "--dtypes", "float32", "--modes", "fwd+bwd", "--impls", "sorted,scatter",
            "--no-hf", "--no-memory", *FAST]
    assert main(argv) == 0
    recs = json.loads(capsys.readouterr().out)["records"]
    assert {r["variant"] for r in recs if r["impl"] == "scatter"} == {"smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"}
    assert all(r["ratio_to_sorted"] is not None for r in recs if r["impl"] == "scatter")


def test_frac_of_gemm_pairs_each_round_with_the_gemm_of_that_round():
    from mhmoe.bench import paired_frac_of_gemm

    # Rates per round, layer / GEMM: (6/2)/(6/1) = 0.5, (6/4)/(6/2) = 0.5, (6/3)/(6/3) = 1.0 -> median 0.5; a
    # ratio of medians would give (6/3)/(6/2) = 0.667.
    assert paired_frac_of_gemm(6.0, [2.0, 4.0, 3.0], 6.0, [1.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert paired_frac_of_gemm(12.0, [1.0], 6.0, [1.0]) == pytest.approx(2.0)


def test_bench_layers_intra_op_impl_only_with_threads(capsys):
    before = torch.get_num_threads()
    try:
        _intra_op_impl_only_with_threads(capsys)
    finally:
        torch.set_num_threads(before)  # --threads sets the process's torch threads


def _intra_op_impl_only_with_threads(capsys):
    argv = ["bench", "layers", "--json", "--tokens", "64", "--dim", "96", "--hidden-dim", "256", "--num-experts",
            "4", "--rounds", "1", "--dtypes", "float32", "--modes", "fwd+bwd", "--impls", "sorted,intra-op",
            "--no-hf", "--no-memory", *FAST]
    assert main([*argv, "--threads", "2"]) == 0
    recs = json.loads(capsys.readouterr().out)["records"]
    assert {r["variant"] for r in recs if r["impl"] == "intra-op"} == {"smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"}
    assert all(r["threads"] == 2 for r in recs)
    assert main([*argv, "--threads", "1"]) == 0  # at one thread intra-op is the sorted layer itself: not repeated
    recs = json.loads(capsys.readouterr().out)["records"]
    assert not [r for r in recs if r["impl"] == "intra-op"] and all(r["threads"] == 1 for r in recs)


def test_bench_train_json_contract(capsys):
    assert main(["bench", "train", "--json", "--preset", "smoke", "--variants", "smoe,mhmoe-h3", "--rounds", "3",
                 "--threads", "1", "--peak-tflops", "2", *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    recs = out["records"]
    assert [r["variant"] for r in recs] == ["smoe", "mhmoe-h3"]
    for r in recs:
        assert RECORD_KEYS <= set(r) and r["mode"] == "train" and r["dtype"] == "float32" and r["rounds"] == 3
        assert r["tok_per_s"] == pytest.approx(r["tokens_per_step"] / (r["median_ms"] / 1e3))
        assert r["tokens_per_step"] == r["micro_batch"] * r["accum"] * 64  # the smoke preset's 64-token windows
        assert r["ratio_ci"][0] <= r["ratio_to_smoe"] <= r["ratio_ci"][1]
        assert r["tok_s_x_smoe_ci"][0] <= r["tok_s_x_smoe"] <= r["tok_s_x_smoe_ci"][1]
        assert r["frac_of_gemm_ci"][0] <= r["frac_of_gemm"] <= r["frac_of_gemm_ci"][1]
        assert r["mfu"] == pytest.approx(r["gflops"] / 2e3)
        assert r["compile"] == "off" and r["compiled"] is False  # the smoke preset does not compile
    assert recs[0]["ratio_to_smoe"] == 1.0 and recs[0]["ratio_ci"] == [1.0, 1.0] and recs[0]["tok_s_x_smoe"] == 1.0
    assert out["meta"]["peak_tflops"] == 2.0 and out["meta"]["peak_tflops_from"] == "--peak-tflops"
    assert out["meta"]["compile"] == "preset" and out["meta"]["profile"] is None


def test_bench_train_profile_writes_the_files_of_the_chosen_variants(capsys, tmp_path):
    assert main(["bench", "train", "--json", "--preset", "smoke", "--variants", "dense,smoe", "--rounds", "1",
                 "--threads", "1", "--no-memory", "--profile", str(tmp_path / "prof"), "--profile-variants", "smoe",
                 "--profile-steps", "1", *FAST]) == 0
    assert [r["variant"] for r in json.loads(capsys.readouterr().out)["records"]] == ["dense", "smoe"]
    prof = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert list(prof["variants"]) == ["smoe/float32"] and prof["steps_per_variant"] == 1
    assert prof["compile"] == {"smoe/float32": "off"} and prof["tokens_per_step"] == {"smoe/float32": 512}
    assert (tmp_path / "prof" / "trace.json").is_file() and (tmp_path / "prof" / "profile.md").is_file()


def test_bench_layers_auto_flags_what_auto_runs_and_compares_with_it(capsys):
    argv = ["bench", "layers", "--json", "--tokens", "64", "--dim", "96", "--hidden-dim", "256", "--num-experts",
            "4", "--rounds", "2", "--dtypes", "float32", "--modes", "fwd+bwd", "--impls", "auto,grouped_mm",
            "--no-memory", *FAST]
    assert main(argv) == 0
    recs = json.loads(capsys.readouterr().out)["records"]
    auto = {(r["variant"], r["impl"]) for r in recs if r["auto"]}
    # On CPU dispatch="auto" is the sorted path; the dense layer is its own.
    assert auto == {("dense", "dense")} | {(v, "sorted") for v in ("smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3")}
    assert {r["impl"] for r in recs if r["variant"] == "smoe"} == {"sorted", "grouped_mm"}
    for r in recs:
        assert r["ratio_to_smoe_auto_ci"][0] <= r["ratio_to_smoe_auto"] <= r["ratio_to_smoe_auto_ci"][1]
        assert r["ratio_to_dense_ci"][0] <= r["ratio_to_dense"] <= r["ratio_to_dense_ci"][1]
    smoe_auto = next(r for r in recs if r["variant"] == "smoe" and r["auto"])
    assert smoe_auto["ratio_to_smoe_auto"] == 1.0 and smoe_auto["ratio_to_smoe_auto"] == smoe_auto["ratio_to_smoe"]
    assert any(r["variant"].startswith("hf-") and not r["auto"] for r in recs) == bool(hf_implementations(
        torch.device("cpu")))


def test_bench_train_dtypes_compare_bf16_with_fp32(capsys):
    assert main(["bench", "train", "--json", "--preset", "smoke", "--variants", "smoe,mhmoe-h3", "--dtypes",
                 "float32,bfloat16", "--rounds", "2", "--threads", "1", "--no-memory", *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    recs = {(r["variant"], r["dtype"]): r for r in out["records"]}
    assert list(recs) == [("smoe", "float32"), ("smoe", "bfloat16"), ("mhmoe-h3", "float32"),
                          ("mhmoe-h3", "bfloat16")]
    assert set(out["meta"]["gemm_gflops"]) == {"float32/train", "bfloat16/train"}
    for (variant, dtype), r in recs.items():
        # x SMoE within the dtype: SMoE is 1 against itself in each; x float32 only on the bfloat16 rows.
        assert (r["ratio_to_smoe"] == 1.0) == (variant == "smoe")
        assert ("ratio_to_float32" in r) == (dtype == "bfloat16")
        if dtype == "bfloat16":
            lo, hi = r["ratio_to_float32_ci"]
            assert lo <= r["ratio_to_float32"] <= hi


@pytest.mark.parametrize("argv, message", [
    (["bench", "layers", "--dtypes", "float16"], "--dtypes: expected a comma-separated subset of float32, bfloat16"),
    (["bench", "train", "--dtypes", "fp32"], "--dtypes: expected a comma-separated subset of float32, bfloat16"),
    (["bench", "layers", "--dim", "100"], "--dim: must be divisible by 2 and 3"),
    (["bench", "layers", "--impls", "magic"], "--impls: expected a comma-separated subset"),
    (["bench", "layers", "--rounds", "0"], "--rounds: must be >= 1"),
    (["bench", "train", "--compile-backend", "tvm"], "--compile-backend: expected one of inductor, aot_eager, eager, "
                                                     "got 'tvm'"),
    (["bench", "layers", "--target-ci", "0"], "--target-ci: expected a fraction in (0, 1], e.g. 0.03 for +-3%"),
    (["bench", "train", "--target-ci", "3%"], "--target-ci: expected a fraction in (0, 1]"),
    (["bench", "layers", "--max-seconds", "-1"], "--max-seconds: expected seconds >= 0"),
    (["bench", "layers", "--max-seconds", "nan"], "--max-seconds: expected seconds >= 0"),
    (["bench", "layers", "--peak-tflops", "0"], "--peak-tflops: expected TFLOP/s > 0, e.g. 989"),
    (["bench", "train", "--device", "tpu"], "--device: expected cpu or cuda, got 'tpu'"),
    (["bench", "train", "--preset", "huge"], "--preset: unknown preset 'huge'"),
    (["bench", "train", "--preset", "smoke", "--variants", "smoe,mega"], "unknown variant 'mega'"),
    (["bench", "train", "--compile", "max"], "--compile: expected one of preset, auto, off, on, cudagraphs (bare --compile: on)"),
    (["bench", "train", "--variants", "smoe,dense", "--profile-variants", "mhmoe-h3"],
     "--profile-variants: expected a comma-separated subset of smoe, dense, got 'mhmoe-h3'"),
    (["bench", "train", "--profile-steps", "0"], "--profile-steps: must be >= 1, got 0"),
    (["bench", "train", "--profile", " "], "--profile: expected a folder"),
])
def test_bench_bad_flags_one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_layers_default_dtypes_follow_native_bf16(cpu_kind, capsys):
    argv = ["bench", "layers", "--json", "--tokens", "32", "--dim", "96", "--hidden-dim", "256", "--num-experts",
            "4", "--rounds", "1", "--modes", "fwd", "--no-hf", "--no-memory", *FAST]
    assert main(argv) == 0
    dtypes = {"avx2-only": {"float32"}, "bf16-native": {"float32", "bfloat16"}}[cpu_kind]
    assert {r["dtype"] for r in json.loads(capsys.readouterr().out)["records"]} == dtypes


# ----------------------------------------------------------------------------------------------------------
# The interval of a median and the sampling that narrows it (fake clocks: no real timing)


# (n, lo, hi, coverage): 0-based order statistics [x(lo), x(hi)] of the 95% interval, by hand. P(miss below) =
# P(B <= lo) for B ~ Binomial(n, 1/2) = sum_{i <= lo} C(n, i) / 2^n, the largest lo with that <= 0.025.
# Below n = 6 even [min, max] misses with 2 / 2^n > 0.05: the interval is [min, max] with its lower coverage.
HAND = [
    (1, 0, 0, 0.0),
    (2, 0, 1, 1 - 2 * 1 / 4),
    (5, 0, 4, 1 - 2 * 1 / 32),
    (6, 0, 5, 1 - 2 * 1 / 64),
    (8, 0, 7, 1 - 2 * 1 / 256),
    (9, 1, 7, 1 - 2 * (1 + 9) / 512),  # C(9,0)+C(9,1) = 10: 10/512 = 0.0195
    (10, 1, 8, 1 - 2 * (1 + 10) / 1024),  # 11/1024 = 0.0107; with C(10,2) = 45: 56/1024 = 0.055 > 0.025
    (11, 1, 9, 1 - 2 * (1 + 11) / 2048),  # with C(11,2) = 55: 67/2048 = 0.033
    (12, 2, 9, 1 - 2 * (1 + 12 + 66) / 4096),  # 79/4096 = 0.0193
    (20, 5, 14, 1 - 2 * (1 + 20 + 190 + 1140 + 4845 + 15504) / 2**20),  # 21700/2^20 = 0.0207; +C(20,6): 0.058
]


@pytest.mark.parametrize("n, lo, hi, coverage", HAND)
def test_order_statistic_indices_by_hand(n, lo, hi, coverage):
    from mhmoe.bench import order_statistic_indices

    got_lo, got_hi, got_cov = order_statistic_indices(n)
    assert (got_lo, got_hi) == (lo, hi)
    assert got_cov == pytest.approx(coverage, abs=1e-12)


def test_median_ci_takes_those_order_statistics():
    from mhmoe.bench import median_ci

    values = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 6.0, 4.0]  # 1..10 shuffled: n=10 -> x(2), x(9)
    ci = median_ci(values)
    assert (ci.median, ci.lo, ci.hi, ci.n) == (5.5, 2.0, 9.0, 10)
    assert ci.narrow(0.7) and not ci.narrow(0.6)  # half-width max(9-5.5, 5.5-2) / 5.5 = 0.636
    few = median_ci([1.0, 1.0, 1.0, 1.0, 1.0])  # too few rounds for 95%: never narrow, even with no spread
    assert few.halfwidth() == 0 and not few.narrow(0.03)


def test_median_ci_covers_the_median_of_a_lognormal_ratio():
    """Per-round ratios of two lognormal timings: exp(N(mu1, s)) / exp(N(mu2, s)) has median exp(mu1 - mu2).
    Over many synthetic runs the interval covers it about as often as its exact coverage says."""
    from mhmoe.bench import median_ci

    rng = np.random.default_rng(0)
    true_median = math.exp(0.3 - 0.1)
    for n, runs in ((9, 1500), (20, 1500)):
        hits, coverage = 0, None
        for _ in range(runs):
            ratio = np.exp(rng.normal(0.3, 0.2, n)) / np.exp(rng.normal(0.1, 0.2, n))
            ci = median_ci(list(ratio))
            hits += ci.lo <= true_median <= ci.hi
            coverage = ci.coverage
        # 1500 runs: binomial standard error about 0.005 around the exact coverage (0.961 at n=9, 0.959 at 20).
        assert abs(hits / runs - coverage) < 0.025, (n, hits / runs, coverage)
    big = np.exp(rng.normal(0.3, 0.2, 2001)) / np.exp(rng.normal(0.1, 0.2, 2001))
    ci = median_ci(list(big))
    assert ci.lo <= true_median <= ci.hi and ci.halfwidth() < 0.03


class FakeClock:
    """A clock the fake callables advance: each call 'takes' the seconds it adds."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def spend(self, seconds):
        self.t += seconds


def _fake_calls(clock, spread, seed=0):
    """Two fake implementations: 'a' takes 1 s, 'b' twice as long times a noise factor in [1-spread, 1+spread]."""
    rng = np.random.default_rng(seed)
    return {"a": lambda: clock.spend(1.0), "b": lambda: clock.spend(2.0 * (1 + spread * rng.uniform(-1, 1)))}


def test_sampling_stops_at_min_rounds_when_the_ratio_is_steady():
    from mhmoe.bench import Ratio, sample_rounds

    clock = FakeClock()
    got = sample_rounds(_fake_calls(clock, 0.0), [Ratio("b", "a")], min_rounds=6, target=0.03, max_seconds=1e9,
                        seed=0, clock=clock)
    assert got.rounds == 6 and got.target_reached and got.widest == 0
    assert got.times["b"] == [2.0] * 6 and got.seconds == pytest.approx(18.0)


def test_sampling_stops_at_the_first_look_that_meets_the_target():
    from mhmoe.bench import Ratio, median_ci, sample_rounds

    clock = FakeClock()
    ratio = Ratio("b", "a")
    got = sample_rounds(_fake_calls(clock, 0.2), [ratio], min_rounds=6, target=0.03, max_seconds=1e9, seed=0,
                        batch=4, clock=clock)
    assert got.target_reached and got.rounds > 6 and (got.rounds - 6) % 4 == 0
    values = ratio.per_round(got.times)
    assert median_ci(values).narrow(0.03) and median_ci(values).median == pytest.approx(2.0, rel=0.03)
    assert not median_ci(values[:-4]).narrow(0.03)  # the previous look had not met it


def test_sampling_respects_the_time_cap_and_the_minimum():
    from mhmoe.bench import Ratio, sample_rounds

    clock = FakeClock()
    got = sample_rounds(_fake_calls(clock, 0.5), [Ratio("b", "a")], min_rounds=6, target=1e-6, max_seconds=100,
                        seed=0, clock=clock)
    assert not got.target_reached
    assert 100 <= got.seconds < 100 + 4.0  # stops at the end of the first round past the cap (one round < 4 s)
    assert got.rounds == len(got.times["a"]) == len(got.times["b"])
    clock = FakeClock()
    got = sample_rounds(_fake_calls(clock, 0.5), [Ratio("b", "a")], min_rounds=7, target=1e-6, max_seconds=0,
                        seed=0, clock=clock)
    assert got.rounds == 7 and not got.target_reached  # the minimum wins over the cap


def test_rounds_run_every_callable_in_a_shuffled_order():
    from mhmoe.bench import timed_rounds

    clock, order = FakeClock(), []
    calls = {k: (lambda k=k: (order.append(k), clock.spend(1.0))) for k in "abcd"}
    times = timed_rounds(calls, 5, seed=3, clock=clock)
    assert all(ts == [1.0] * 5 for ts in times.values())
    rounds = [order[i:i + 4] for i in range(0, 20, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len({tuple(r) for r in rounds}) > 1


def test_peak_tflops_from_the_environment(monkeypatch):
    from mhmoe.bench import mfu, peak_tflops
    from mhmoe.errors import UserError

    monkeypatch.delenv("MHMOE_PEAK_TFLOPS", raising=False)
    assert peak_tflops(None) == (None, None) and mfu(500.0, None) is None
    monkeypatch.setenv("MHMOE_PEAK_TFLOPS", "989")
    assert peak_tflops(None) == (989.0, "MHMOE_PEAK_TFLOPS") and peak_tflops(100.0) == (100.0, "--peak-tflops")
    assert mfu(494.5, 989.0) == pytest.approx(5e-4)  # GFLOP/s against TFLOP/s
    monkeypatch.setenv("MHMOE_PEAK_TFLOPS", "lots")
    with pytest.raises(UserError, match="MHMOE_PEAK_TFLOPS: expected a positive number"):
        peak_tflops(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_cuda_without_a_gpu_one_line_error(capsys):
    assert main(["bench", "layers", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device: cuda requested but torch sees no CUDA device; use --device cpu" in err
    assert len(err.splitlines()) == 1


def test_run_throughput_of_a_stopped_train_run(tmp_path):
    from mhmoe.bench import run_throughput
    from mhmoe.complexity import model_flops_per_token
    from mhmoe.training.presets import preset

    cfg = preset("smoke", "mhmoe-h3")
    (tmp_path / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    rates = [10.0, 100.0, 300.0, 200.0, 400.0, 250.0, 500.0, 350.0, 450.0, 150.0]  # the first is the warm-up
    lines = [json.dumps({"step": i + 1, "tok_per_s": r}) for i, r in enumerate(rates)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "tok_', encoding="utf-8")
    got = run_throughput(tmp_path, peak=2.0)
    flops = 3 * model_flops_per_token(cfg.model, seq_len=cfg.seq_len)
    assert got["steps_logged"] == 10 and got["steps_used"] == 9 and got["tok_per_s"] == 300.0
    assert got["gflops"] == pytest.approx(300.0 * flops / 1e9)
    assert got["mfu"] == pytest.approx(got["gflops"] / 2e3) and got["variant"] == "mhmoe-h3"


def test_bench_train_compile_mode_follows_the_preset():
    from mhmoe.bench.train import bench_config
    from mhmoe.training.compile import resolve_compile
    from mhmoe.training.presets import preset

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = preset("smoke", "smoe")
    assert cfg.compile == "auto" and bench_config(cfg, "preset") is cfg  # as mhmoe train runs the preset
    assert resolve_compile(bench_config(cfg, "preset"), cpu) == "off"
    assert resolve_compile(bench_config(cfg, "preset"), cuda) == "on"
    assert resolve_compile(bench_config(cfg, "on"), cpu) == "on"
    assert resolve_compile(bench_config(cfg, "off"), cuda) == "off"
