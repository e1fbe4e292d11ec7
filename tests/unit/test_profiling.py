"""Profiler labels (mhmoe.profiling) and the attribution of a step's time to its parts (mhmoe.bench.profile): the
labels cost no graph break and no recompile, each part gets what its rules say (on synthetic CUDA-like events, and
on real CPU profiles), the parts add up to the step, and the files are written. Nothing here asserts a speed."""

import json

import pytest
import torch
import torch._dynamo
from helpers import VARIANTS, D

from mhmoe import FFNConfig
from mhmoe.bench.profile import (
    MOE_PARTS,
    PARTS,
    SUM_TOLERANCE,
    VARIANT_RANGE,
    DeviceEvent,
    Event,
    attribute,
    flatten,
    profile_steps,
)
from mhmoe.bench.train import training_step
from mhmoe.model import ModelConfig, Transformer
from mhmoe.profiling import ATTENTION, BLOCK, EXPERTS, MODEL, NORM, OPTIMIZER, ROUTER, STEP, label
from mhmoe.training.presets import preset


def test_label_is_one_shared_noop_without_a_profiler():
    assert label(ATTENTION) is label(NORM)  # the same nullcontext: no record, no op call
    with torch.profiler.profile() as prof:
        with label(ATTENTION):
            torch.ones(3).sum()
    names = [e.name for e in prof.events()]
    assert ATTENTION in names and names.index(ATTENTION) < names.index("aten::sum")


def _tiny_model(dispatch="grouped_mm") -> Transformer:
    moe = VARIANTS["mhmoe-h2"].replace(dispatch=dispatch)
    cfg = ModelConfig(vocab_size=64, dim=D, n_layers=2, n_heads=4, max_seq_len=16, moe_every=2,
                      dense_ffn=FFNConfig(kind="dense", dim=D, hidden_dim=64), moe_ffn=moe)
    return Transformer(cfg)


def test_labelled_model_compiles_fullgraph_and_the_profiler_never_recompiles_it():
    """The labels sit in every block (attention, norms, FFN, router, experts, head/merge): fullgraph=True raises at
    any graph break, and a profiler switched on around the compiled model reuses the same graph."""
    torch._dynamo.reset()
    model = _tiny_model().to(torch.bfloat16)
    idx, tgt = torch.randint(64, (2, 12)), torch.randint(64, (2, 12))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(idx, tgt).loss.backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.profiler.profile() as prof:
        compiled(idx, tgt).loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # Inside the compiled region the labels are gone (mhmoe.bench.profile's rules take over there).
    assert not {e.name for e in prof.events()} & {ATTENTION, NORM, EXPERTS}
    assert torch._dynamo.explain(model)(idx, tgt).graph_break_count == 0


# ----------------------------------------------------------------------------------------------------------
# Attribution on synthetic events: what a CUDA profile of one step looks like, by hand


