"""dispatch="scatter" (mhmoe/layers/scatter_experts.py, scatter_kernels.py).

The Triton kernels run in Triton's interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 before mhmoe is
imported when there is no GPU; on a GPU the same tests run the compiled kernels on CUDA tensors, each on the first
config its pruner keeps: `_one_config_per_kernel_on_a_gpu`). Each fast path
is checked against a slow reference kept here (`slow_experts`: one (sub-)token and one choice at a time, in
float64, gradients by autograd) and the whole layer against tests/reference.py:
  * the five kernels composed as the ops compose them, forward and every gradient, float32 and bfloat16 I/O,
    several E/K/widths, strided inputs, empty experts, capacity drops, several row blocks per expert;
  * their torch twin (the ops' CPU implementation) the same way, and equal to the kernels;
  * the custom ops (opcheck: schema, fake tensors, autograd registration), and MoE layers through them, on the
    torch twin and on the kernels;
  * torch.compile(fullgraph=True) of a layer and of a Transformer: no graph break, no recompile for new routings;
  * no host read of device data in the kernel launchers; Triton optional.
Shapes are tiny: the interpreter runs every program of every launch in numpy.
"""

import contextlib
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import VARIANTS, D, REPO, _grads, _make, assert_close_scaled, subprocess_env
from reference import reference_forward

from mhmoe import ConfigError, FFNConfig
from mhmoe.layers import scatter_experts as se
from mhmoe.layers import scatter_kernels as sk
from mhmoe.layers.experts import resolve_dispatch, rows_dispatch, sort_assignments
from mhmoe.layers.sorted_experts import DoubleBackwardError
from mhmoe.model import ModelConfig, Transformer

# The interpreter's own numpy deprecation, once per scalar it converts. On a GPU the first launch of each kernel
# variant compiles and autotunes its configs: under `pytest --dist loadgroup` (benchmarks/gpu_check.sh) this file's
# tests share one xdist worker, so that happens once, not once per worker.
pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.xdist_group("triton-kernels")]

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}  # of the reference's largest |value| (seen: 4e-7, 7e-3)
AUTOTUNED = (sk._swiglu_up_kernel, sk._scatter_mm_kernel, sk._swiglu_down_bwd_kernel, sk._group_xty_kernel)


def first_kept(prune):  # noqa: ANN001, ANN201
    """An autotuner's early_config_prune that keeps only the first config `prune` keeps."""
    return lambda configs, nargs, **consts: prune(configs, nargs, **consts)[:1]


@pytest.fixture(autouse=True)
def _one_config_per_kernel_on_a_gpu(monkeypatch):
    """On a GPU each kernel here runs the first config its pruner keeps for the dtype, not all of them: the tests
    check what the kernels compute, and each tiny test shape would otherwise compile and time every config of each
    kernel variant (minutes in all; the GPU check has 90 s for its tests). Which config wins at real shapes is the
    benchmark's business, and `mhmoe bench layers` checks every implementation against the sorted path before it
    times it. Under the interpreter every kernel has one config already."""
    if DEV.type == "cuda":
        for kernel in AUTOTUNED:
            monkeypatch.setattr(kernel, "early_config_prune", first_kept(kernel.early_config_prune))
NAMES = ("y", "x", "weights", "w1", "w3", "w2")

# name: (N, Din, F, E, K, experts that receive rows, capacity per expert or None)
CASES = {
    # 2 experts of ~20 rows: several 16-row blocks per expert, a partial last block, expert 1 empty, 3 F tiles
    "two-blocks-per-expert": (40, 24, 40, 3, 1, (0, 2), None),
    "top2-capacity-drops": (10, 20, 24, 6, 2, (0, 1, 2, 3, 4, 5), 3),
    "top3-empty-experts": (12, 16, 16, 7, 3, (0, 2, 3, 5, 6), None),
    "odd-widths-all-experts-dropping": (9, 12, 20, 3, 3, (0, 1, 2), 5),
}


