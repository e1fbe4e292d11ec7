"""The chunked linear cross-entropy (mhmoe/layers/loss.py) against its slow reference, F.cross_entropy on the full
float32 logits: loss and gradients in float32 and under bf16 autocast, any chunk size, ignored rows, tied
weights, torch.compile without graph breaks and with one op for the whole loss (no chunk unrolled into the graph),
no [N, V] tensor ever allocated, and the passes over each chunk's [C, V] buffer."""

import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import assert_close_scaled
from torch.utils._python_dispatch import TorchDispatchMode

from mhmoe.layers.loss import CHUNK_ELEMENTS, chunk_rows, float32_out_matmuls, linear_cross_entropy

N, D, V = 37, 24, 101  # N prime: chunk sizes that do not divide it leave a short last chunk


def _inputs(dtype=torch.float32, ignore=True):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=gen) * 0.3).to(dtype).requires_grad_(True)
    t = torch.randint(V, (N,), generator=gen)
    if ignore:
        t[[3, 20]] = -100  # ignored rows count neither in the sum nor in the mean
    return h, w, t


def _reference(h, w, t, reduction="mean"):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction=reduction)


def _loss_and_grads(fn, h, w, t, scale=2.5):
    h.grad = w.grad = None
    loss = fn(h, w, t)
    (loss * scale).backward()  # a non-unit dL/dloss: the backward scales the gradients saved by the forward
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("rows", [1, 7, 13, N, 64, "auto"])
def test_float32_equals_full_logits(rows):
    h, w, t = _inputs()
    want = _loss_and_grads(_reference, h, w, t)
    got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, rows=rows), h, w, t)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "dh", "dW"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_sum_reduction_and_batched_rows():
    h, w, t = _inputs()
    want = _loss_and_grads(lambda *a: _reference(*a, reduction="sum"), h, w, t)
    # [B, T, D] hidden states with [B, T] targets, as the model passes them (B*T = N: 1 x 37)
    got = _loss_and_grads(lambda h, w, t: linear_cross_entropy(h.view(1, N, D), w, t.view(1, N), rows=5,
                                                               reduction="sum"), h, w, t)
    for name, a, b in zip(("loss", "dh", "dW"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("rows", [7, "auto"])
def test_bf16_autocast_within_tolerance(rows):
    """fp32 weights under bf16 autocast: the matmuls in bf16 as F.linear's would be, the softmax in fp32."""
    h, w, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(_reference, h, w, t)
        got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, rows=rows), h, w, t)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients in the parameters' dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    assert_close_scaled(got[1], want[1], 2e-2, "dh")
    assert_close_scaled(got[2], want[2], 2e-2, "dW")


def test_bf16_weights():
    h, w, t = _inputs(torch.bfloat16)
    want = _loss_and_grads(_reference, h, w, t)
    got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, rows=7), h, w, t)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    assert_close_scaled(got[1], want[1], 2e-2, "dh")
    assert_close_scaled(got[2], want[2], 2e-2, "dW")


