"""Linear cross-entropy: the LM head and the token cross-entropy fused over row chunks, never the [N, V] logits.

    loss = mean over the non-ignored rows n of  logsumexp_v(h_n . W_v) - h_n . W_{t_n}

`F.cross_entropy(lm_head(h).float(), t)` materialises the logits of every row at once: at the `gpu` preset
(N = 64 x 1024 rows, V = 50,304) that is 6.6 GB in bfloat16 plus 13 GB in float32, and as much again for their
gradient. The idea of Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024, arXiv 2410.10989) and of Cut
Cross-Entropy (Wijmans et al., 2024, arXiv 2411.09009) is to never hold them: here, `forward_chunks` takes
the rows in chunks of C, computes each chunk's logits [C, V] in the compute dtype (bfloat16 under autocast, as
the LM head's matmul would be), its logsumexp and softmax in float32, and, in training, the chunk's gradients
straight away, Liger-style: dL/dh for the chunk's rows and its share of dL/dW (summed over the chunks in float32).
The forward saves those two gradients, [N, D] and [V, D], and the backward only scales them by dL/dloss. Peak
extra memory is one chunk's logits (C x V float32, plus C x V in the compute dtype where the matmul cannot write
float32) instead of N x V of each.

Why Liger-style (gradients in the forward) rather than recomputing each chunk's logits in the backward: the same
peak memory, measured, and 3 instead of 4 N x V x D matmuls per step, because no chunk's logits are computed
twice. `benchmarks/linear_ce_memory.py` (CPU, float32, N=4096, D=384, V=50,304, chunks of 1,024 rows; MemTracker
peak of the loss's forward + backward above its inputs, W's gradient included): full logits 2,432 MB, Liger-style
357.5 MB, recompute 357.4 MB; both equal the full loss and gradients to 1e-9. The constraint of Liger-style: a
forward with gradients enabled does the backward's matmuls at once, so it is meant to be followed by a backward
(training); under no_grad (evaluation) it computes the loss alone.

Why not the libraries: Liger-Kernel's op and Cut Cross-Entropy's fused path are Triton kernels for CUDA; neither
runs on CPU, where this project's runs and tests happen, and neither is a dependency of the GPU machines (which
have no network). This is plain torch, the same code on CPU and CUDA.

Under torch.compile: the chunk loop is one torch.library custom op (`mhmoe::linear_cross_entropy`), opaque to the
graph. Traced as plain ops, the loop unrolled into the graph once per chunk (49 times per micro-batch graph at the
`gpu` preset's vocabulary) for inductor to compile copy by copy, one reason the GPU check's compiled benchmark ran
out of time (issue 27); unmeasured how much of it. The op keeps the graph whole (fullgraph, no graph break, tests/unit/test_loss.py) and its size independent of N and V;
its chunks run as the eager code runs them. Eagerly the same body runs through an autograd.Function instead, so
that dispatch modes (MemTracker's memory peaks on CPU) see its ops one by one, not the op as one node.

Passes over a chunk's [C, V] float32 buffer in training (the elementwise work is memory-bound: at the gpu preset
each pass moves 270 MB per chunk): the max, exp(logit - max) in place (2: sub_, exp_), the sum, one in-place
scale by (row weight / sum) that turns exp into the weighted softmax, and the cast of dL/dlogits to the compute
dtype (16-bit only): 5 in float32, 6 in 16-bit on CUDA, where a first version made 8 (a float copy of the 16-bit
logits, and a divide and a multiply where one multiply does). Liger-Kernel's fused kernel gets to about 2 by
fusing them in Triton; plain torch cannot fuse across ops. On CUDA in 16-bit (`float32_out_matmuls`) the logits
come out of the matmul in float32 (`torch.mm(..., out_dtype=float32)`: no 16-bit logits, no cast pass), and each
chunk's share of dL/dW is accumulated by cuBLAS into the float32 buffer (`addmm(..., out_dtype=float32)` in place:
no [V, D] product in 16-bit and no float copy of it, and the partial product is not rounded to 16 bits before
the sum). Where torch has no such kernels (CPU in torch 2.13) the 16-bit logits are cast (a 7th pass) and the
partial products of dL/dW rounded to 16 bits and added, as before; the float32 alternative there, a float32
matmul of the 16-bit pieces, would need a float32 copy of each chunk's [C, V] gradient: a pass more per chunk to
save a [V, D] one.

Tied embeddings need nothing special: W is the embedding matrix, and its two gradients (the embedding's and this
one) add up in autograd as for any shared parameter.

Shape legend: N rows (tokens), D model dim, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from torch import Tensor

from mhmoe.layers.sorted_experts import compute_dtype

# Chunk size of "auto": C x V ~ 2^26 elements, i.e. 256 MB of float32 logits per chunk whatever the vocabulary
# (V = 50,304: 1,344 rows, 49 chunks of a 65,536-row micro-batch), rounded to a multiple of 64 rows.
CHUNK_ELEMENTS = 2**26
Reduction = Literal["mean", "sum"]


def chunk_rows(n_rows: int, vocab: int, rows: int | Literal["auto"] = "auto") -> int:
    """Rows per chunk: `rows` as given, or for "auto" about CHUNK_ELEMENTS / vocab, evened out over the chunks
    (so the last chunk is not a sliver) and rounded up to a multiple of 64; never more than n_rows."""
    if rows != "auto":
        if rows < 1:
            raise ValueError(f"chunk_rows: must be >= 1 or 'auto', got {rows}")
        return min(rows, max(1, n_rows))
    target = max(1, CHUNK_ELEMENTS // vocab)
    n_chunks = max(1, math.ceil(n_rows / target))
    return max(1, min(n_rows, 64 * math.ceil(math.ceil(n_rows / n_chunks) / 64)))


def forward_chunks(h: Tensor, w: Tensor, targets: Tensor, ignore_index: int, rows: int, dtype: torch.dtype,
                   reduction: Reduction, grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The loss over chunks of `rows` rows and, with `grads`, its gradients: (loss 0-d float32, dL/dh [N, D] in
    `dtype`, dL/dW [V, D] float32); without `grads` both gradients are [0, D]. h [N, D], w [V, D], targets [N];
    matmuls in `dtype`, softmax statistics in float32 (module docstring)."""
    N, D = h.shape
    # Autocast off: the dtypes are chosen here, matmuls in `dtype`, softmax statistics in float32.
    with torch.autocast(h.device.type, enabled=False):
        hc, wc = h.to(dtype), w.to(dtype)  # [N, D], [V, D]
        valid = targets != ignore_index  # [N]
        safe = targets.masked_fill(~valid, 0)  # [N] ignored rows gather column 0, then weigh 0
        count = valid.sum()  # 0-d long, on the device: no host sync
        # The per-row weight of the reduction: 1 / (non-ignored rows) as F.cross_entropy's mean (NaN when every
        # row is ignored, as there), 1 for a sum; ignored rows 0.
        scale = 1.0 / count.float() if reduction == "mean" else torch.ones((), device=h.device)
        row_w = valid.float() * scale  # [N]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = hc.new_empty(N if grads else 0, D)  # [N, D] in the compute dtype
        grad_w = torch.zeros(w.shape if grads else (0, D), dtype=torch.float32, device=w.device)  # [V, D]
        for s in range(0, N, rows):
            # One chunk per call: its [C, V] buffers are freed on return, before the next chunk's matmul.
            total = total + _chunk(hc[s:s + rows], wc, safe[s:s + rows], row_w[s:s + rows], dtype,
                                   grad_h[s:s + rows] if grads else None, grad_w if grads else None)
    return total, grad_h, grad_w