def make_case(name: str, dtype: torch.dtype, device: torch.device = DEV, seed: int = 0) -> dict:
    """Inputs of the experts: x and dy are strided views (rows of a wider buffer), as the kernels must take."""
    N, Din, F_, E, K, used, capacity = CASES[name]
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(used)
    indices = torch.stack([used[torch.randperm(len(used), generator=g)[:K]] for _ in range(N)])  # [N, K]
    x = torch.randn(N, Din + 7, generator=g).to(device, dtype)[:, 3:3 + Din]  # [N, Din], row stride Din + 7
    dy = torch.randn(N, Din + 5, generator=g).to(device, dtype)[:, 2:2 + Din]
    return {
        "x": x, "dy": dy, "indices": indices.to(device), "capacity": capacity, "num_experts": E,
        "weights": torch.rand(N, K, generator=g).to(device) + 0.5,  # [N, K] float32, as the router's
        "w1": (torch.randn(E, Din, F_, generator=g) / Din ** 0.5).to(device, dtype),
        "w3": (torch.randn(E, Din, F_, generator=g) / Din ** 0.5).to(device, dtype),
        "w2": (torch.randn(E, F_, Din, generator=g) / F_ ** 0.5).to(device, dtype),
    }


def slow_experts(c: dict) -> dict:
    """y = sum_k w[n, k] SwiGLU_{e(n, k)}(x[n]) over the kept choices, one at a time in float64; its gradients."""
    leaves = {n: c[n].detach().double().requires_grad_() for n in ("x", "weights", "w1", "w3", "w2")}
    x, w, w1, w3, w2 = leaves.values()
    N, K = c["indices"].shape
    used = [0] * c["num_experts"]
    rows = []
    for n in range(N):
        acc = torch.zeros_like(x[n])
        for k in range(K):
            e = int(c["indices"][n, k])
            used[e] += 1  # an assignment is kept while its expert has slots left, in (token, k) order
            if c["capacity"] is not None and used[e] > c["capacity"]:
                continue
            acc = acc + w[n, k] * ((F.silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e])
        rows.append(acc)
    y = torch.stack(rows)
    y.backward(c["dy"].double())
    return {"y": y.detach(), **{n: t.grad for n, t in leaves.items()}}


def fast_experts(kernels, c: dict) -> dict:
    """The ops' forward and backward (`_forward`, `_backward`) on `kernels`, from the dispatcher's output."""
    N, K = c["indices"].shape
    a = sort_assignments(c["indices"], c["num_experts"], c["capacity"])
    starts = (torch.cumsum(a.counts, 0) - a.counts).to(torch.int32)
    ends = starts + a.kept_counts.to(torch.int32)
    w = c["weights"].reshape(-1)
    args = (c["x"], w, c["w1"], c["w3"], c["w2"], a.order, starts, ends)
    y, h1, h3 = se._forward(kernels, *args, K, a.dropless, True)
    dx, dw, dw1, dw3, dw2 = se._backward(kernels, c["dy"], *args, h1, h3, K, a.dropless)
    return {"y": y, "x": dx, "weights": dw.view(N, K), "w1": dw1, "w3": dw3, "w2": dw2, "assignments": a}


def errors(got: dict, ref: dict) -> dict:
    """name -> (max abs error, max abs error / max |ref|)."""
    out = {}
    for n in NAMES:
        err = (got[n].double() - ref[n].double()).abs().max().item()
        out[n] = (err, err / ref[n].abs().max().item())
    return out


