"""torch.compile of models with MoE layers: the sorted path's data-dependent loop stays eager, so new routings
never recompile (a graph specialised on the expert group sizes would recompile at every step); the grouped_mm
path (auto on CUDA without Triton) traces whole, without graph breaks; the scatter path (auto on CUDA with
Triton): tests/unit/test_scatter_experts.py. TrainConfig.compile: the mode per device and dispatch, the arguments of
compile_model, the compiled training step against the eager one, and the step's CUDA-graph bookkeeping."""

import copy

import pytest
import torch
import torch._dynamo
from helpers import VARIANTS, D, _make, assert_close_scaled

from mhmoe import ConfigError, FFNConfig
from mhmoe.distributed.parallel import Parallel
from mhmoe.model import ModelConfig, Transformer
from mhmoe.training.compile import compile_model, resolve_compile, sync_break
from mhmoe.training.config import TrainConfig
from mhmoe.training.optim import build_optimizer
from mhmoe.training.routing_health import RoutingMonitor
from mhmoe.training.step import train_step


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


# ----------------------------------------------------------------------------------------------------------
# TrainConfig.compile: the mode per device and dispatch, compile_model, and the compiled training step


def _train_cfg(moe="grouped_mm", dtype="bfloat16", compile="on", bitnet=False, device="auto"):
    if moe == "dense":
        ffn = FFNConfig(kind="dense", dim=D, hidden_dim=64)
    else:
        ffn = VARIANTS["mhmoe-h2"].replace(dispatch=moe)
    model = ModelConfig(vocab_size=64, dim=D, n_layers=2, n_heads=4, max_seq_len=16, moe_every=1,
                        dense_ffn=FFNConfig(kind="dense", dim=D, hidden_dim=64), moe_ffn=ffn, bitnet=bitnet)
    return TrainConfig(model=model, dtype=dtype, compile=compile, device=device, batch_size=2, seq_len=12,
                       tokens_per_step=48)


@pytest.mark.parametrize("compile, device, want", [
    ("auto", "cpu", "off"), ("auto", "cuda", "on"), ("off", "cuda", "off"), ("on", "cpu", "on"),
    ("on", "cuda", "on"), ("cudagraphs", "cuda", "cudagraphs"),
])
def test_compile_mode_per_device(compile, device, want):
    assert resolve_compile(_train_cfg(compile=compile), device) == want
    assert resolve_compile(_train_cfg("dense", "float32", compile=compile), device) == want


@pytest.mark.parametrize("triton", [True, False])
@pytest.mark.parametrize("moe, dtype, device, reason", [
    ("dense", "float32", "cuda", None),
    ("grouped_mm", "bfloat16", "cuda", None),
    ("auto", "bfloat16", "cuda", None),  # auto = scatter on CUDA in bf16, or grouped_mm without Triton
    ("grouped_mm", "bfloat16", "cpu", None),  # traces whole on CPU as well (the tests below)
    ("scatter", "float32", "cuda", None),
    ("auto", "float32", "cuda", "dispatch='auto' runs the 'sorted' experts"),  # cuBLAS in fp32, Triton or not
    ("auto", "bfloat16", "cpu", "dispatch='auto' runs the 'sorted' experts"),
    ("sorted", "bfloat16", "cuda", "dispatch='sorted' runs the 'sorted' experts"),
    ("grouped_mm", "float32", "cuda", "'grouped_mm' is sync-free in bfloat16 only"),
])
def test_sync_free_step_per_dispatch(moe, dtype, device, reason, triton, monkeypatch):
    from mhmoe.layers import scatter_experts

    monkeypatch.setattr(scatter_experts, "TRITON_AVAILABLE", triton)
    if triton and (moe, dtype, device) == ("auto", "bfloat16", "cuda"):
        reason = None  # auto = scatter, sync-free
    got = sync_break(_train_cfg(moe, dtype), device)
    assert got is None if reason is None else reason in got
    assert sync_break(_train_cfg("dense", dtype, bitnet=True), device) is None  # BitNet's dense model traces whole
    assert "bitnet" in sync_break(_train_cfg("grouped_mm", dtype, bitnet=True), device)


@pytest.mark.parametrize("moe, dtype, world, device, match", [
    ("sorted", "bfloat16", 1, "cuda", r"'cudagraphs' needs a sync-free step, but model\.moe_ffn\.dispatch='sorted'"),
    ("grouped_mm", "float32", 1, "cuda", r"in bfloat16 only, and dtype=float32 \(set dtype=bfloat16\)"),
    ("grouped_mm", "bfloat16", 1, "cpu", r"'cudagraphs' needs a CUDA device, this run is on cpu; use compile=on"),
    ("grouped_mm", "bfloat16", 2, "cuda", r"'cudagraphs' runs on one process, this run has 2"),
    ("grouped_mm", "bfloat16", 1, "cuda", None),
])
def test_cudagraphs_is_refused_where_the_step_is_not_static_and_sync_free(moe, dtype, world, device, match):
    cfg = _train_cfg(moe, dtype, compile="cudagraphs")
    if match is None:
        assert resolve_compile(cfg, device, world) == "cudagraphs"
        return
    with pytest.raises(ConfigError, match=match) as err:
        resolve_compile(cfg, device, world)
    assert str(err.value).startswith("TrainConfig.compile: ") and "\n" not in str(err.value)


def test_cudagraphs_on_a_cpu_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"TrainConfig\.compile: 'cudagraphs' needs device=cuda"):
        _train_cfg(compile="cudagraphs", device="cpu")