def _chunk(hs: Tensor, wc: Tensor, ts: Tensor, ws: Tensor, dtype: torch.dtype, grad_hs: Tensor | None,
           grad_w: Tensor | None) -> Tensor:
    """One chunk of rows: hs [C, D], wc [V, D], ts [C] targets, ws [C] row weights -> the chunk's weighted loss
    sum (0-d float32). With grad_hs [C, D] (a view into dL/dh) and grad_w [V, D] float32, writes the chunk's dL/dh
    rows and adds its share of dL/dW."""
    logits = _logits_float32(hs, wc)  # [C, V]: matmul in the compute dtype, statistics in float32
    picked = logits.gather(1, ts[:, None]).squeeze(1)  # [C] the targets' logits
    # logsumexp by hand, in place: torch.logsumexp would hold a second [C, V] float32 buffer.
    top = logits.amax(dim=-1, keepdim=True)  # [C, 1]
    e = logits.sub_(top).exp_()  # [C, V] exp(logit - max), in the logits' buffer
    z = e.sum(dim=-1)  # [C]
    loss = ((top.squeeze(1) + z.log() - picked) * ws).sum()  # sum of weighted (logsumexp - target logit)
    if grad_hs is None:
        return loss
    # dL/dlogits = (softmax - onehot(target)) * row weight = e * (weight / sum) - weight * onehot: one in-place
    # pass over [C, V], then the targets' column, in the same buffer.
    g = e.mul_((ws / z)[:, None])  # [C, V]
    g.scatter_add_(1, ts[:, None], -ws[:, None])
    g = g.to(dtype)  # [C, V] in the compute dtype, as autograd's would be (no copy in float32)
    torch.mm(g, wc, out=grad_hs)  # [C, D], straight into dL/dh's rows
    _add_product_float32(grad_w, g.T, hs)  # [V, D] += [V, C] @ [C, D]
    return loss


