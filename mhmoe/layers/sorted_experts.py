"""E SwiGLU experts with stacked weights and dropless sorted dispatch.

sum_{i in Phi} G(x)_i * Expert_i(x) of eq. (1)/(3), computed for all (sub-)tokens at once:
  1. sort the N*K assignments by expert (stable, so ties keep token order): one permutation per layer call,
     reused by the backward,
  2. run each expert on its contiguous group of rows,
  3. weight each row by its combine weight and add it straight into its (sub-)token's output row.

Fast path (dispatch="sorted" of the plain `Experts`, see layers/experts.py): one custom autograd function,
`SortedExpertsFn`, does the gather, the experts and the weighted combine per expert group (rows gathered with
index_select, products written with `out=` into preallocated buffers, outputs index_add_-ed into [N, Din]), and a
hand-written backward:
  * saves only x, the combine weights, the routing rows and the pre-activations x W1, x W3 ([S, F] each; the
    SwiGLU product and silu are recomputed per group), or nothing of size [S, F] with `recompute=True` (then the
    backward recomputes x W1, x W3: 2/9 more expert matmul FLOPs for the [S, F] activations' memory);
  * writes the weight gradients per expert into [E, ...] buffers (no unbind/stack), accumulates dX per group
    with index_add_ (no zero-filled [N*K, D] buffer, no [N, K, D] product);
  * takes the combine-weight gradient as the row dot product <dY W2^T, silu(x W1) * x W3> (no [S, D] expert
    output kept);
  * accumulates the combine (and dX) in float32 for bfloat16/float16 activations;
  * is first-order only: a backward with create_graph=True raises (`DoubleBackwardError`) instead of returning
    gradients whose own derivatives would miss the expert terms.
Two modes, two entry points: `sorted_experts_combine` (mode="combine": gather, experts, weighted combine into
[N, Din]) and `sorted_experts_rows` (mode="rows": experts on rows already gathered in sorted order, [S', Din] out,
no weights; the rows seam of expert parallelism, `Experts._run_sorted`).

CPU threading (`threading`): with T > 1 torch threads, "inter-expert" runs T contiguous ranges of experts (about
S'/T rows each) concurrently in T worker threads of one intra-op thread each, instead of one expert after another
with every matmul split T ways ("intra-op"). The small matmuls of many fine experts (MH-MoE h=3: 96 experts of
[~384 x D/3] x [D/3 x F']) gain little from intra-op threads. Each range adds into its own [N, Din] output (and dX)
buffer, summed after the join, so the result is deterministic for a given T. "auto" picks inter-expert on CPU when
every worker gets at least `MIN_EXPERTS_PER_WORKER` experts. Forward and backward each run on the caller's thread
alone while a thread-local tool watches (a dispatch or function mode such as FlopCounterMode, or the profiler):
`threads.tools_watching`.

Weights are stacked [E, ...]; the generic sorted path splits them with `unbind(0)` once per forward: indexing
W[e] inside the loop would make autograd build a full-size zero gradient per expert (O(E * |W|) in backward).

Shape legend: N (sub-)tokens, Din expert input width (D/h), F expert hidden, E experts, K top-k,
S = N*K assignments (S' after capacity drops).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mhmoe.layers.threads import expert_ranges, run_ranges, tools_watching

Mode = Literal["combine", "rows"]
MODES: tuple[Mode, ...] = ("combine", "rows")


class DoubleBackwardError(RuntimeError):
    """A backward with create_graph=True reached the first-order-only fused experts."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls of x would run in: the autocast dtype when autocast is on for x's device, else x's."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def acc_dtype(dt: torch.dtype) -> torch.dtype:
    """Accumulator of the combine and of dX: float32 for 16-bit activations, else the dtype itself."""
    return torch.promote_types(dt, torch.float32)


def first_order_only(backward: Callable) -> Callable:
    """Mark a hand-written backward once-differentiable (torch's `once_differentiable`) and refuse create_graph=True.

    torch's decorator alone raises only at the second backward and only when dY itself requires grad: with a
    constant dY (loss = y.sum()) the first-order gradients would come back without a graph and the expert terms
    would vanish from any second derivative without a word. The autograd engine runs a backward with grad mode on
    exactly when create_graph=True, so that is refused here, at once, with the way out.
    """
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):  # noqa: ANN001, ANN202
        if torch.is_grad_enabled():
            raise DoubleBackwardError(
                "the fused sorted experts (dispatch='sorted', which 'auto' runs on CPU) have a first-order "
                "backward only: a backward with create_graph=True (double backward, gradient penalties, "
                "Hessian-vector products) is not supported; use dispatch='grouped_mm', whose ops autograd "
                "differentiates itself")
        return once(ctx, *grads)

    return wrapper