def check(got: dict, ref: dict, dtype: torch.dtype, what: str) -> None:
    for n in NAMES:
        assert got[n].shape == ref[n].shape, f"{what} {n}: shape {tuple(got[n].shape)}"
        assert ref[n].abs().max() > 0.1, f"{what} {n}: the reference is ~0, the check would be vacuous"
        assert_close_scaled(got[n], ref[n], TOL[dtype], f"{what} {n}")
    assert got["y"].dtype == got["x"].dtype == got["w1"].dtype == dtype and got["weights"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_and_their_torch_twin_equal_the_slow_reference(case, dtype):
    c = make_case(case, dtype)
    ref = slow_experts(c)
    got = fast_experts(sk.TritonKernels, c)
    twin = fast_experts(se.TorchKernels, {k: v.cpu() if torch.is_tensor(v) else v for k, v in c.items()})
    a = got["assignments"]
    # The case exercises what its name says.
    if "empty" in case or "two-blocks" in case:
        assert (a.counts == 0).any()
    if "drops" in case or "dropping" in case:
        assert a.dropped.item() > 0
    if "two-blocks" in case:
        assert a.counts.max().item() > 16  # more than one interpreter BLOCK_M per expert
    check(got, ref, dtype, f"{case} triton")
    check(twin, {k: v.cpu() for k, v in ref.items()}, dtype, f"{case} torch twin")
    for n in NAMES:  # the same decomposition, the same roundings: equal up to float32 summation order
        assert_close_scaled(got[n].cpu(), twin[n], 1e-5 if dtype == torch.float32 else 1e-2, f"{case} twin {n}")


@pytest.mark.skipif(not sk.INTERPRET, reason="the interpreter's bfloat16 bugs; compiled kernels have neither")
def test_negative_control_the_interpreter_workarounds_matter(monkeypatch):
    """Without the upcast before tl.dot the interpreter's bfloat16 products are garbage, and without the rounding
    its stores truncate: the checks above catch both (so they can fail). With both, the interpreted kernels round
    exactly as the torch twin does."""
    c = make_case("top3-empty-experts", torch.bfloat16)
    ref = slow_experts(c)
    monkeypatch.setattr(sk, "UPCAST", False)
    with pytest.raises(AssertionError, match="max abs error"):
        check(fast_experts(sk.TritonKernels, c), ref, torch.bfloat16, "no upcast")
    monkeypatch.setattr(sk, "UPCAST", True)
    twin = fast_experts(se.TorchKernels, c)
    assert torch.equal(fast_experts(sk.TritonKernels, c)["y"], twin["y"])  # rounded as torch rounds: bit for bit
    monkeypatch.setattr(sk, "ROUND", False)
    assert not torch.equal(fast_experts(sk.TritonKernels, c)["y"], twin["y"])  # truncated


def test_the_launchers_read_no_device_value_on_the_host():
    """On CUDA any .item()/.tolist()/bool() of a device tensor is a sync: the launchers compute grids from shapes
    only (the row-block -> expert map is found inside the kernels). The torch twin does read (it is the CPU path):
    the negative control."""
    c = make_case("top2-capacity-drops", torch.float32)
    fast_experts(sk.TritonKernels, c)  # on a GPU the first call autotunes, whose benchmark reads timings

    def host_read(*args, **kwargs):
        raise AssertionError("a device value read on the host")

    with contextlib.ExitStack() as stack:
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, host_read))
        a = sort_assignments(c["indices"], c["num_experts"], c["capacity"])  # the dispatcher reads nothing either
        starts = (torch.cumsum(a.counts, 0) - a.counts).to(torch.int32)
        args = (c["x"], c["weights"].reshape(-1), c["w1"], c["w3"], c["w2"], a.order, starts,
                starts + a.kept_counts.to(torch.int32))
        y, h1, h3 = se._forward(sk.TritonKernels, *args, 2, False, True)
        se._backward(sk.TritonKernels, c["dy"], *args, h1, h3, 2, False)
        with pytest.raises(AssertionError, match="read on the host"):
            se._forward(se.TorchKernels, *(t.cpu() for t in args), 2, False, True)