def test_tied_weights_gradients_add_up():
    """The LM head's weight is the embedding: its gradient is the embedding's plus the loss's."""
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(V, D)
    idx, t = torch.randint(V, (N,), generator=gen), torch.randint(V, (N,), generator=gen)
    proj = torch.nn.Linear(D, D, bias=False)

    def run(loss_fn):
        emb.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        h = torch.tanh(proj(emb(idx)))  # [N, D]
        loss = loss_fn(h, emb.weight, t)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone(), proj.weight.grad.clone()

    want, got = run(_reference), run(lambda *a: linear_cross_entropy(*a, rows=6))
    for name, a, b in zip(("loss", "d embedding", "d proj"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class _Allocations(TorchDispatchMode):
    """Every aten op: (op name, shapes of its tensor outputs, their dtypes, shapes of its tensor inputs), in order.
    Eagerly the loss runs op by op (`_Eager`); the custom op of torch.compile would be one node here."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [tuple(a.shape) for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.seen.append((func.__name__.split(".")[0], tuple(o.shape), o.dtype))
                self.inputs.append(ins)
        return out

    def largest(self, dtype=None):
        return max((torch.Size(s).numel() for _, s, d in self.seen if dtype is None or d == dtype), default=0)


def test_never_allocates_the_full_logits():
    """By construction: no op in the forward or the backward returns a tensor as large as [N, V] (any dtype);
    the largest is one chunk's logits [rows, V] (W's gradient [V, D] is smaller: D < rows here)."""
    h, w, t = _inputs()
    rows = 30
    with _Allocations() as seen:
        linear_cross_entropy(h, w, t, rows=rows).backward()
    assert seen.largest() == rows * V < N * V
    with _Allocations() as control:  # the hook sees the reference's [N, V] float32 logits
        _reference(h, w, t).backward()
    assert control.largest(torch.float32) >= N * V


def test_no_grad_computes_no_gradients():
    """Under no_grad (evaluation) the forward does the loss alone: one matmul per chunk, nothing saved."""
    h, w, t = _inputs()
    with torch.no_grad(), _Allocations() as seen:
        loss = linear_cross_entropy(h, w, t, rows=10)
    torch.testing.assert_close(loss, _reference(h, w, t).detach(), rtol=1e-5, atol=1e-6)
    matmuls = [(op, s) for op, s, _ in seen.seen if op in ("mm", "addmm", "addmm_", "matmul")]
    assert matmuls == [("mm", (10, V))] * 3 + [("mm", (7, V))]  # the logits of each chunk, no gradient matmul
    with _Allocations() as seen:
        linear_cross_entropy(h, w, t, rows=10)  # grad mode: dh and dW of each chunk as well
    assert sum(op in ("mm", "addmm_") for op, _, _ in seen.seen) == 3 * 4


def test_the_compiled_op_and_the_eager_path_agree_bit_for_bit():
    """The custom op (what torch.compile runs) and the eager autograd.Function run the same body."""
    h, w, t = _inputs()
    eager = _loss_and_grads(lambda *a: linear_cross_entropy(*a, rows=7), h, w, t)

    def op(h, w, t):
        loss, _, _ = torch.ops.mhmoe.linear_cross_entropy(h, w, t, -100, 7, torch.float32, "mean", True)
        return loss

    for a, b in zip(eager, _loss_and_grads(op, h, w, t)):
        assert torch.equal(a, b)


# Not a pass over [C, V]: the matmuls, the reads and writes of the targets' column, and views.
NOT_PASSES = ("mm", "addmm", "addmm_", "gather", "scatter_add_", "permute", "t", "transpose", "view", "slice",
              "alias", "unsqueeze", "squeeze", "expand", "detach")


@pytest.mark.parametrize("dtype, passes", [
    (torch.float32, ["amax", "sub_", "exp_", "sum", "mul_"]),
    # CPU in bf16: the 16-bit logits cast to float32 first, dL/dlogits cast back (CUDA's matmuls write float32).
    (torch.bfloat16, ["_to_copy", "amax", "sub_", "exp_", "sum", "mul_", "_to_copy"]),
])
def test_the_elementwise_passes_over_a_chunk(dtype, passes):
    """The memory-bound work of a training chunk: every op other than the matmuls that reads or writes a [C, V]
    tensor, in order. Fewer passes is the point (module docstring): a divide and a multiply became one multiply."""
    h, w, t = _inputs(dtype)
    rows = 10
    with _Allocations() as seen:
        linear_cross_entropy(h, w, t, rows=rows)
    per_chunk = [op for (op, out, _), ins in zip(seen.seen, seen.inputs)
                 if op not in NOT_PASSES and ((rows, V) in ins or out == (rows, V))]
    assert per_chunk == passes * 3  # 3 chunks of 10 rows (and one of 7)


def test_the_compiled_graph_holds_one_loss_op_whatever_the_chunks():
    """Under torch.compile the chunk loop is one custom op: the graph has no chunk's matmul, 37 chunks or 1."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    h, w, t = _inputs()
    for rows in (1, N):
        torch._dynamo.reset()
        compiled = torch.compile(lambda h, w, t, rows=rows: linear_cross_entropy(h, w, t, rows=rows),
                                 backend=backend, fullgraph=True)
        compiled(h, w, t).backward()
    for gm in graphs:
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert sum("linear_cross_entropy" in x for x in targets) == 1, targets
        assert not [x for x in targets if "mm" in x or "matmul" in x], targets
    assert len(graphs) == 2 and len(graphs[0].graph.nodes) == len(graphs[1].graph.nodes)


@pytest.mark.parametrize("grads", [True, False])
def test_opcheck_of_the_loss_op(grads):
    """torch.library's own checks: schema (no hidden mutation or aliasing), fake tensors, autograd registration,
    AOT dispatch with dynamic shapes."""
    h, w, t = _inputs()
    args = (h.detach().requires_grad_(grads), w.detach().requires_grad_(grads), t, -100, 10, torch.float32, "mean",
            grads)
    result = torch.library.opcheck(torch.ops.mhmoe.linear_cross_entropy.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_float32_out_matmuls_where_torch_has_them():
    """CPU (torch 2.13) has no 16-bit -> float32 matmul: the cast path, checked above. CUDA: see the last test."""
    assert float32_out_matmuls(torch.device("cpu")) is False


def _emulate_float32_out(monkeypatch, accumulate=True):
    """torch.mm / torch.addmm with out_dtype=float32 on CPU as cuBLAS computes them: float32 products of the 16-bit
    operands, no 16-bit rounding of the result (accumulate=False: an addmm that ignores its `out`)."""
    mm, addmm = torch.mm, torch.addmm

    def mm32(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return mm(a, b) if out is None else mm(a, b, out=out)
        return mm(a.float(), b.float())

    def addmm32(c, a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return addmm(c, a, b) if out is None else addmm(c, a, b, out=out)
        return addmm(c, a.float(), b.float(), out=out) if accumulate else addmm(c, a.float(), b.float())

    monkeypatch.setattr(torch, "mm", mm32)
    monkeypatch.setattr(torch, "addmm", addmm32)
    float32_out_matmuls.cache_clear()


@pytest.mark.parametrize("accumulate", [True, False])
def test_the_float32_out_path_on_an_emulated_device(monkeypatch, accumulate):
    """The CUDA path's code on CPU, with the float32-output matmuls emulated: the probe takes them (and refuses an
    addmm that does not accumulate in place), and the bf16 loss and gradients equal the full logits' within bf16's
    tolerance, though not bit for bit those of the cast path (the logits are no longer rounded to bf16)."""
    h, w, t = _inputs(torch.bfloat16)
    cast = _loss_and_grads(lambda *a: linear_cross_entropy(*a, rows=7), h, w, t)
    _emulate_float32_out(monkeypatch, accumulate)
    try:
        assert float32_out_matmuls(torch.device("cpu")) is accumulate
        got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, rows=7), h, w, t)
    finally:
        float32_out_matmuls.cache_clear()
    want = _loss_and_grads(_reference, h, w, t)
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    assert_close_scaled(got[1], want[1], 2e-2, "dh")
    assert_close_scaled(got[2], want[2], 2e-2, "dW")
    assert torch.equal(got[0], cast[0]) is not accumulate  # the emulated path ran exactly when the probe said so


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("rows", [7, "auto"])
def test_cuda_bf16_autocast_takes_the_float32_out_matmuls_within_tolerance(rows):
    """On CUDA in bf16 the logits come out of cuBLAS in float32 and dL/dW accumulates in place in float32
    (torch.mm / addmm with out_dtype) where this torch has them, else the cast path: either way the same loss and
    gradients as the full logits, within bf16's tolerance. Which path ran is a warning in the test summary, not a
    failure: the GPU machines' torch (2.11 on 2026-12-04) may lack the float32 accumulator, and the cast path is
    correct, only slower."""
    dev = torch.device("cuda")
    if not float32_out_matmuls(dev):
        warnings.warn(f"torch {torch.__version__} on this GPU lacks mm/addmm(out_dtype=float32): the chunked loss "
                      "takes the slower cast path", stacklevel=1)
    h, w, t = (x.to(dev).detach().requires_grad_(x.requires_grad) for x in _inputs())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _loss_and_grads(_reference, h, w, t)
        got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, rows=rows), h, w, t)
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    assert_close_scaled(got[1], want[1], 2e-2, "dh")
    assert_close_scaled(got[2], want[2], 2e-2, "dW")


def test_double_backward_is_refused():
    h, w, t = _inputs()
    loss = linear_cross_entropy(h, w, t, rows=10)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_compiles_without_graph_breaks(precision):
    torch._dynamo.reset()
    h, w, t = _inputs()
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, rows=10), backend="aot_eager",
                             fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        want = _loss_and_grads(lambda *a: linear_cross_entropy(*a, rows=10), h, w, t)
        got = _loss_and_grads(compiled, h, w, t)
    for name, a, b in zip(("loss", "dh", "dW"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_chunk_rows():
    assert chunk_rows(65536, 50304) == 1344  # 49 chunks of the gpu preset's micro-batch, about 2^26 logits each
    assert chunk_rows(100, 50304) == 100  # never more rows than there are
    assert chunk_rows(37, 101, 7) == 7 and chunk_rows(5, 101, 7) == 5
    n = chunk_rows(10_000, 8192)
    assert n % 64 == 0 and n * 8192 <= 1.05 * CHUNK_ELEMENTS
    with pytest.raises(ValueError, match="chunk_rows"):
        chunk_rows(10, 10, 0)
