"""torch.compile of models with MoE layers: the sorted path's data-dependent loop stays eager, so new routings
never recompile (a graph specialised on the expert group sizes would recompile at every step); the grouped_mm
path (auto on CUDA without Triton) traces whole, without graph breaks; the scatter path (auto on CUDA with
Triton): tests/unit/test_scatter_experts.py."""

import pytest
import torch
import torch._dynamo
from helpers import VARIANTS, D, _make, assert_close_scaled

from mhmoe import FFNConfig
from mhmoe.model import ModelConfig, Transformer


@pytest.mark.parametrize("name", ["smoe", "mhmoe-h3-shared"])
def test_compiled_layer_does_not_recompile_for_new_routings(name):
    torch._dynamo.reset()
    layer = _make(VARIANTS[name])
    compiled = torch.compile(layer, backend="aot_eager")  # dynamo's guards are the subject; no C++ toolchain
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for step in range(4):
        x = torch.randn(2, 6, D, generator=gen, requires_grad=True)
        y, aux = compiled(x)
        (y.square().mean() + aux.loss).backward()
        y_eager, _ = layer(x)
        assert_close_scaled(y, y_eager, 1e-5, f"step {step} output")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    routings = {tuple(layer(torch.randn(2, 6, D, generator=gen))[1].tokens_per_expert.tolist()) for _ in range(4)}
    assert len(routings) > 1  # the inputs did route differently
    assert graphs[1:] == [graphs[0]] * 3, f"graphs compiled after each step: {graphs}"


@pytest.mark.parametrize("precision", ["bf16-weights", "fp32-weights-bf16-autocast"])
@pytest.mark.parametrize("name", ["smoe", "mhmoe-h2", "mhmoe-h3-shared"])
def test_grouped_path_compiles_without_graph_breaks(name, precision):
    """The path auto takes on CUDA without Triton (grouped_mm in bf16) traces whole: fullgraph=True raises at any
    graph break, and new routings reuse the graph (no shape or value depends on the routing)."""
    torch._dynamo.reset()
    layer = _make(VARIANTS[name].replace(dispatch="grouped_mm", capacity_factor=0.5)).train()
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    layer = layer.to(dtype)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for step in range(3):
        x = torch.randn(2, 6, D, generator=gen, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            y, aux = compiled(x)
            y_eager, aux_eager = layer(x)
        (y.float().square().mean() + aux.loss).backward()
        assert_close_scaled(y, y_eager, 1e-5, f"step {step} output")
        assert torch.equal(aux.tokens_per_expert, aux_eager.tokens_per_expert)
        assert aux.dropped_fraction.item() == aux_eager.dropped_fraction.item() > 0
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 2, f"graphs compiled after each step: {graphs}"


def test_whole_model_compiles_without_graph_breaks_on_the_grouped_path():
    torch._dynamo.reset()
    moe = VARIANTS["mhmoe-h2"].replace(dispatch="grouped_mm")
    cfg = ModelConfig(vocab_size=64, dim=D, n_layers=1, n_heads=4, max_seq_len=16, moe_every=1,
                      dense_ffn=FFNConfig(kind="dense", dim=D, hidden_dim=64), moe_ffn=moe)
    model = Transformer(cfg).to(torch.bfloat16)
    idx, tgt = torch.randint(64, (2, 12)), torch.randint(64, (2, 12))
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, tgt)
    out.loss.backward()
    assert abs(out.loss.item() - model(idx, tgt).loss.item()) < 1e-2
