"""dispatch="scatter": E SwiGLU experts as permute-free grouped GEMMs (ScatterMoE, Tan et al. 2024, arXiv 2403.08245),
behind two torch.library custom ops so torch.compile(fullgraph=True) traces through them.

The computation, for the S = N*K assignments sorted by expert (the dispatcher's `order`, assignment id
j = n*K + k, (sub-)token n = j // K; expert e owns the sorted rows [starts[e], ends[e])):

  forward   a[r]  = silu(x[n] W1[e]) * (x[n] W3[e])      swiglu_up: x rows gathered inside the GEMM
            o[j]  = w[j] * (a[r] W2[e])                   scatter_mm: each row written to its assignment row j
            y[n]  = sum_k o[n*K + k]                      sum_k, in float32 (deterministic, no atomics)
  backward  dA[r] = dY[n] W2[e]^T                         swiglu_down_bwd: dY rows gathered inside the GEMM; its
                                                          epilogue: dw[j] = <dA[r], a[r]> (= <dY_n, Expert_e(x_n)>),
                                                          gh1 = w dA x W3 silu'(x W1), gh3 = w dA silu(x W1), w a
            dx[n] = sum_k (gh1[r] W1[e]^T + gh3[r] W3[e]^T)   scatter_mm (two products) to row j, then sum_k
            dW1[e], dW3[e] = X_e^T gh1_e, X_e^T gh3_e     group_xty: per expert, its rows of x gathered by index
            dW2[e] = (w a)_e^T dY_e                       group_xty: dY rows gathered by index

Saved for the backward: the pre-activations h1 = x W1, h3 = x W3 ([S, F] each, compute dtype, sorted order), as
the sorted path; a, silu and silu' are recomputed in the backward's epilogue (elementwise, free next to the GEMM),
and no [S, Din] expert output is kept (dw comes from dA and a). With recompute=True nothing of size [S, F] is kept
and the backward runs swiglu_up again (2/9 more expert FLOPs).

Rows are never permuted in memory: no [S, Din] gathered copy of x or dY, no inverse-permutation copy of the
output. MH-MoE's sub-tokens are a view [BT*h, D/h] of [BT, D]; the kernels take x and dY with their strides and
write y as a fresh [N, Din] that views back to [BT, D], so the head split and merge cost no copy.

Capacity drops (capacity_factor > 0): ends[e] = starts[e] + kept rows, so the dropped rows (each expert's last,
in token order) are neither computed nor written; their output, dx and dw rows are zero (buffers zero-filled
then). Shapes stay static: every buffer is sized by S, whatever the routing.

No host sync: the row-block -> expert mapping is computed inside each kernel from the [E] offsets
(scatter_kernels.py), the grids depend on shapes only, so the path is CUDA-graph and torch.compile friendly.

Two implementations of the same five primitives (`swiglu_up`, `scatter_mm`, `swiglu_down_bwd`, `group_xty`,
`sum_k`), composed identically by `_forward` / `_backward`:
  `TritonKernels` (scatter_kernels.py) on CUDA, and on CPU under Triton's interpreter for the tests;
  `TorchKernels` (below) on CPU: plain torch loops over the experts with the same math (float32 products of the
  compute-dtype operands, outputs rounded to the compute dtype at the same points), so the op runs anywhere.
`CPU_KERNELS` picks the CPU one ("torch"; "triton" runs the kernels in the interpreter, for the tests).

Triton is optional: without it, dispatch="scatter" raises `TritonUnavailableError` (one line, with the fix) and
"auto" never picks it (`TRITON_AVAILABLE`).

Shape legend: N (sub-)tokens, Din expert input width (D/h), F expert hidden, E experts, K top-k, S = N*K rows.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import Tensor

from mhmoe.errors import ConfigError
from mhmoe.layers.sorted_experts import DoubleBackwardError, compute_dtype

try:  # Triton is optional: the CUDA kernels, and their interpreter on CPU for the tests
    from mhmoe.layers.scatter_kernels import TritonKernels

    TRITON_AVAILABLE, TRITON_ERROR = True, ""
except ImportError as e:  # triton absent or broken
    TritonKernels = None
    TRITON_AVAILABLE, TRITON_ERROR = False, f"{type(e).__name__}: {e}".splitlines()[0]

CpuKernels = Literal["torch", "triton"]
CPU_KERNELS: CpuKernels = "torch"  # "triton": the Triton kernels on CPU tensors (needs TRITON_INTERPRET=1)


class TritonUnavailableError(ConfigError):
    """dispatch="scatter" was asked for where `import triton` fails."""


def require_triton() -> None:
    if not TRITON_AVAILABLE:
        raise TritonUnavailableError(
            f"FFNConfig.dispatch: 'scatter' needs Triton, whose import failed ({TRITON_ERROR}); "
            "pip install triton==3.6.0, or use dispatch='auto'")


def _groups(starts: Tensor, ends: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first sorted row, end row) of every expert with rows (CPU: reading them is no sync)."""
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist())) if hi > lo]