def test_recompute_keeps_nothing_of_size_S_F_and_gives_the_same_gradients():
    for kernels, device in ((se.TorchKernels, torch.device("cpu")), (sk.TritonKernels, DEV)):
        c = make_case("top2-capacity-drops", torch.float32, device)
        a = sort_assignments(c["indices"], c["num_experts"], c["capacity"])
        starts = (torch.cumsum(a.counts, 0) - a.counts).to(torch.int32)
        args = (c["x"], c["weights"].reshape(-1), c["w1"], c["w3"], c["w2"], a.order, starts,
                starts + a.kept_counts.to(torch.int32))
        y, h1, h3 = se._forward(kernels, *args, 2, False, False)
        assert h1.shape[0] == h3.shape[0] == 0
        recomputed = se._backward(kernels, c["dy"], *args, h1, h3, 2, False)
        y_kept, h1, h3 = se._forward(kernels, *args, 2, False, True)
        kept = se._backward(kernels, c["dy"], *args, h1, h3, 2, False)
        assert torch.equal(y, y_kept)
        for r, k in zip(recomputed, kept):
            assert torch.equal(r, k)


# ----------------------------------------------------------------------------------------------------------
# The custom ops


def test_opcheck_of_the_forward_op():
    """torch.library's own checks: schema (no hidden mutation or aliasing), fake tensors, autograd registration,
    AOT dispatch with dynamic shapes."""
    c = make_case("top2-capacity-drops", torch.float32, torch.device("cpu"))
    a = sort_assignments(c["indices"], c["num_experts"], None)
    starts = (torch.cumsum(a.counts, 0) - a.counts).to(torch.int32)
    args = [c["x"], c["weights"].reshape(-1), c["w1"], c["w3"], c["w2"]]
    args = [t.detach().clone().requires_grad_() for t in args] + [a.order, starts, starts + a.counts.int(), 2, True,
                                                                 True]
    result = torch.library.opcheck(torch.ops.mhmoe.scatter_experts_fwd.default, tuple(args))
    assert set(result.values()) == {"SUCCESS"}, result
    args[2] = args[2].detach().bfloat16()  # w1 in another dtype than x: one line, not a wrong product
    with pytest.raises(ValueError, match="take one dtype"):
        torch.ops.mhmoe.scatter_experts_fwd(*args)


@pytest.mark.parametrize("name", ["weights", "order", "starts", "ends"])
def test_the_ops_refuse_a_strided_index_input(name):
    """The kernels index the 1-D inputs without a stride: a strided view (every other element of a longer buffer)
    would read other rows without an error, so the ops refuse it, forward and backward, on both implementations
    and at trace time (fake tensors)."""
    c = make_case("top2-capacity-drops", torch.float32, torch.device("cpu"))
    a = sort_assignments(c["indices"], c["num_experts"], c["capacity"])
    starts = (torch.cumsum(a.counts, 0) - a.counts).to(torch.int32)
    ins = {"weights": c["weights"].reshape(-1), "order": a.order, "starts": starts,
           "ends": starts + a.kept_counts.to(torch.int32)}
    ins[name] = torch.stack([ins[name], ins[name]], 1)[:, 0]  # the same values, stride 2
    assert not ins[name].is_contiguous()
    args = (c["x"], ins["weights"], c["w1"], c["w3"], c["w2"], ins["order"], ins["starts"], ins["ends"])
    for fn in (lambda: se._forward(se.TorchKernels, *args, 2, False, True),
               lambda: se._backward(se.TorchKernels, c["dy"], *args, c["x"], c["x"], 2, False),
               lambda: torch.ops.mhmoe.scatter_experts_fwd(*args, 2, False, True)):
        with pytest.raises(ValueError, match=rf"^scatter_experts: {name} must be a contiguous 1-D tensor .*"
                                             rf"pass {name}\.contiguous\(\)$"):
            fn()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(ValueError, match=f"{name} must be a contiguous"):
        torch.ops.mhmoe.scatter_experts_fwd(*(mode.from_tensor(t) for t in args), 2, False, True)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_op_through_autograd_equals_the_slow_reference(dtype, capacity_factor):
    """scatter_swiglu (the entry point of the layer) on CPU: the torch twin behind the custom op, autograd through
    register_autograd, gradients in the inputs' dtypes."""
    c = make_case("top3-empty-experts", dtype, torch.device("cpu"))
    if capacity_factor:
        c["capacity"] = 2
    ref = slow_experts(c)
    leaves = {n: c[n].detach().clone().requires_grad_() for n in ("x", "weights", "w1", "w3", "w2")}
    a = sort_assignments(c["indices"], c["num_experts"], c["capacity"])
    y = se.scatter_swiglu(leaves["x"], leaves["weights"], leaves["w1"], leaves["w3"], leaves["w2"], a.order,
                          a.counts, a.kept_counts, a.dropless)
    y.backward(c["dy"])
    got = {"y": y.detach(), **{n: t.grad for n, t in leaves.items()}}
    check(got, ref, dtype, "op")
    if capacity_factor:  # a dropped choice gets no gradient on its weight
        keep = torch.zeros(a.order.numel(), dtype=torch.bool).scatter_(0, a.order, a.keep).view_as(c["weights"])
        assert (got["weights"][~keep] == 0).all() and not keep.all()


