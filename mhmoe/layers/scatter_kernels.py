"""Triton kernels of the scatter experts (layers/scatter_experts.py): grouped GEMMs that gather their input rows
and scatter their output rows by index, so no [S, Din] gathered copy and no inverse permutation are materialised.

Each kernel works on the S assignment rows in expert order (`order` [S]: assignment id j = n*K + k of each sorted
row; token n = j // K). Expert e owns the sorted rows [starts[e], ends[e]); rows beyond ends[e] (capacity drops)
are never computed.

  swiglu_up        a[r] = silu(x[n] W1[e]) * x[n] W3[e]          x rows gathered in the kernel; h1, h3 kept on demand
  scatter_mm       out[j] = sum_p in_p[r] Wp[e] (* w[j])         rows read in sorted order, written to row j
  swiglu_down_bwd  dA = dY[n] W2[e]^T (gathered), then in the epilogue: dw partials <dA, a>, gh1, gh3, w * a
  group_xty        dW[e] = X_e^T Y_e                              per expert, a loop over its rows (ScatterMoE's
                                                                  groupXtY); X and/or Y rows gathered by token
  sum_k            y[n] = sum_k o[n*K + k] in float32             the deterministic combine (no atomics)

Row blocks to experts: the row-block kernels launch cdiv(S, BLOCK_M) + E row blocks (every expert's last block
may be partial, so sum_e cdiv(S_e, BLOCK_M) <= that bound) times the column tiles. Each program finds its expert
itself from the [E] start/end offsets (block counts per expert, their cumsum in registers, the number of cumsums
<= its block id); surplus programs exit at once. No block table is materialised because it would depend on
BLOCK_M, which the autotuner picks at launch; the grid is static-shaped and nothing reads device data on the host,
so the launches are sync-free and can be captured in a CUDA graph (after the first call has autotuned).

Accumulation is float32; tiles are loaded in the tensors' dtype (bfloat16 under autocast, or float16/float32).
Under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) the constexpr UPCAST converts both dot operands to
float32 first: Triton 3.6's interpreter multiplies the raw uint16 bit patterns of two bfloat16 tiles in tl.dot.
A product of two bfloat16 (or float16) numbers is exact in float32, so the upcast changes only the summation order
against the tensor-core path. The constexpr ROUND works around the interpreter's other bfloat16 bug: its float32 ->
bfloat16 cast truncates where the GPU rounds to nearest even (`_out` rounds first). With both, the interpreted
kernels round every stored value as the torch twin does. The compiled kernels take neither branch.

Shape legend: N (sub-)tokens, Din expert input width, F expert hidden, E experts, K top-k, S = N*K rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing
from triton import knobs

from mhmoe.layers.scatter_configs import Tiles, pruner

# Whether triton.jit made interpreted functions: it reads TRITON_INTERPRET when it decorates, i.e. at this import.
INTERPRET = bool(knobs.runtime.interpret)
UPCAST = INTERPRET  # the interpreter's bfloat16 tl.dot bug (module docstring)
ROUND = INTERPRET  # the interpreter's truncating float32 -> bfloat16 cast (`_out`)

# dwp, the combine-weight gradient's partial sums, has one column per BLOCK_N-wide tile of F at the smallest
# BLOCK_N any config of `_swiglu_down_bwd_kernel` uses; a config with wider tiles leaves the rest zero.
MIN_BLOCK_N = 16 if INTERPRET else 64


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for Hopper; one small config under the interpreter
    (with one config the autotuner runs no benchmark, and the interpreter is slow)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


# Row-block GEMMs (rows of one expert x columns); configs checked for spills with scripts/compile_scatter_kernels.py.
# Each kernel tries those its pruner keeps for the dtype and the device's shared memory (scatter_configs.py).
# Two accumulators (swiglu_up) double the registers per tile: 8 warps from 64 x 128 up.
ROW_CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
               (128, 128, 32, 8, 4)]
DUAL_CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
# The backward's SwiGLU epilogue keeps ~7 tiles live (dA, h1, h3 and their products): 32 float32 elements of a
# tile per thread at most, or ptxas spills (scripts/compile_scatter_kernels.py).
BWD_CONFIGS = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4),
               (128, 64, 32, 8, 4)]
# Per-expert X^T Y tiles (BLOCK_M x BLOCK_N of the weight gradient), BLOCK_K rows per step.
XTY_CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
               (128, 128, 32, 8, 4)]
assert INTERPRET or all(n % MIN_BLOCK_N == 0 for _, n, _, _, _ in BWD_CONFIGS)  # dwp's column groups

# What one stage of each kernel's K loop loads into shared memory (elements; scatter_configs.py).
UP_TILES = Tiles("x_ptr", lambda m, n, k, c: m * k + 2 * k * n)  # x rows, W1 and W3 tiles
MM_TILES = Tiles("a1_ptr", lambda m, n, k, c: (m * k + k * n) * (2 if c.get("TWO") else 1))  # 1 or 2 products
BWD_TILES = Tiles("dy_ptr", lambda m, n, k, c: m * k + k * n)  # dY rows, W2^T tile
XTY_TILES = Tiles("x_ptr", lambda m, n, k, c: m * k + k * n * (2 if c.get("DUAL") else 1))  # X^T, Y (and Y2)


# Arguments the kernels take as plain runtime integers, not specialised (Triton would compile a variant for a value
# of 1 and for multiples of 16): the layers of one model (and the variants a benchmark runs) share one binary.
# The widths and strides stay specialised, their divisibility by 16 is what vectorises the loads.
GENERIC = ["E", "TOP_K"]


def _bench(kernel_call, quantiles):  # noqa: ANN001, ANN202
    """The autotuner's timing, shorter than Triton's default (25 ms warm-up, 100 ms per config): each config of
    each kernel variant is timed once per shape, at the first call."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: float32 inputs as torch's matmuls would run them (TF32 only when torch allows it);
    16-bit inputs ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter's bfloat16 tl.dot bug (module docstring); exact products either way
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _out(v, ptr, ROUND: tl.constexpr):
    """float32 v cast to ptr's element type for a store. ROUND (the interpreter only): its float32 -> bfloat16
    cast truncates, where the GPU's rounds to nearest even; round here, then the cast is exact."""
    if ROUND:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _expert_block(pid_m, starts_ptr, ends_ptr, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first sorted row, end row) of row block pid_m; expert >= E for a surplus block."""
    offs_e = tl.arange(0, E_P2)
    mask_e = offs_e < E
    lo = tl.load(starts_ptr + offs_e, mask=mask_e, other=0)
    hi = tl.load(ends_ptr + offs_e, mask=mask_e, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M  # [E_P2] row blocks of each expert (0 for an empty one)
    last = tl.cumsum(blocks, 0)  # blocks of experts 0..e
    e = tl.sum((last <= pid_m).to(tl.int32), 0)  # experts wholly before this block = this block's expert
    here = offs_e == e
    start = tl.sum(tl.where(here, lo + (pid_m - (last - blocks)) * BLOCK_M, 0), 0)
    end = tl.sum(tl.where(here, hi, 0), 0)
    return e, start, end


@triton.autotune(configs=_configs(DUAL_CONFIGS), key=["Din", "F", "STORE_H"], do_bench=_bench,
                 prune_configs_by=pruner(UP_TILES))
@triton.jit(do_not_specialize=GENERIC)
def _swiglu_up_kernel(x_ptr, w1_ptr, w3_ptr, order_ptr, starts_ptr, ends_ptr, a_ptr, h1_ptr, h3_ptr,
                      Din, F, E,
                      stride_xm, stride_xk, stride_1e, stride_1k, stride_1n, stride_3e, stride_3k, stride_3n,
                      TOP_K, STORE_A: tl.constexpr, STORE_H: tl.constexpr, E_P2: tl.constexpr,
                      UPCAST: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(F, BLOCK_N)
    pid_m, pid_n = pid // tiles_n, pid % tiles_n  # column tiles of one row block run together: x rows stay in L2
    e, start, end = _expert_block(pid_m, starts_ptr, ends_ptr, E, E_P2, BLOCK_M)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)  # sorted rows
    mask_m = rows < end
    tok = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64) // TOP_K  # gathered in the loads below
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < F
    ks = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + ks[None, :] * stride_xk
    w1_ptrs = w1_ptr + e64 * stride_1e + ks[:, None] * stride_1k + cols[None, :] * stride_1n
    w3_ptrs = w3_ptr + e64 * stride_3e + ks[:, None] * stride_3k + cols[None, :] * stride_3n
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Din, BLOCK_K):
        mask_k = ks < Din - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w1t = tl.load(w1_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        w3t = tl.load(w3_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc1 = _dot(xt, w1t, acc1, UPCAST, PRECISION)
        acc3 = _dot(xt, w3t, acc3, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w1_ptrs += BLOCK_K * stride_1k
        w3_ptrs += BLOCK_K * stride_3k
    out = rows.to(tl.int64)[:, None] * F + cols[None, :]  # a, h1, h3: contiguous [S, F] in sorted order
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_A:
        a = acc1 * tl.sigmoid(acc1) * acc3  # SwiGLU from the float32 accumulators
        tl.store(a_ptr + out, _out(a, a_ptr, ROUND), mask=mask)
    if STORE_H:
        tl.store(h1_ptr + out, _out(acc1, h1_ptr, ROUND), mask=mask)
        tl.store(h3_ptr + out, _out(acc3, h3_ptr, ROUND), mask=mask)


@triton.autotune(configs=_configs(ROW_CONFIGS), key=["KD", "NO", "TWO", "SCALE"], do_bench=_bench,
                 prune_configs_by=pruner(MM_TILES))
@triton.jit(do_not_specialize=["E"])
def _scatter_mm_kernel(a1_ptr, wa_ptr, a2_ptr, wb_ptr, weights_ptr, order_ptr, starts_ptr, ends_ptr, out_ptr,
                       KD, NO, E,
                       stride_am, stride_ak, stride_ae, stride_ak2, stride_an,
                       stride_bm, stride_bk, stride_be, stride_bk2, stride_bn, stride_om,
                       TWO: tl.constexpr, SCALE: tl.constexpr, E_P2: tl.constexpr,
                       UPCAST: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[j] = (a1[r] Wa[e] (+ a2[r] Wb[e])) (* w[j]): inputs in sorted order, each row to its assignment row."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(NO, BLOCK_N)
    pid_m, pid_n = pid // tiles_n, pid % tiles_n
    e, start, end = _expert_block(pid_m, starts_ptr, ends_ptr, E, E_P2, BLOCK_M)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    mask_m = rows < end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < NO
    ks = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    a_ptrs = a1_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak
    wa_ptrs = wa_ptr + e64 * stride_ae + ks[:, None] * stride_ak2 + cols[None, :] * stride_an
    b_ptrs = a2_ptr + rows64[:, None] * stride_bm + ks[None, :] * stride_bk
    wb_ptrs = wb_ptr + e64 * stride_be + ks[:, None] * stride_bk2 + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        mask_k = ks < KD - k0
        at = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(wa_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(at, wt, acc, UPCAST, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        wa_ptrs += BLOCK_K * stride_ak2
        if TWO:
            bt = tl.load(b_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt2 = tl.load(wb_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _dot(bt, wt2, acc, UPCAST, PRECISION)
            b_ptrs += BLOCK_K * stride_bk
            wb_ptrs += BLOCK_K * stride_bk2
    j = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)  # assignment row: the scatter
    if SCALE:
        acc = acc * tl.load(weights_ptr + j, mask=mask_m, other=0.0)[:, None]
    tl.store(out_ptr + j[:, None] * stride_om + cols[None, :], _out(acc, out_ptr, ROUND),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_configs(BWD_CONFIGS), key=["Din", "F"], reset_to_zero=["dwp_ptr"], do_bench=_bench,
                 prune_configs_by=pruner(BWD_TILES))
@triton.jit(do_not_specialize=GENERIC + ["DWP_COLS"])
def _swiglu_down_bwd_kernel(dy_ptr, w2_ptr, h1_ptr, h3_ptr, weights_ptr, order_ptr, starts_ptr, ends_ptr,
                            gh1_ptr, gh3_ptr, aw_ptr, dwp_ptr,
                            Din, F, E, stride_dym, stride_dyk, stride_2e, stride_2f, stride_2d, DWP_COLS,
                            TOP_K, E_P2: tl.constexpr, UPCAST: tl.constexpr,
                            ROUND: tl.constexpr, PRECISION: tl.constexpr, MIN_BLOCK_N: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dA = dY[n] W2[e]^T for a tile of sorted rows x F columns, then the SwiGLU backward in the epilogue."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(F, BLOCK_N)
    pid_m, pid_n = pid // tiles_n, pid % tiles_n
    e, start, end = _expert_block(pid_m, starts_ptr, ends_ptr, E, E_P2, BLOCK_M)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    mask_m = rows < end
    j = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    tok = j // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # along F
    mask_n = cols < F
    ks = tl.arange(0, BLOCK_K)  # along Din
    e64 = e.to(tl.int64)
    dy_ptrs = dy_ptr + tok[:, None] * stride_dym + ks[None, :] * stride_dyk  # dY gathered by token
    w_ptrs = w2_ptr + e64 * stride_2e + ks[:, None] * stride_2d + cols[None, :] * stride_2f  # W2[e]^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Din, BLOCK_K):
        mask_k = ks < Din - k0
        dyt = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(dyt, wt, acc, UPCAST, PRECISION)
        dy_ptrs += BLOCK_K * stride_dyk
        w_ptrs += BLOCK_K * stride_2d
    hid = rows.to(tl.int64)[:, None] * F + cols[None, :]  # h1, h3, gh1, gh3, aw: contiguous [S, F], sorted
    mask = mask_m[:, None] & mask_n[None, :]
    # The epilogue stores each result as soon as it is complete, so few [BLOCK_M, BLOCK_N] temporaries are live
    # at once (register pressure: scripts/compile_scatter_kernels.py reports spills).
    h1 = tl.load(h1_ptr + hid, mask=mask, other=0.0).to(tl.float32)
    h3 = tl.load(h3_ptr + hid, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(h1)
    silu = h1 * sig
    a = silu * h3  # the expert's hidden, input of W2
    # d y_n / d w_j = a_j W2[e], so <dY_n, a_j W2[e]> = <dY_n W2[e]^T, a_j>: this tile's part of the sum over F.
    # Its column is the first of the MIN_BLOCK_N-wide column groups this tile covers (the rest stay zero).
    tl.store(dwp_ptr + j * DWP_COLS + pid_n * (BLOCK_N // MIN_BLOCK_N), tl.sum(acc * a, axis=1), mask=mask_m)
    w = tl.load(weights_ptr + j, mask=mask_m, other=0.0)[:, None]
    tl.store(aw_ptr + hid, _out(a * w, aw_ptr, ROUND), mask=mask)  # dW2[e] = (w a)_e^T dY_e
    ga = acc * w  # dL/da for the weighted expert output
    tl.store(gh3_ptr + hid, _out(ga * silu, gh3_ptr, ROUND), mask=mask)
    gh1 = ga * h3 * (sig + silu * (1.0 - sig))  # silu'(z) = sig(z) + silu(z) (1 - sig(z))
    tl.store(gh1_ptr + hid, _out(gh1, gh1_ptr, ROUND), mask=mask)


@triton.autotune(configs=_configs(XTY_CONFIGS), key=["MX", "NY", "X_GATHER", "Y_GATHER", "DUAL"], do_bench=_bench,
                 prune_configs_by=pruner(XTY_TILES))
@triton.jit(do_not_specialize=GENERIC)
def _group_xty_kernel(x_ptr, y1_ptr, y2_ptr, order_ptr, starts_ptr, ends_ptr, out1_ptr, out2_ptr,
                      MX, NY, E,
                      stride_xm, stride_xk, stride_1m, stride_1n, stride_2m, stride_2n,
                      stride_oe, stride_om, stride_on,
                      TOP_K, X_GATHER: tl.constexpr, Y_GATHER: tl.constexpr, DUAL: tl.constexpr,
                      UPCAST: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = X_e^T Y_e (and X_e^T Y2_e) over expert e's rows; X/Y rows gathered by token when *_GATHER."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(MX, BLOCK_M), tl.cdiv(NY, BLOCK_N)
    e = pid // (tiles_m * tiles_n)
    t = pid % (tiles_m * tiles_n)
    pid_m, pid_n = t // tiles_n, t % tiles_n
    lo = tl.load(starts_ptr + e)
    hi = tl.load(ends_ptr + e)
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # columns of X
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of Y
    mask_cm, mask_cn = cm < MX, cn < NY
    ks = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):  # deterministic: a fixed order over the expert's rows, no atomics
        rows = r0 + ks
        mask_r = rows < hi
        rows64 = rows.to(tl.int64)
        if X_GATHER or Y_GATHER:
            tok = tl.load(order_ptr + rows, mask=mask_r, other=0).to(tl.int64) // TOP_K
        xr = tok if X_GATHER else rows64
        yr = tok if Y_GATHER else rows64
        xt = tl.load(x_ptr + cm[:, None] * stride_xk + xr[None, :] * stride_xm,  # X_e^T tile [BLOCK_M, BLOCK_K]
                     mask=mask_cm[:, None] & mask_r[None, :], other=0.0)
        y1t = tl.load(y1_ptr + yr[:, None] * stride_1m + cn[None, :] * stride_1n,
                      mask=mask_r[:, None] & mask_cn[None, :], other=0.0)
        acc1 = _dot(xt, y1t, acc1, UPCAST, PRECISION)
        if DUAL:
            y2t = tl.load(y2_ptr + yr[:, None] * stride_2m + cn[None, :] * stride_2n,
                          mask=mask_r[:, None] & mask_cn[None, :], other=0.0)
            acc2 = _dot(xt, y2t, acc2, UPCAST, PRECISION)
    out = e.to(tl.int64) * stride_oe + cm[:, None] * stride_om + cn[None, :] * stride_on
    mask = mask_cm[:, None] & mask_cn[None, :]
    tl.store(out1_ptr + out, _out(acc1, out1_ptr, ROUND), mask=mask)  # zeros for an expert without rows
    if DUAL:
        tl.store(out2_ptr + out, _out(acc2, out2_ptr, ROUND), mask=mask)


@triton.jit(do_not_specialize=["N"])
def _sum_k_kernel(src_ptr, out_ptr, N, D, stride_sm, stride_om,
                  TOP_K: tl.constexpr, ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = sum_k src[n*K + k], k in order, in float32."""
    pid = tl.program_id(0)
    tiles_d = tl.cdiv(D, BLOCK_D)
    rows = (pid // tiles_d) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(src_ptr + (rows64 * TOP_K + k)[:, None] * stride_sm + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], _out(acc, out_ptr, ROUND), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers: the same signatures as the torch twins in scatter_experts.py (`TorchKernels`).


def _e_p2(E: int) -> int:
    """The kernels' vector of expert offsets: at least 128 long, so every model up to 128 experts shares a binary."""
    return max(triton.next_power_of_2(E), 128)


class TritonKernels:
    """The five primitives on Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"
    interpreted = INTERPRET

    @staticmethod
    def swiglu_up(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, order: torch.Tensor, starts: torch.Tensor,
                  ends: torch.Tensor, top_k: int, store_a: bool,
                  store_h: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, Din] (any strides), w1/w3 [E, Din, F] -> a, h1, h3 [S, F] in sorted order (a [0, F] unless
        store_a, h1/h3 [0, F] unless store_h); rows past ends[e] are not written."""
        S, (E, Din, F) = order.shape[0], w1.shape
        a = x.new_empty(S if store_a else 0, F)
        h1, h3 = (x.new_empty(S if store_h else 0, F) for _ in range(2))
        grid = lambda META: ((triton.cdiv(S, META["BLOCK_M"]) + E) * triton.cdiv(F, META["BLOCK_N"]),)  # noqa: E731
        _swiglu_up_kernel[grid](x, w1, w3, order, starts, ends, a, h1, h3, Din, F, E, *x.stride(), *w1.stride(),
                                *w3.stride(), TOP_K=top_k, STORE_A=store_a, STORE_H=store_h, E_P2=_e_p2(E),
                                UPCAST=UPCAST, ROUND=ROUND, PRECISION=dot_precision(x.dtype))
        return a, h1, h3

    @staticmethod
    def scatter_mm(ins: tuple[torch.Tensor, ...], ws: tuple[torch.Tensor, ...], order: torch.Tensor,
                   starts: torch.Tensor, ends: torch.Tensor, scale: torch.Tensor | None, rows_out: int,
                   zero: bool) -> torch.Tensor:
        """ins: 1 or 2 inputs [S, KD] in sorted order, ws: as many [E, KD, NO] (any strides) -> out [rows_out, NO]
        with out[order[r]] = sum_p ins[p][r] ws[p][e(r)] (* scale[order[r]]); unwritten rows zero when `zero`."""
        a1, wa = ins[0], ws[0]
        two = len(ins) == 2
        a2, wb = (ins[1], ws[1]) if two else (a1, wa)
        (E, KD, NO), S = wa.shape, order.shape[0]
        out = (torch.zeros if zero else torch.empty)(rows_out, NO, dtype=a1.dtype, device=a1.device)
        grid = lambda META: ((triton.cdiv(S, META["BLOCK_M"]) + E) * triton.cdiv(NO, META["BLOCK_N"]),)  # noqa: E731
        _scatter_mm_kernel[grid](a1, wa, a2, wb, scale if scale is not None else a1, order, starts, ends, out,
                                 KD, NO, E, *a1.stride(), *wa.stride(), *a2.stride(), *wb.stride(), out.stride(0),
                                 TWO=two, SCALE=scale is not None, E_P2=_e_p2(E), UPCAST=UPCAST, ROUND=ROUND,
                                 PRECISION=dot_precision(a1.dtype))
        return out

    @staticmethod
    def swiglu_down_bwd(dy: torch.Tensor, w2: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor,
                        weights: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                        top_k: int, zero: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """dy [N, Din] (any strides), w2 [E, F, Din], h1/h3 [S, F] sorted, weights [S] float32 by assignment ->
        gh1, gh3, w*a [S, F] sorted, dw [S] float32 by assignment (0 for rows not computed)."""
        (E, F, Din), S = w2.shape, order.shape[0]
        gh1, gh3, aw = (h1.new_empty(S, F) for _ in range(3))
        cols = triton.cdiv(F, MIN_BLOCK_N)
        dwp = torch.zeros(S, cols, dtype=torch.float32, device=dy.device)  # [S, F / MIN_BLOCK_N] partials
        grid = lambda META: ((triton.cdiv(S, META["BLOCK_M"]) + E) * triton.cdiv(F, META["BLOCK_N"]),)  # noqa: E731
        _swiglu_down_bwd_kernel[grid](dy, w2, h1, h3, weights, order, starts, ends, gh1, gh3, aw, dwp, Din, F, E,
                                      *dy.stride(), *w2.stride(), cols, TOP_K=top_k, E_P2=_e_p2(E),
                                      UPCAST=UPCAST, ROUND=ROUND, PRECISION=dot_precision(dy.dtype),
                                      MIN_BLOCK_N=MIN_BLOCK_N)
        return gh1, gh3, aw, dwp.sum(1)  # the partials of a row in a fixed order: deterministic

    @staticmethod
    def group_xty(x: torch.Tensor, ys: tuple[torch.Tensor, ...], order: torch.Tensor, starts: torch.Tensor,
                  ends: torch.Tensor, top_k: int, x_gather: bool, y_gather: bool,
                  num_experts: int) -> tuple[torch.Tensor, ...]:
        """Per expert e: X_e^T Y_e for each Y in ys (1 or 2, same shape) -> [E, MX, NY] each; X_e = x rows of
        expert e's sorted rows (x[order[r] // K] when x_gather, else x[r]), Y_e likewise."""
        E, MX, NY = num_experts, x.shape[1], ys[0].shape[1]
        dual = len(ys) == 2
        y2 = ys[1] if dual else ys[0]
        outs = [x.new_empty(E, MX, NY) for _ in ys]
        grid = lambda META: (E * triton.cdiv(MX, META["BLOCK_M"]) * triton.cdiv(NY, META["BLOCK_N"]),)  # noqa: E731
        _group_xty_kernel[grid](x, ys[0], y2, order, starts, ends, outs[0], outs[-1], MX, NY, E, *x.stride(),
                                *ys[0].stride(), *y2.stride(), *outs[0].stride(), TOP_K=top_k, X_GATHER=x_gather,
                                Y_GATHER=y_gather, DUAL=dual, UPCAST=UPCAST, ROUND=ROUND,
                                PRECISION=dot_precision(x.dtype))
        return tuple(outs)

    @staticmethod
    def sum_k(src: torch.Tensor, top_k: int) -> torch.Tensor:
        """src [N*K, D] -> [N, D]: each row n the float32 sum of rows n*K .. n*K + K-1, in src's dtype."""
        N, D = src.shape[0] // top_k, src.shape[1]
        out = src.new_empty(N, D)
        if N == 0:
            return out
        block_r, block_d = (16, 16) if INTERPRET else (16, 128)
        grid = (triton.cdiv(N, block_r) * triton.cdiv(D, block_d),)
        _sum_k_kernel[grid](src, out, N, D, src.stride(0), out.stride(0), TOP_K=top_k, ROUND=ROUND, BLOCK_R=block_r,
                            BLOCK_D=block_d)
        return out
