"""`mhmoe bench`: the transformers peer computes our SMoE's function, the naive loop ours, and the JSON contract."""

import json

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
               "ratio_to_smoe"}


def _out_and_grads(module, fn, x, g):
    module.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = fn(xg)
    y.backward(g)
    return y.detach(), xg.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("implementation", hf_implementations(torch.device("cpu")))
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
            "4", "--rounds", "2", "--dtypes", "float32", "--impls", "sorted,naive"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    recs = out["records"]
    hf = {f"hf-{n}" for n in hf_implementations(torch.device("cpu"))}
    assert {r["variant"] for r in recs} == {"dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"} | hf
    assert {(r["mode"], r["dtype"]) for r in recs} == {("fwd", "float32"), ("fwd+bwd", "float32")}
    for r in recs:
        assert RECORD_KEYS <= set(r), sorted(RECORD_KEYS - set(r))
        assert r["threads"] == 1 and r["median_ms"] > 0 and r["gflops"] > 0 and r["frac_of_gemm"] > 0
        assert r["peak_mem_mb"] > 0
    smoe = [r for r in recs if r["variant"] == "smoe" and r["impl"] == "sorted"]
    assert [r["ratio_to_smoe"] for r in smoe] == [1.0, 1.0]
    # Two implementations of each MoE variant (sorted, naive); the peer and dense once per mode.
    assert sum(r["variant"] == "mhmoe-h3" for r in recs) == 4 and sum(r["variant"] == "dense" for r in recs) == 2
    assert set(out["meta"]["gemm_gflops"]) == {"float32/fwd", "float32/fwd+bwd"}


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
            "--no-hf", "--no-memory"]
    assert main([*argv, "--threads", "2"]) == 0
    recs = json.loads(capsys.readouterr().out)["records"]
    assert {r["variant"] for r in recs if r["impl"] == "intra-op"} == {"smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"}
    assert all(r["threads"] == 2 for r in recs)
    assert main([*argv, "--threads", "1"]) == 0  # at one thread intra-op is the sorted layer itself: not repeated
    recs = json.loads(capsys.readouterr().out)["records"]
    assert not [r for r in recs if r["impl"] == "intra-op"] and all(r["threads"] == 1 for r in recs)


def test_bench_train_json_contract(capsys):
    assert main(["bench", "train", "--json", "--preset", "smoke", "--variants", "smoe,mhmoe-h3", "--rounds", "1",
                 "--threads", "1"]) == 0
    recs = json.loads(capsys.readouterr().out)["records"]
    assert [r["variant"] for r in recs] == ["smoe", "mhmoe-h3"]
    for r in recs:
        assert RECORD_KEYS <= set(r) and r["mode"] == "train" and r["dtype"] == "float32"
        assert r["tok_per_s"] == pytest.approx(r["tokens_per_step"] / (r["median_ms"] / 1e3))
    assert recs[0]["ratio_to_smoe"] == 1.0


def test_bench_train_compile_flag(capsys, monkeypatch):
    import torch._dynamo

    compiled = []
    real = torch.compile

    def aot_eager(model, **kw):  # dynamo and autograd tracing without inductor's C++ build
        compiled.append(type(model).__name__)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    assert main(["bench", "train", "--json", "--preset", "smoke", "--variants", "smoe", "--rounds", "2",
                 "--threads", "1", "--compile"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)["records"]
    assert compiled == ["Transformer"] and rec["compiled"] is True and rec["warmup_s"] > 0
    assert rec["peak_mem_mb"] is None  # no memory pass over compiled graphs
    assert rec["median_ms"] > 0


@pytest.mark.parametrize("argv, message", [
    (["bench", "layers", "--dtypes", "float16"], "--dtypes: expected a comma-separated subset of float32, bfloat16"),
    (["bench", "layers", "--dim", "100"], "--dim: must be divisible by 2 and 3"),
    (["bench", "layers", "--impls", "magic"], "--impls: expected a comma-separated subset"),
    (["bench", "layers", "--rounds", "0"], "--rounds: must be >= 1"),
    (["bench", "train", "--preset", "huge"], "--preset: unknown preset 'huge'"),
    (["bench", "train", "--preset", "smoke", "--variants", "smoe,mega"], "unknown variant 'mega'"),
])
def test_bench_bad_flags_one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("fast_bf16, dtypes", [(False, {"float32"}), (True, {"float32", "bfloat16"})])
def test_bench_layers_default_dtypes_follow_native_bf16(fast_bf16, dtypes, capsys, monkeypatch):
    import mhmoe.training.device as T

    monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda cpuinfo=None: fast_bf16)
    argv = ["bench", "layers", "--json", "--tokens", "32", "--dim", "96", "--hidden-dim", "256", "--num-experts",
            "4", "--rounds", "1", "--modes", "fwd", "--no-hf", "--no-memory"]
    assert main(argv) == 0
    assert {r["dtype"] for r in json.loads(capsys.readouterr().out)["records"]} == dtypes
