"""torch.compile of models with MoE layers: the data-dependent dispatch stays eager, so new routings never
recompile (a graph specialised on the expert group sizes would recompile at every step)."""

import pytest
from helpers import VARIANTS, D, _make, assert_close_scaled


@pytest.mark.parametrize("name", ["smoe", "mhmoe-h3-shared"])
def test_compiled_layer_does_not_recompile_for_new_routings(name):
    import torch._dynamo

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