# Every variant on the torch twin; two on the kernels (the interpreter is slow).
LAYER_CASES = [(n, "torch") for n in ("smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3-shared",
                                      "mhmoe-h4-renorm-nohead")] + [(n, "triton") for n in ("smoe", "mhmoe-h3-shared")]


@pytest.mark.parametrize("name, kernels", LAYER_CASES)
def test_layers_equal_the_reference(name, kernels, monkeypatch):
    """Whole MoE layers with dispatch="scatter" against tests/reference.py, forward and every gradient; the
    sub-tokens reach the experts as the layer's view of [BT, D] (no copy). kernels="triton": the Triton kernels
    behind the same custom ops (in the interpreter on CPU, compiled on a GPU)."""
    monkeypatch.setattr(se, "CPU_KERNELS", kernels)
    ran = []
    real = se._forward
    monkeypatch.setattr(se, "_forward", lambda k, *a: ran.append(k.name) or real(k, *a))
    device = DEV if kernels == "triton" else torch.device("cpu")
    layer = _make(VARIANTS[name].replace(dispatch="scatter")).to(device)
    x = torch.randn(2, 5, D, device=device, requires_grad=True)
    y, _ = layer(x)
    g = torch.randn_like(y)
    fast = _grads(layer, x, y, g)
    y_ref = reference_forward(layer, x)
    ref = _grads(layer, x, y_ref, g)
    assert ran == [kernels]
    assert_close_scaled(y, y_ref, 1e-6, "output")
    for n, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], fast, ref):
        assert_close_scaled(a, b, 1e-5, f"grad {n}")