@functools.lru_cache(maxsize=None)
def float32_out_matmuls(device: torch.device) -> bool:
    """Whether torch has the 16-bit x 16-bit -> float32 matmuls on `device` (mm and in-place addmm with
    out_dtype=float32: CUDA's cuBLAS in recent torch; not CPU in 2.13; older CUDA builds refuse a float32 `self`
    in addmm), checked once per device on tiny products laid out as `_chunk` calls them (a transposed second
    operand for the logits, a transposed first one for dL/dW), against float32 arithmetic, the in-place
    accumulation included. Any refusal means the cast path."""
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=device).to(torch.bfloat16)  # [2, 3], exact in bf16
    acc = torch.full((3, 3), 0.5, device=device)
    try:
        prod = torch.mm(a, a.T, out_dtype=torch.float32)  # [2, 2]: hs @ wc.T
        torch.addmm(acc, a.T, a, out_dtype=torch.float32, out=acc)  # [3, 3]: grad_w += g.T @ hs
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    af = a.float()
    return (prod.dtype == acc.dtype == torch.float32 and torch.equal(prod, af @ af.T)
            and torch.equal(acc, af.T @ af + 0.5))


def _logits_float32(hs: Tensor, wc: Tensor) -> Tensor:
    """hs [C, D] @ wc.T -> [C, V] float32: straight out of the matmul where the device has it, else cast."""
    if hs.dtype != torch.float32 and float32_out_matmuls(hs.device):
        return torch.mm(hs, wc.T, out_dtype=torch.float32)
    return (hs @ wc.T).float()