@pytest.mark.parametrize("compile, moe, dtype, device, world, want", [
    ("off", "grouped_mm", "bfloat16", "cuda", 1, None),
    ("auto", "grouped_mm", "bfloat16", "cpu", 1, None),
    ("on", "grouped_mm", "bfloat16", "cpu", 1, {"fullgraph": True, "mode": None}),
    ("on", "sorted", "bfloat16", "cpu", 1, {"fullgraph": False, "mode": None}),
    ("auto", "grouped_mm", "bfloat16", "cuda", 1, {"fullgraph": True, "mode": None}),
    ("auto", "grouped_mm", "bfloat16", "cuda", 2, {"fullgraph": False, "mode": None}),  # DDP / FSDP split it
    ("auto", "dense", "float32", "cuda", 1, {"fullgraph": True, "mode": None}),
    ("cudagraphs", "grouped_mm", "bfloat16", "cuda", 1, {"fullgraph": True, "mode": "reduce-overhead"}),
])
def test_compile_model_arguments(compile, moe, dtype, device, world, want, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, _train_cfg(moe, dtype, compile=compile), device, world) is model
    if want is None:
        assert calls == []
    else:
        assert calls == [{**want, "dynamic": False, "backend": "inductor"}]


class _Batches:
    """TrainSampler's interface over fixed random batches: batch(step, micro) -> (x, y) [B, T] each."""

    def __init__(self, vocab, batch, seq):
        gen = torch.Generator().manual_seed(5)
        self.data = torch.randint(vocab, (8, batch, seq + 1), generator=gen)

    def batch(self, step, micro):
        w = self.data[(2 * step + micro) % 8]
        return w[:, :-1], w[:, 1:]


def _run_steps(cfg, net, model, steps=2, accum=2, compile_mode="off"):
    """`steps` optimizer steps of train_step (the loop's calls); returns each step's metrics and gradients."""
    par = Parallel(world=1, rank=0, dp=1, ep=1, device=torch.device("cpu"))
    routing = RoutingMonitor(model, cfg, "cpu")
    optimizer = build_optimizer(model, cfg.optim)
    sampler = _Batches(cfg.model.vocab_size, cfg.batch_size, cfg.seq_len)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    out = []
    for step in range(steps):
        m = train_step(step, net, model, sampler, accum, par, 1.0, autocast, routing, compile_mode)
        out.append((m, {n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=compile_mode != "cudagraphs")
    return out


def _assert_same_steps(got, want, tol):
    for (m, grads), (m_ref, grads_ref) in zip(got, want):
        for key in ("loss", "ce", "aux", "lb", "grad_norm"):
            assert abs(m[key] - m_ref[key]) <= tol * max(1.0, abs(m_ref[key])), key
        assert m["tokens_per_expert"] == m_ref["tokens_per_expert"]
        for name in grads_ref:
            assert_close_scaled(grads[name], grads_ref[name], tol, name)


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-weights"])
def test_compiled_training_step_equals_eager(precision):
    """compile=on on the sync-free path: compile_model traces the whole training forward and loss (fullgraph=True,
    so any graph break would raise), and train_step's metrics and gradients equal the eager step's, two steps with
    AdamW in between, without a recompile in the second step."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = _train_cfg("grouped_mm", "bfloat16", compile="on")
    torch.manual_seed(0)
    eager = Transformer(cfg.model)
    if precision == "bf16-weights":
        eager = eager.to(torch.bfloat16)
    model = copy.deepcopy(eager)
    net = compile_model(model, cfg, "cpu", backend="aot_eager")
    assert net is not model
    want = _run_steps(cfg, eager, eager)
    got = _run_steps(cfg, net, model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, reused by every micro-batch
    if precision == "bf16-autocast":
        _assert_same_steps(got, want, 2e-2)
    else:  # bf16 master weights: the 1% gradient differences of step 1 move bf16 weights into near-tie routings
        _assert_same_steps(got[:1], want[:1], 2e-2)  # that flip a token or two in step 2; its loss still agrees
        assert abs(got[1][0]["loss"] - want[1][0]["loss"]) < 1e-3 * want[1][0]["loss"]


def test_cudagraphs_step_bookkeeping_keeps_gradients_in_place():
    """What train_step does under compile_mode="cudagraphs" that needs no GPU to check: the gradients exist before
    the first backward and every micro-batch accumulates into the same tensors (no graph output becomes a .grad),
    and the step's numbers equal the plain step's."""
    cfg = _train_cfg("dense", "float32", compile="off", device="cpu")
    torch.manual_seed(0)
    plain = Transformer(cfg.model)
    model = copy.deepcopy(plain)
    ptrs = {}

    def record(module, args):  # before each micro-batch's forward: where the gradients live
        for n, p in model.named_parameters():
            ptrs.setdefault(n, set()).add(p.grad.data_ptr() if p.grad is not None else None)

    model.register_forward_pre_hook(record)
    want = _run_steps(cfg, plain, plain)
    got = _run_steps(cfg, model, model, compile_mode="cudagraphs")
    assert all(len(p) == 1 and None not in p for p in ptrs.values())  # allocated once, before any backward
    _assert_same_steps(got, want, 1e-6)


def test_inductor_compiles_a_tiny_training_step():
    """The default backend (inductor, C++ on CPU) on a tiny dense model: the compiled training step equals eager."""
    torch._dynamo.reset()
    cfg = _train_cfg("dense", "float32", compile="on", device="cpu").replace(
        model=_train_cfg("dense").model.replace(n_layers=1, vocab_size=32))
    torch.manual_seed(0)
    eager = Transformer(cfg.model)
    model = copy.deepcopy(eager)
    net = compile_model(model, cfg, "cpu")
    _assert_same_steps(_run_steps(cfg, net, model, steps=1, accum=1), _run_steps(cfg, eager, eager, steps=1, accum=1),
                       1e-4)