def test_the_mhmoe_subtoken_view_reaches_the_kernels_without_a_copy(monkeypatch):
    """x of the experts is the layer's [BT*h, D/h] view of the head projection's output: the same storage."""
    seen = []
    real = torch.ops.mhmoe.scatter_experts_fwd

    def spy(x, *args):
        seen.append(x)
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mhmoe, "scatter_experts_fwd", spy)
    layer = _make(VARIANTS["mhmoe-h3-shared"].replace(dispatch="scatter"))
    tokens = torch.randn(2, 4, D)
    head = layer.head(tokens.reshape(-1, D))
    monkeypatch.setattr(layer.head, "forward", lambda t: head)
    layer(tokens)
    assert seen[0].data_ptr() == head.data_ptr() and seen[0].shape == (2 * 4 * 3, D // 3)


def test_double_backward_raises_a_clear_error():
    layer = _make(VARIANTS["mhmoe-h2"].replace(dispatch="scatter"))
    x = torch.randn(2, 3, D, requires_grad=True)
    y, _ = layer(x)
    with pytest.raises(DoubleBackwardError, match="first-order backward only"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


# ----------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("precision", ["fp32", "fp32-weights-bf16-autocast"])
@pytest.mark.parametrize("name", ["smoe", "mhmoe-h3-shared"])
def test_compiled_layer_has_no_graph_break_and_no_recompile(name, precision):
    torch._dynamo.reset()
    layer = _make(VARIANTS[name].replace(dispatch="scatter", capacity_factor=0.5)).train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    gen = torch.Generator().manual_seed(0)
    graphs, routings = [], set()
    for step in range(3):
        x = torch.randn(2, 6, D, generator=gen, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
            y, aux = compiled(x)
            y_eager, aux_eager = layer(x)
        (y.float().square().mean() + aux.loss).backward()
        assert torch.equal(y, y_eager), f"step {step}"
        assert torch.equal(aux.tokens_per_expert, aux_eager.tokens_per_expert)
        assert aux.dropped_fraction.item() > 0
        routings.add(tuple(aux.tokens_per_expert.tolist()))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert len(routings) > 1  # the steps did route differently
    assert graphs[1:] == [graphs[0]] * 2, f"graphs compiled after each step: {graphs}"
    assert all(p.grad is not None for p in layer.experts.parameters())


def test_whole_model_compiles_without_graph_breaks():
    torch._dynamo.reset()
    moe = VARIANTS["mhmoe-h2"].replace(dispatch="scatter")
    cfg = ModelConfig(vocab_size=64, dim=D, n_layers=2, n_heads=4, max_seq_len=16, moe_every=1,
                      dense_ffn=FFNConfig(kind="dense", dim=D, hidden_dim=64), moe_ffn=moe)
    model = Transformer(cfg)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # counters outlive dynamo.reset()
    for step in range(2):
        idx, tgt = torch.randint(64, (2, 12)), torch.randint(64, (2, 12))
        out = compiled(idx, tgt)
        out.loss.backward()
        assert abs(out.loss.item() - model(idx, tgt).loss.item()) < 1e-5, f"step {step}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # one graph, reused
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)


# ----------------------------------------------------------------------------------------------------------
# Resolution and Triton being optional


def test_auto_picks_scatter_on_cuda_in_16_bit_when_triton_imports(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float16):
        assert resolve_dispatch("auto", cuda, 12, 20, dtype) == "scatter"  # any width: masked tile loads
    # float32 on CUDA: cuBLAS's matmuls (the sorted path), not the FMA kernels Triton builds for fp32; asked of a
    # CUDA device that this machine need not have. dispatch="scatter" still runs the kernels in float32.
    assert resolve_dispatch("auto", cuda, 256, 512, torch.float32) == "sorted"
    assert resolve_dispatch("scatter", cuda, 256, 512, torch.float32) == "scatter"
    assert resolve_dispatch("auto", cpu, 256, 512, torch.bfloat16) == "sorted"
    assert resolve_dispatch("scatter", cpu, 256, 512, torch.float32) == "scatter"
    # The rows seam (expert parallelism, BitNet's experts) has no scatter form.
    assert rows_dispatch("scatter", cuda, 256, 512, torch.bfloat16) == "grouped_mm"
    assert rows_dispatch("auto", cuda, 256, 512, torch.float32) == "sorted"
    assert rows_dispatch("scatter", cpu, 256, 512, torch.bfloat16) == "sorted"
    monkeypatch.setattr(se, "TRITON_AVAILABLE", False)
    assert resolve_dispatch("auto", cuda, 256, 512, torch.bfloat16) == "grouped_mm"
    assert resolve_dispatch("auto", cuda, 256, 512, torch.float32) == "sorted"


def test_the_tests_gpu_config_is_the_first_that_fits_the_dtype():
    """What `_one_config_per_kernel_on_a_gpu` leaves each kernel on a GPU: one config, and one the pruner keeps for
    the dtype (fp32's first config would need 256 KiB of shared memory in the dx launch)."""
    import triton

    from mhmoe.layers.scatter_configs import prune, smem_bytes

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
               for m, n, k, w, st in sk.ROW_CONFIGS]
    for dtype in (torch.float32, torch.bfloat16):
        nargs = {"a1_ptr": torch.empty(0, dtype=dtype)}
        got = first_kept(sk._scatter_mm_kernel.early_config_prune)(configs, nargs, TWO=True, SCALE=False)
        assert got == prune(sk.MM_TILES, configs, nargs, TWO=True)[:1] and len(got) == 1
        c = got[0]
        assert smem_bytes(sk.MM_TILES, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                          {"TWO": True}, dtype.itemsize) <= 232_448


def test_config_accepts_scatter_at_any_width_and_names_the_field_on_a_typo():
    assert FFNConfig(dim=36, hidden_dim=20, heads=3, num_experts=4, dispatch="scatter").dispatch == "scatter"
    with pytest.raises(ConfigError, match=r"^FFNConfig.dispatch: 'scatterr' is not allowed; use one of .*'scatter'") \
            as e:
        FFNConfig(dispatch="scatterr")
    assert "\n" not in str(e.value)


_NO_TRITON = """
import sys

class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton' (blocked by the test)")

sys.meta_path.insert(0, _NoTriton())
import torch
from mhmoe import FFNConfig, build_ffn
from mhmoe.layers import scatter_experts
from mhmoe.layers.experts import resolve_dispatch

assert not scatter_experts.TRITON_AVAILABLE and "triton" not in sys.modules
print(resolve_dispatch("auto", torch.device("cuda"), 256, 512, torch.bfloat16),
      resolve_dispatch("auto", torch.device("cuda"), 256, 512, torch.float32))
layer = build_ffn(FFNConfig(dim=12, hidden_dim=8, num_experts=3, top_k=1, dispatch="scatter"))
try:
    layer(torch.randn(2, 12))
except Exception as e:
    print(type(e).__name__, str(e), sep="|")
"""


def test_without_triton_scatter_raises_one_line_and_auto_never_picks_it():
    out = subprocess.run([sys.executable, "-c", _NO_TRITON], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    picks, error = out.stdout.strip().split("\n")
    assert picks == "grouped_mm sorted"
    name, message = error.split("|")
    assert name == "TritonUnavailableError" and message.startswith("FFNConfig.dispatch: 'scatter' needs Triton")
    assert "pip install triton" in message and "dispatch='auto'" in message


def test_the_backward_materialises_no_gradient_for_the_saved_hidden():
    """h1, h3 are outputs of the forward op only to be saved: autograd must not build zero [S, F] gradients for
    them in every backward (it does by default for outputs the loss does not use)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.made.append((str(func.overloadpacket), tuple(t.shape)))
            return out

    layer = _make(VARIANTS["mhmoe-h2"].replace(dispatch="scatter"))
    x = torch.randn(2, 5, D, requires_grad=True)
    y, _ = layer(x)
    S, F_ = 2 * 5 * 2 * 2, layer.cfg.hidden_dim
    with Shapes() as mode:
        y.sum().backward()
    assert ("mhmoe.scatter_experts_bwd", (2 * 5 * 2, D // 2)) in mode.made  # the mode sees the backward
    assert not [m for m in mode.made if m[1] == (S, F_)], mode.made


def test_the_kernels_build_for_hopper_pipelined_on_warp_group_mmas():
    """The interpreter never compiles the kernels: Triton's real compiler does here, for sm_90 (H100/H200), without
    a GPU (scripts/compile_scatter_kernels.py, the first config each kernel's pruner keeps, per launch variant).
    Every GEMM's K loop must be pipelined (async copies) and its dots Hopper warp-group MMAs; every build fits
    sm_90's shared memory with no large spill. With a budget below what the kernels need, the script fails."""
    script = [sys.executable, str(REPO / "scripts" / "compile_scatter_kernels.py"), "--first-config-only"]
    out = subprocess.run(script, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith("ok ") for line in lines), out.stdout
    for line in lines:
        if "_sum_k_kernel" not in line:
            assert " wgmma  0 " not in line and " async-copies  0 " not in line, line
    # 64 KiB: the smallest bf16 tiles of swiglu_up need 96 KiB, of the dx launch 96 KiB; scatter_mm's 48 KiB fit.
    small = subprocess.run(script + ["--smem-limit", "65536"], env=subprocess_env(), capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert small.returncode == 1, small.stdout + small.stderr
    failed = [line for line in small.stdout.splitlines() if line.startswith("FAILED")]
    assert any("_swiglu_up_kernel" in line and "shared memory 98,304 bytes > 65,536" in line for line in failed)
    assert any(line.startswith("ok ") and "'TWO': False" in line for line in small.stdout.splitlines())