def _add_product_float32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc [M, N] float32 += a [M, K] @ b [K, N], a and b in the compute dtype, without an [M, N] temporary where
    the device has the float32-output matmul (and always in float32)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif float32_out_matmuls(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # a 16-bit product per chunk (float32 accumulation inside the matmul), summed over chunks in float32
        acc += (a @ b).float()


# ----------------------------------------------------------------------------------------------------------
# The custom op: one node under torch.compile (module docstring), differentiable through register_autograd.


@torch.library.custom_op("mhmoe::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(h: Tensor, w: Tensor, targets: Tensor, ignore_index: int, rows: int, dtype: torch.dtype,
                            reduction: str, grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`forward_chunks` as an op: (loss, dL/dh, dL/dW); the gradients are for the backward, not results."""
    return forward_chunks(h, w, targets, ignore_index, rows, dtype, reduction, grads)


@linear_cross_entropy_op.register_fake
def _(h, w, targets, ignore_index, rows, dtype, reduction, grads):  # noqa: ANN001, ANN202
    D = h.shape[1]
    return (h.new_empty((), dtype=torch.float32), h.new_empty(h.shape[0] if grads else 0, D, dtype=dtype),
            w.new_empty(w.shape[0] if grads else 0, D, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    h, w = inputs[0], inputs[1]
    _, grad_h, grad_w = output
    # Saved state, not results: no gradient flows into them, and autograd must not build zero [N, D] and [V, D]
    # gradients for them in every backward.
    ctx.mark_non_differentiable(grad_h, grad_w)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_h, grad_w)
    ctx.in_dtypes = (h.dtype, w.dtype)


def _gradients(ctx, grad_loss: Tensor | None) -> tuple[Tensor | None, Tensor | None]:  # noqa: ANN001
    """dL/dh and dL/dW: the gradients the forward saved, scaled by dL/dloss, in the inputs' dtypes."""
    # Grad mode is on in a backward exactly when create_graph=True: the saved gradients have no graph of their own.
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("linear_cross_entropy: its backward is first-order only (gradients computed in the "
                           "forward); for a double backward compute lm_head logits and F.cross_entropy instead")
    if grad_loss is None:
        return None, None
    grad_h, grad_w = ctx.saved_tensors
    h_dtype, w_dtype = ctx.in_dtypes
    return (grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype)


def _backward(ctx, grad_loss, _gh, _gw):  # noqa: ANN001, ANN202
    return *_gradients(ctx, grad_loss), None, None, None, None, None, None


torch.library.register_autograd("mhmoe::linear_cross_entropy", _backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The op's eager twin: the same body and backward, but visible op by op to dispatch modes (torch's MemTracker,
    which `mhmoe bench` and benchmarks/linear_ce_memory.py measure CPU memory with, sees a custom op's outputs and
    none of the [C, V] buffers inside it)."""

    @staticmethod
    def forward(ctx, h, w, targets, ignore_index, rows, dtype, reduction, grads):  # noqa: ANN001, ANN205
        loss, grad_h, grad_w = forward_chunks(h, w, targets, ignore_index, rows, dtype, reduction, grads)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.in_dtypes = (h.dtype, w.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        return *_gradients(ctx, grad_loss), None, None, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         rows: int | Literal["auto"] = "auto", reduction: Reduction = "mean") -> Tensor:
    """F.cross_entropy(F.linear(h, weight).float(), targets) without materialising the [N, V] logits.

    h: [N, D] (or [..., D] with targets [...]), weight: [V, D] (the LM head's, tied or not), targets long, rows
    equal to ignore_index left out (as F.cross_entropy). Matmuls in the autocast dtype when autocast is on for h's
    device, else in h's dtype; logsumexp and softmax in float32; returns a 0-d float32 tensor. rows: rows per
    chunk ("auto": `chunk_rows`). reduction: "mean" over the non-ignored rows, or "sum". The gradients are computed
    in the forward when grad mode is on and h or weight requires grad, so such a call is meant to be followed by a
    backward (training); under no_grad (evaluation) it computes the loss alone. Under torch.compile the custom op
    `mhmoe::linear_cross_entropy` (one node), eagerly its twin `_Eager`: the same code either way.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    h2 = h.reshape(-1, h.shape[-1])  # [N, D]
    t = targets.reshape(-1)  # [N]
    if t.shape[0] != h2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} rows of h but {t.shape[0]} targets")
    grads = torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad)
    n = chunk_rows(h2.shape[0], weight.shape[0], rows)
    if torch.compiler.is_compiling():
        loss, _, _ = torch.ops.mhmoe.linear_cross_entropy(h2, weight, t, ignore_index, n, compute_dtype(h2),
                                                          reduction, grads)
        return loss
    return _Eager.apply(h2, weight, t, ignore_index, n, compute_dtype(h2), reduction, grads)