def _synthetic() -> tuple[list[Event], list[DeviceEvent]]:
    ev: list[Event] = []

    def add(name, start, end, parent=None, seq=-1, fwd_thread=0, kernels=(), thread=1):
        ev.append(Event(name, thread, start, end, parent, seq, fwd_thread, 0.0, list(kernels)))
        return len(ev) - 1

    v = add(VARIANT_RANGE + "smoe/bfloat16", 0, 200)
    s = add(STEP, 1, 190, v)
    m = add(MODEL, 2, 80, s)
    add("aten::embedding", 3, 4, m, seq=1, kernels=[("indexSelectLargeIndex", 2.0)])
    b = add(BLOCK, 5, 60, m)
    n = add(NORM, 6, 7, b)
    add("aten::rms_norm", 6, 7, n, seq=2, kernels=[("rms_norm_kernel", 1.0)])
    a = add(ATTENTION, 8, 20, b)
    add("aten::mm", 9, 10, a, seq=3, kernels=[("sm90_xmma_gemm_bf16", 10.0)])
    r = add(ROUTER, 21, 25, b)
    add("aten::topk", 22, 23, r, seq=4, kernels=[("gatherTopK", 1.5)])
    x = add(EXPERTS, 26, 50, b)
    add("aten::sort", 27, 28, x, seq=5, kernels=[("cub::DeviceRadixSortOnesweepKernel", 3.0)])
    add("aten::_grouped_mm", 29, 30, x, seq=6, kernels=[("cutlass_grouped_gemm", 8.0)])
    add("aten::mul", 31, 32, x, seq=7, kernels=[("vectorized_elementwise_kernel", 1.0)])  # SwiGLU: between GEMMs
    add("aten::_grouped_mm", 33, 34, x, seq=8, kernels=[("cutlass_grouped_gemm", 4.0)])
    add("aten::mul", 35, 36, x, seq=9, kernels=[("vectorized_elementwise_kernel", 0.5)])  # combine: after them
    add("aten::add", 55, 56, b, seq=10, kernels=[("vectorized_elementwise_kernel", 0.25)])  # residual: other
    add("aten::mm", 61, 62, m, seq=11, kernels=[("nvjet_tst_gemm", 6.0)])  # LM head
    add("aten::cross_entropy", 63, 64, m, seq=12, kernels=[("cunn_SoftMaxForward", 4.0)])
    cf = add("CompiledFunction", 65, 70, m, seq=13)
    add("## Call CompiledFxGraph abc", 65, 70, cf, kernels=[("triton_per_fused_mean_rsqrt_2", 2.0),
                                                              ("triton_poi_fused_add_mul_0", 1.0)])
    # The backward, on the autograd engine's thread (2), each node pointing back at its forward op.
    for name, seq, kname, us, t in (("MmBackward0", 3, "sm90_xmma_gemm_bf16", 20.0, 100),
                                    ("GroupedMmBackward0", 8, "cutlass_grouped_gemm", 16.0, 110),
                                    ("MulBackward0", 9, "vectorized_elementwise_kernel", 2.0, 120),
                                    ("CompiledFunctionBackward", 13, "triton_poi_fused_0", 3.0, 125)):
        node = add(f"autograd::engine::evaluate_function: {name}", t, t + 4, None, seq, fwd_thread=1, thread=2)
        inner = add(name, t, t + 3, node, seq, fwd_thread=1, thread=2)
        add("aten::mm" if "Mm" in name else "aten::mul", t + 1, t + 2, inner, kernels=[(kname, us)], thread=2)
    acc = add("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 130, 131, None, thread=2)
    add("aten::add_", 130, 131, acc, kernels=[("vectorized_elementwise_kernel", 1.0)], thread=2)
    o = add(OPTIMIZER, 140, 180, s)
    st = add("Optimizer.step#AdamW.step", 141, 170, o)
    add("aten::_foreach_mul_", 142, 143, st, kernels=[("multi_tensor_apply_kernel", 5.0)])
    return ev, [DeviceEvent("unlinked_kernel", 150, 3.0), DeviceEvent("outside", 195, 9.0)]


def test_attribution_of_synthetic_device_events():
    events, device = _synthetic()
    rec = attribute(events, device, on_device=True)["smoe/bfloat16"]
    parts = {p: q["ms"] * 1e3 for p, q in rec["parts"].items()}  # us per step (one step)
    assert parts == pytest.approx({
        "attention": 10 + 20, "norms": 1 + 2, "router": 1.5, "moe_permutation": 3 + 0.5 + 2,
        "expert_gemm": 8 + 1 + 4 + 16, "dense_ffn": 0, "head_merge": 0, "lm_head_loss": 6 + 4,
        "optimizer": 5, "other": 2 + 0.25 + 1 + 3 + 1 + 3})  # embedding, residual, fused add, compiled bwd, acc, unlinked
    total = sum(parts.values())
    assert rec["parts_ms"] * 1e3 == pytest.approx(total)
    assert rec["step_ms"] * 1e3 == pytest.approx(189) and rec["idle_ms"] * 1e3 == pytest.approx(189 - total)
    assert rec["parts"]["attention"]["forward_ms"] * 1e3 == pytest.approx(10)
    assert rec["parts"]["attention"]["backward_ms"] * 1e3 == pytest.approx(20)
    assert rec["parts"]["expert_gemm"]["backward_ms"] * 1e3 == pytest.approx(16)
    assert rec["parts"]["moe_permutation"]["backward_ms"] * 1e3 == pytest.approx(2)
    src = {k: v * 1e3 for k, v in rec["by_source"].items()}
    # By rule: the experts, the LM head and loss, the embedding, the compiled rsqrt kernel (a norm).
    assert src["rule"] == pytest.approx(3 + 8 + 1 + 4 + 0.5 + 16 + 2 + 6 + 4 + 2 + 2)
    assert src["unattributed"] == pytest.approx(1 + 3 + 1 + 3)  # compiled add, compiled bwd, AccumulateGrad, unlinked
    assert sum(src.values()) == pytest.approx(total)


def test_attribution_backward_node_finds_its_forward_op_among_ops_of_one_sequence_number():
    """Ops that create no autograd node record the number the next node takes: MulBackward0 belongs to the mul
    under ATTENTION, not to the no-grad ops under ROUTER that carry the same number."""
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    with torch.profiler.profile() as prof:
        with torch.profiler.record_function(VARIANT_RANGE + "v"), torch.profiler.record_function(STEP):
            with label(ROUTER):
                y = x @ w
                torch.zeros(3).add(1)
                y.detach().sum()
            with label(ATTENTION):
                out = (y * 3).sum()
            out.backward()
    cpu, device = flatten(prof.events())
    rec = attribute(cpu, device, on_device=False)["v"]
    top = {name for name, _ in rec["parts"]["attention"]["top"]}
    assert "MulBackward0" in top or "aten::mul" in top
    assert rec["parts"]["attention"]["backward_ms"] > 0 and rec["parts"]["router"]["backward_ms"] > 0
    assert sum(q["ms"] for q in rec["parts"].values()) == pytest.approx(rec["step_ms"], rel=SUM_TOLERANCE)


# ----------------------------------------------------------------------------------------------------------
# Real CPU profiles of training steps


def _profile_variants(tmp_path, variants, dispatch=None, dtype=None, steps=2):
    fns = {}
    for v in variants:
        cfg = preset("smoke", v)
        if dispatch and cfg.model.moe_ffn.kind == "moe":
            cfg = cfg.override("model.moe_ffn.dispatch", dispatch)
        if dtype:
            cfg = cfg.override("dtype", dtype)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        fns[v] = training_step(cfg, model, model, torch.device("cpu"), 0)
        fns[v]()  # warm-up
    return profile_steps(fns, tmp_path, torch.device("cpu"), steps, lambda m: None)


def test_profile_of_cpu_steps_adds_up_and_names_the_moe_parts(tmp_path):
    result = _profile_variants(tmp_path, ["dense", "smoe", "mhmoe-h3"], steps=1)
    assert json.loads((tmp_path / "profile.json").read_text()) == json.loads(json.dumps(result))
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    md = (tmp_path / "profile.md").read_text()
    assert "| part | dense | smoe | mhmoe-h3 |" in md and "expert GEMMs" in md
    for v, rec in result["variants"].items():
        assert rec["steps"] == 1 and rec["time"] == "cpu"
        total = sum(q["ms"] for q in rec["parts"].values())
        assert abs(total - rec["step_ms"]) <= SUM_TOLERANCE * rec["step_ms"], (v, total, rec["step_ms"])
        assert sum(q["pct"] for q in rec["parts"].values()) == pytest.approx(100, abs=100 * SUM_TOLERANCE)
        for p in ("attention", "norms", "lm_head_loss", "optimizer"):
            assert rec["parts"][p]["ms"] > 0, (v, p)
        moe = {p: rec["parts"][p]["ms"] for p in (*MOE_PARTS, "head_merge")}
        if v == "dense":
            assert not any(moe.values()), moe
        else:
            assert all(moe[p] > 0 for p in MOE_PARTS), (v, moe)
            assert rec["parts"]["expert_gemm"]["backward_ms"] > 0 and rec["parts"]["router"]["backward_ms"] > 0
    assert result["variants"]["mhmoe-h3"]["parts"]["head_merge"]["ms"] > 0
    assert set(result["parts"]) == set(PARTS)


def test_profile_splits_the_grouped_path_into_gemms_and_permutation(tmp_path):
    result = _profile_variants(tmp_path, ["smoe"], dispatch="grouped_mm", dtype="bfloat16", steps=1)
    parts = result["variants"]["smoe"]["parts"]
    gemm = {name for name, _ in parts["expert_gemm"]["top"]}
    perm = {name for name, _ in parts["moe_permutation"]["top"]}
    assert "aten::_grouped_mm" in gemm or "aten::mm" in gemm, gemm
    assert perm & {"aten::index_select", "aten::sort", "aten::scatter_", "aten::scatter_add_", "aten::sum"}, perm
    assert parts["expert_gemm"]["backward_ms"] > 0 and parts["moe_permutation"]["backward_ms"] > 0


def test_a_large_trace_is_gzipped(tmp_path, monkeypatch):
    import gzip

    import mhmoe.bench.profile as prof

    monkeypatch.setattr(prof, "TRACE_LIMIT_BYTES", 1000)
    result = _profile_variants(tmp_path, ["smoe"], steps=1)
    assert result["trace"] == "trace.json.gz" and not (tmp_path / "trace.json").exists()
    assert json.loads(gzip.decompress((tmp_path / "trace.json.gz").read_bytes()))["traceEvents"]