class SortedExpertsFn(torch.autograd.Function):
    """y = sum over rows r of w[r] * SwiGLU_{e(r)}(x[rows[r]]), rows sorted by expert e(r) in groups of `sizes`.

    forward(mode, x, w, w1 [E, Din, F], w3 [E, Din, F], w2 [E, F, Din], rows, sizes list[int] (E entries, sum S'),
            n_out, recompute, compute dtype, workers) -> y
    mode="combine": x [N, Din] (sub-)tokens, w [S'] combine weights, rows [S'] long (sub-)token of each sorted row;
        y [n_out, Din] is the weighted sum into the (sub-)tokens.
    mode="rows": x [S', Din] is already gathered in sorted order, w and rows are not taken (pass None); y [S', Din]
        is each row's expert output, unweighted (what `Experts._run_sorted` returns).
    Call it through `sorted_experts_combine` / `sorted_experts_rows`.
    workers: expert ranges run concurrently (see `expert_workers`); 1 = one expert after another.
    """

    @staticmethod
    def forward(ctx, mode, x, w, w1, w3, w2, rows, sizes, n_out, recompute, dt, workers=1):  # noqa: ANN001, ANN205
        if mode not in MODES:
            raise ValueError(f"SortedExpertsFn: mode must be one of {MODES}, got {mode!r}")
        combine = mode == "combine"
        if combine != (w is not None) or combine != (rows is not None):
            raise ValueError(f"SortedExpertsFn: mode={mode!r} takes w and rows {'both' if combine else 'as None'}")
        with torch.autocast(x.device.type, enabled=False):
            xc, w1c, w3c, w2c = (t.to(dt) for t in (x, w1, w3, w2))
            S = sum(sizes)
            Fh, Din = w1.shape[-1], w1.shape[-2]
            acc = acc_dtype(dt)
            ranges = expert_ranges(sizes, workers)
            if combine:  # one [n_out, Din] accumulator per concurrent range (index_add_ of two threads would race)
                outs = [torch.zeros(n_out, Din, dtype=acc, device=x.device) for _ in ranges]
            else:
                outs = [torch.empty(S, Din, dtype=dt, device=x.device)]
            keep = not recompute
            h1 = xc.new_empty(S, Fh) if keep else None
            h3 = xc.new_empty(S, Fh) if keep else None

            def run(groups: list[tuple[int, int, int]], i: int) -> None:
                out = outs[i] if combine else outs[0]
                for e, start, n in groups:
                    sl = slice(start, start + n)
                    xe = xc.index_select(0, rows[sl]) if combine else xc[sl]  # [n, Din]
                    a1 = torch.mm(xe, w1c[e], out=h1[sl]) if keep else xe @ w1c[e]  # [n, F]
                    a3 = torch.mm(xe, w3c[e], out=h3[sl]) if keep else xe @ w3c[e]
                    a = F.silu(a1)
                    a.mul_(a3)
                    if not combine:
                        torch.mm(a, w2c[e], out=out[sl])
                        continue
                    ye = a @ w2c[e]  # [n, Din]
                    we = w[sl].unsqueeze(1)
                    ye = ye.mul_(we) if ye.dtype == acc else ye.to(acc).mul_(we)
                    out.index_add_(0, rows[sl], ye)

            run_ranges(run, ranges, x.device, workers)
            out = outs[0]
            for other in outs[1:]:
                out.add_(other)
        ctx.sizes, ctx.recompute, ctx.dt, ctx.combine = list(sizes), recompute, dt, combine
        ctx.x_dtype, ctx.n_rows, ctx.workers = x.dtype, x.shape[0], workers
        ctx.w_dtypes = (w1.dtype, w3.dtype, w2.dtype)
        ctx.save_for_backward(xc, w, w1c, w3c, w2c, rows, h1, h3)
        return out.to(dt) if combine else out

    @staticmethod
    @first_order_only
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        xc, w, w1c, w3c, w2c, rows, h1, h3 = ctx.saved_tensors
        sizes, dt, combine = ctx.sizes, ctx.dt, ctx.combine
        need_x, need_w, need_1, need_3, need_2 = ctx.needs_input_grad[1:6]
        # A tool may watch the backward alone (FlopCounterMode around loss.backward()): decide again here.
        workers = 1 if tools_watching() else ctx.workers
        need_w = need_w and combine
        E, Din, Fh = w1c.shape
        acc = acc_dtype(dt)
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(dt).contiguous()
            some_empty = any(n == 0 for n in sizes)
            new = torch.zeros if some_empty else torch.empty  # experts without rows get zero gradients
            g1 = new(E, Din, Fh, dtype=dt, device=gy.device) if need_1 else None
            g3 = new(E, Din, Fh, dtype=dt, device=gy.device) if need_3 else None
            g2 = new(E, Fh, Din, dtype=dt, device=gy.device) if need_2 else None
            gw = torch.empty(w.shape, dtype=acc, device=w.device) if need_w else None  # to w.dtype at the end
            ranges = expert_ranges(sizes, workers)
            gxs: list[torch.Tensor] = []
            if need_x:  # gathered rows scatter into [N, Din]: one buffer per concurrent range
                gxs = ([torch.zeros(ctx.n_rows, Din, dtype=acc, device=gy.device) for _ in ranges]
                       if combine else [torch.empty(ctx.n_rows, Din, dtype=dt, device=gy.device)])

            def run(groups: list[tuple[int, int, int]], i: int) -> None:
                gx = (gxs[i] if combine else gxs[0]) if need_x else None
                for e, start, n in groups:
                    sl = slice(start, start + n)
                    xe = xc.index_select(0, rows[sl]) if combine else xc[sl]  # [n, Din]
                    if ctx.recompute:
                        a1, a3 = xe @ w1c[e], xe @ w3c[e]
                    else:
                        a1, a3 = h1[sl], h3[sl]
                    s = F.silu(a1)  # [n, F]
                    a = s * a3  # SwiGLU output, the input of W2
                    if combine:
                        ge = gy.index_select(0, rows[sl])  # [n, Din], dY of the (sub-)tokens of these rows
                        ga = ge @ w2c[e].t()  # [n, F], gradient of the unweighted expert's hidden
                        we = w[sl].to(dt).unsqueeze(1)
                        if need_w:  # d y / d w_r = Expert(x_r) = a_r W2, so <dY_r, a_r W2> = <dY_r W2^T, a_r>
                            torch.linalg.vecdot(ga.to(acc), a.to(acc), out=gw[sl]) if dt != acc else \
                                torch.linalg.vecdot(ga, a, out=gw[sl])
                        ga.mul_(we)
                        if need_2:
                            torch.mm(a.t(), ge.mul_(we), out=g2[e])
                    else:
                        ge = gy[sl]
                        ga = ge @ w2c[e].t()
                        if need_2:
                            torch.mm(a.t(), ge, out=g2[e])
                    del a
                    gh3 = s.mul_(ga)  # d/d(x W3) = dA * silu(x W1)
                    gh1 = torch.ops.aten.silu_backward(ga.mul_(a3), a1)  # d/d(x W1) = dA * x W3 * silu'(x W1)
                    del s, ga
                    if need_1:
                        torch.mm(xe.t(), gh1, out=g1[e])
                    if need_3:
                        torch.mm(xe.t(), gh3, out=g3[e])
                    if need_x:
                        # addmm with out=, not addmm_: the same kernel, and FlopCounterMode counts aten.addmm only.
                        if not combine:
                            ge_x = torch.mm(gh1, w1c[e].t(), out=gx[sl])
                            torch.addmm(ge_x, gh3, w3c[e].t(), out=ge_x)
                        else:
                            ge_x = gh1 @ w1c[e].t()
                            torch.addmm(ge_x, gh3, w3c[e].t(), out=ge_x)
                            gx.index_add_(0, rows[sl], ge_x if ge_x.dtype == acc else ge_x.to(acc))

            run_ranges(run, ranges, gy.device, workers)
            gx = gxs[0] if need_x else None
            for other in gxs[1:]:
                gx.add_(other)
        w1d, w3d, w2d = ctx.w_dtypes
        return (None,
                gx.to(ctx.x_dtype) if need_x else None,
                gw.to(w.dtype) if need_w else None,
                g1.to(w1d) if need_1 else None,
                g3.to(w3d) if need_3 else None,
                g2.to(w2d) if need_2 else None,
                None, None, None, None, None, None)


def sorted_experts_combine(x: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                           rows: torch.Tensor, sizes: list[int], recompute: bool = False,
                           workers: int = 1) -> torch.Tensor:
    """mode="combine" of `SortedExpertsFn`: x [N, Din], w [S'] combine weights and rows [S'] (sub-)token of each
    row, in expert order, sizes [E] rows per expert -> y [N, Din]; matmuls in the autocast dtype when it is on."""
    return SortedExpertsFn.apply("combine", x, w, w1, w3, w2, rows, sizes, x.shape[0], recompute, compute_dtype(x),
                                 workers)


def sorted_experts_rows(xs: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, sizes: list[int],
                        recompute: bool = False, workers: int = 1) -> torch.Tensor:
    """mode="rows" of `SortedExpertsFn`: xs [S', Din] rows grouped by expert, sizes [E] -> [S', Din] each row's
    unweighted expert output; matmuls in the autocast dtype when it is on."""
    return SortedExpertsFn.apply("rows", xs, None, w1, w3, w2, None, sizes, xs.shape[0], recompute,
                                 compute_dtype(xs), workers)