class TorchKernels:
    """The five primitives in plain torch, one loop over the experts each: the CPU implementation of the ops and
    the readable statement of what each Triton kernel computes (same arguments, same outputs)."""

    name = "torch"

    @staticmethod
    def swiglu_up(x: Tensor, w1: Tensor, w3: Tensor, order: Tensor, starts: Tensor, ends: Tensor, top_k: int,
                  store_a: bool, store_h: bool) -> tuple[Tensor, Tensor, Tensor]:
        S, F = order.shape[0], w1.shape[-1]
        a = x.new_empty(S if store_a else 0, F)  # [S, F] sorted order
        h1, h3 = (x.new_empty(S if store_h else 0, F) for _ in range(2))
        for e, lo, hi in _groups(starts, ends):
            xe = x.index_select(0, order[lo:hi] // top_k).float()  # [n, Din]
            p1, p3 = xe @ w1[e].float(), xe @ w3[e].float()  # [n, F] float32 accumulators
            if store_a:
                a[lo:hi] = p1 * torch.sigmoid(p1) * p3
            if store_h:
                h1[lo:hi], h3[lo:hi] = p1, p3
        return a, h1, h3

    @staticmethod
    def scatter_mm(ins: tuple[Tensor, ...], ws: tuple[Tensor, ...], order: Tensor, starts: Tensor, ends: Tensor,
                   scale: Tensor | None, rows_out: int, zero: bool) -> Tensor:
        out = (torch.zeros if zero else torch.empty)(rows_out, ws[0].shape[-1], dtype=ins[0].dtype,
                                                     device=ins[0].device)  # [rows_out, NO]
        for e, lo, hi in _groups(starts, ends):
            acc = sum(i[lo:hi].float() @ w[e].float() for i, w in zip(ins, ws))  # [n, NO]
            j = order[lo:hi]
            if scale is not None:
                acc = acc * scale[j].unsqueeze(1)
            out[j] = acc.to(out.dtype)
        return out

    @staticmethod
    def swiglu_down_bwd(dy: Tensor, w2: Tensor, h1: Tensor, h3: Tensor, weights: Tensor, order: Tensor,
                        starts: Tensor, ends: Tensor, top_k: int,
                        zero: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        S, F = order.shape[0], w2.shape[1]
        gh1, gh3, aw = (h1.new_empty(S, F) for _ in range(3))  # [S, F] sorted order
        dw = (torch.zeros if zero else torch.empty)(S, dtype=torch.float32, device=dy.device)  # by assignment
        for e, lo, hi in _groups(starts, ends):
            j = order[lo:hi]
            acc = dy.index_select(0, j // top_k).float() @ w2[e].float().t()  # [n, F] dA
            p1, p3 = h1[lo:hi].float(), h3[lo:hi].float()
            sig = torch.sigmoid(p1)
            silu = p1 * sig
            a = silu * p3
            dw[j] = (acc * a).sum(1)
            w = weights[j].unsqueeze(1)
            ga = acc * w
            gh3[lo:hi] = ga * silu
            aw[lo:hi] = a * w
            gh1[lo:hi] = ga * p3 * (sig + silu * (1.0 - sig))  # silu' = sig + silu (1 - sig)
        return gh1, gh3, aw, dw

    @staticmethod
    def group_xty(x: Tensor, ys: tuple[Tensor, ...], order: Tensor, starts: Tensor, ends: Tensor, top_k: int,
                  x_gather: bool, y_gather: bool, num_experts: int) -> tuple[Tensor, ...]:
        outs = [x.new_zeros(num_experts, x.shape[1], y.shape[1]) for y in ys]  # [E, MX, NY]
        for e, lo, hi in _groups(starts, ends):
            tok = order[lo:hi] // top_k
            xe = (x.index_select(0, tok) if x_gather else x[lo:hi]).float()
            for out, y in zip(outs, ys):
                out[e] = xe.t() @ (y.index_select(0, tok) if y_gather else y[lo:hi]).float()
        return tuple(outs)

    @staticmethod
    def sum_k(src: Tensor, top_k: int) -> Tensor:
        return src.view(-1, top_k, src.shape[1]).sum(1, dtype=torch.float32).to(src.dtype)


Kernels = type[TorchKernels]  # or TritonKernels: the same five static methods


def kernels_for(device: torch.device) -> Kernels:
    """The implementation of the primitives for tensors on `device`."""
    if device.type == "cuda" or (device.type == "cpu" and CPU_KERNELS == "triton"):
        require_triton()
        if device.type == "cpu" and not TritonKernels.interpreted:
            raise ValueError("scatter_experts.CPU_KERNELS: 'triton' runs the kernels on CPU tensors in Triton's "
                             "interpreter only; set TRITON_INTERPRET=1 before mhmoe is imported")
        return TritonKernels
    if CPU_KERNELS != "torch":
        raise ValueError(f"scatter_experts.CPU_KERNELS: {CPU_KERNELS!r} is not one of 'torch', 'triton'")
    return TorchKernels


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' (a process may hold several GPUs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_index_inputs(weights: Tensor, order: Tensor, starts: Tensor, ends: Tensor) -> None:
    """The ops' 1-D inputs must be contiguous: the kernels read element i at pointer + i (no stride argument), so
    a strided view would be read as other rows, silently. One line naming the argument otherwise."""
    for name, t in (("weights", weights), ("order", order), ("starts", starts), ("ends", ends)):
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"scatter_experts: {name} must be a contiguous 1-D tensor (the kernels index it without "
                             f"a stride), got shape {tuple(t.shape)} strides {t.stride()}; pass {name}.contiguous()")


def _forward(k: Kernels, x: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, order: Tensor,
             starts: Tensor, ends: Tensor, top_k: int, dropless: bool,
             save_hidden: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> y [N, Din], h1, h3 ([S, F] when save_hidden, else [0, F])."""
    check_index_inputs(weights, order, starts, ends)
    if not x.dtype == w1.dtype == w3.dtype == w2.dtype or weights.dtype != torch.float32:
        raise ValueError(f"scatter_experts: x and the expert weights take one dtype (the compute dtype) and the "
                         f"combine weights float32, got {x.dtype}, {w1.dtype}, {w3.dtype}, {w2.dtype}, {weights.dtype}")
    a, h1, h3 = k.swiglu_up(x, w1, w3, order, starts, ends, top_k, store_a=True, store_h=save_hidden)
    # o [S, Din] by assignment: for K = 1 that is y itself (row j = token n), no combine pass.
    o = k.scatter_mm((a,), (w2,), order, starts, ends, weights, order.shape[0], zero=not dropless)
    return (o if top_k == 1 else k.sum_k(o, top_k)), h1, h3


def _backward(k: Kernels, dy: Tensor, x: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
              order: Tensor, starts: Tensor, ends: Tensor, h1: Tensor, h3: Tensor, top_k: int,
              dropless: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [N, Din], dweights [S] float32, dw1, dw3 [E, Din, F], dw2 [E, F, Din]."""
    check_index_inputs(weights, order, starts, ends)
    S, E = order.shape[0], w1.shape[0]
    if h1.shape[0] != S:  # recompute=True kept nothing of size [S, F]
        _, h1, h3 = k.swiglu_up(x, w1, w3, order, starts, ends, top_k, store_a=False, store_h=True)
    gh1, gh3, aw, dweights = k.swiglu_down_bwd(dy, w2, h1, h3, weights, order, starts, ends, top_k,
                                               zero=not dropless)
    del h1, h3
    dxs = k.scatter_mm((gh1, gh3), (w1.transpose(1, 2), w3.transpose(1, 2)), order, starts, ends, None, S,
                       zero=not dropless)  # [S, Din] by assignment
    dx = dxs if top_k == 1 else k.sum_k(dxs, top_k)
    dw1, dw3 = k.group_xty(x, (gh1, gh3), order, starts, ends, top_k, x_gather=True, y_gather=False,
                           num_experts=E)
    (dw2,) = k.group_xty(aw, (dy,), order, starts, ends, top_k, x_gather=False, y_gather=True, num_experts=E)
    return dx, dweights, dw1, dw3, dw2


# ----------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break, shapes from the fake implementations only, so new
# routings reuse the graph), differentiable through register_autograd.


@torch.library.custom_op("mhmoe::scatter_experts_fwd", mutates_args=())
def scatter_experts_fwd(x: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, order: Tensor,
                        starts: Tensor, ends: Tensor, top_k: int, dropless: bool,
                        save_hidden: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, Din] (any strides), weights [S] float32 by assignment, w1/w3 [E, Din, F], w2 [E, F, Din] (all in the
    compute dtype), order [S] long, starts/ends [E] int32 -> y [N, Din], h1, h3 ([S, F], or [0, F] unless
    save_hidden)."""
    with torch.autocast(x.device.type, enabled=False), _on_device(x.device):
        return _forward(kernels_for(x.device), x, weights, w1, w3, w2, order, starts, ends, top_k, dropless,
                        save_hidden)


@scatter_experts_fwd.register_fake
def _(x, weights, w1, w3, w2, order, starts, ends, top_k, dropless, save_hidden):  # noqa: ANN001, ANN202
    check_index_inputs(weights, order, starts, ends)  # at trace time too: a compiled graph would pass them on
    rows, F = (order.shape[0] if save_hidden else 0), w1.shape[-1]
    return x.new_empty(x.shape[0], x.shape[1]), x.new_empty(rows, F), x.new_empty(rows, F)


@torch.library.custom_op("mhmoe::scatter_experts_bwd", mutates_args=())
def scatter_experts_bwd(dy: Tensor, x: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, order: Tensor,
                        starts: Tensor, ends: Tensor, h1: Tensor, h3: Tensor, top_k: int,
                        dropless: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of scatter_experts_fwd's y: (dx, dweights, dw1, dw3, dw2)."""
    with torch.autocast(dy.device.type, enabled=False), _on_device(dy.device):
        return _backward(kernels_for(dy.device), dy, x, weights, w1, w3, w2, order, starts, ends, h1, h3, top_k,
                         dropless)


@scatter_experts_bwd.register_fake
def _(dy, x, weights, w1, w3, w2, order, starts, ends, h1, h3, top_k, dropless):  # noqa: ANN001, ANN202
    check_index_inputs(weights, order, starts, ends)
    return (x.new_empty(x.shape[0], x.shape[1]), weights.new_empty(weights.shape), w1.new_empty(w1.shape),
            w3.new_empty(w3.shape), w2.new_empty(w2.shape))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weights, w1, w3, w2, order, starts, ends, top_k, dropless, _ = inputs
    _, h1, h3 = output
    # h1, h3 are saved state, not results: no gradient flows into them, and autograd must not materialise zero
    # [S, F] gradients for them in every backward (it would, by default, for the outputs without one).
    ctx.mark_non_differentiable(h1, h3)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weights, w1, w3, w2, order, starts, ends, h1, h3)
    ctx.top_k, ctx.dropless = top_k, dropless


def _backward_rule(ctx, dy, _dh1, _dh3):  # noqa: ANN001, ANN202
    # The autograd engine runs a backward with grad mode on exactly when create_graph=True; the bwd op has no
    # derivative of its own (as the sorted path: first order only, refused at once rather than silently wrong).
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise DoubleBackwardError(
            "the scatter experts (dispatch='scatter', which 'auto' runs on CUDA with Triton) have a first-order "
            "backward only: create_graph=True (double backward, gradient penalties) is not supported; use "
            "dispatch='grouped_mm', whose ops autograd differentiates itself")
    if dy is None:  # y took no part in the loss
        return (None,) * 11
    x, weights, w1, w3, w2, order, starts, ends, h1, h3 = ctx.saved_tensors
    dx, dweights, dw1, dw3, dw2 = torch.ops.mhmoe.scatter_experts_bwd(
        dy, x, weights, w1, w3, w2, order, starts, ends, h1, h3, ctx.top_k, ctx.dropless)
    return dx, dweights, dw1, dw3, dw2, None, None, None, None, None, None


torch.library.register_autograd("mhmoe::scatter_experts_fwd", _backward_rule, setup_context=_setup_context)


def scatter_swiglu(x: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, order: Tensor, counts: Tensor,
                   kept_counts: Tensor, dropless: bool, recompute: bool = False) -> Tensor:
    """x [N, Din] (sub-)tokens (a view is fine), weights [N, K] combine weights, stacked w1/w3 [E, Din, F] and
    w2 [E, F, Din], the dispatcher's order [S] (assignment ids sorted by expert, stable), counts [E] rows per
    expert and kept_counts [E] rows each keeps -> y [N, Din] in the compute dtype (autocast's, else x's)."""
    require_triton()
    dt = compute_dtype(x)
    top_k = weights.shape[1]
    with torch.autocast(x.device.type, enabled=False):
        group_ends = torch.cumsum(counts, 0)
        starts = (group_ends - counts).to(torch.int32)  # [E] first sorted row of each expert
        ends = starts + kept_counts.to(torch.int32)  # [E] dropped rows (the group's tail) are not computed
        # A no-op for x already in dt (under autocast the head projection's output is): the sub-token view itself
        # reaches the kernels. The weights are cast per call, as autocast would for any matmul.
        xc, w1c, w3c, w2c = (t.to(dt) for t in (x, w1, w3, w2))
        wf = weights.reshape(-1).float()  # [S] by assignment id n*K + k
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w1, w3, w2))
        y, _, _ = torch.ops.mhmoe.scatter_experts_fwd(xc, wf, w1c, w3c, w2c, order, starts, ends, top_k, dropless,
                                                      needs_grad and not recompute)
    return y
