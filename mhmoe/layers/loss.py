"""Linear cross-entropy: the LM head and the token cross-entropy fused over row chunks, never the [N, V] logits.

    loss = mean over the non-ignored rows n of  logsumexp_v(h_n . W_v) - h_n . W_{t_n}

`F.cross_entropy(lm_head(h).float(), t)` materialises the logits of every row at once: at the `gpu` preset
(N = 64 x 1024 rows, V = 50,304) that is 6.6 GB in bfloat16 plus 13 GB in float32, and as much again for their
gradient. The idea of Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024, arXiv 2410.10989) and of Cut
Cross-Entropy (Wijmans et al., 2024, arXiv 2411.09009) is to never hold them: here, `LinearCrossEntropyFn` takes
the rows in chunks of C, computes each chunk's logits [C, V] in the compute dtype (bfloat16 under autocast, as
the LM head's matmul would be), its logsumexp and softmax in float32, and, in training, the chunk's gradients
straight away, Liger-style: dL/dh for the chunk's rows and its share of dL/dW (summed over the chunks in float32).
The forward saves those two gradients, [N, D] and [V, D], and the backward only scales them by dL/dloss. Peak
extra memory is one chunk's logits (C x V in the compute dtype plus C x V float32) instead of N x V of each.

Why Liger-style (gradients in the forward) rather than recomputing each chunk's logits in the backward: the same
peak memory, measured, and 3 instead of 4 N x V x D matmuls per step, because no chunk's logits are computed
twice. `benchmarks/linear_ce_memory.py` (CPU, float32, N=4096, D=384, V=50,304, chunks of 1,024 rows; MemTracker
peak of the loss's forward + backward above its inputs, W's gradient included): full logits 2,432 MB, Liger-style
357.5 MB, recompute 357.4 MB; both equal the full loss and gradients to 1e-9. The constraint of Liger-style: a
forward with gradients enabled does the backward's matmuls at once, so it is meant to be followed by a backward
(training); under no_grad (evaluation) it computes the loss alone.

Why not the libraries: Liger-Kernel's op and Cut Cross-Entropy's fused path are Triton kernels for CUDA; neither
runs on CPU, where this project's runs and tests happen, and neither is a dependency of the GPU machines (which
have no network). This is plain torch: the same code runs eagerly on CPU and torch.compile traces it whole (no
graph break, tests/unit/test_loss.py), leaving the fusion of each chunk's elementwise work to inductor.

Tied embeddings need nothing special: W is the embedding matrix, and its two gradients (the embedding's and this
one) add up in autograd as for any shared parameter.

Shape legend: N rows (tokens), D model dim, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

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


class LinearCrossEntropyFn(torch.autograd.Function):
    """(h [N, D], W [V, D], targets [N] long) -> 0-d float32 loss; see the module docstring.

    forward(h, w, targets, ignore_index, rows, dtype, reduction, grads): `dtype` is the matmuls' dtype, `grads`
    whether to compute the gradients in the forward (the caller decides: grad mode on and an input that needs one).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,  # noqa: ANN001
                rows: int, dtype: torch.dtype, reduction: Reduction, grads: bool) -> torch.Tensor:
        N, V = h.shape[0], w.shape[0]
        # Autocast off: the dtypes are chosen here, matmuls in `dtype`, softmax statistics in float32.
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), w.to(dtype)  # [N, D], [V, D]
            valid = targets != ignore_index  # [N]
            safe = targets.masked_fill(~valid, 0)  # [N] ignored rows gather column 0, then weigh 0
            count = valid.sum()  # 0-d long, on the device: no host sync
            # The per-row weight of the reduction: 1 / (non-ignored rows) as F.cross_entropy's mean (NaN when
            # every row is ignored, as there), 1 for a sum; ignored rows 0.
            scale = 1.0 / count.float() if reduction == "mean" else torch.ones((), device=h.device)
            row_w = valid.float() * scale  # [N]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hc) if grads else None  # [N, D] in the compute dtype
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grads else None  # [V, D]
            for s in range(0, N, rows):
                # One chunk per call: its [C, V] buffers are freed on return, before the next chunk's matmul.
                total = total + _chunk(hc[s:s + rows], wc, safe[s:s + rows], row_w[s:s + rows], dtype,
                                       grad_h[s:s + rows] if grads else None, grad_w)
        if grads:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.in_dtypes = (h.dtype, w.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients have no graph of their own
            raise RuntimeError("linear_cross_entropy: its backward is first-order only (gradients computed in the "
                               "forward); for a double backward compute lm_head logits and F.cross_entropy instead")
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.in_dtypes
        return ((grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype),
                None, None, None, None, None, None)


def _chunk(hs: torch.Tensor, wc: torch.Tensor, ts: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype,
           grad_hs: torch.Tensor | None, grad_w: torch.Tensor | None) -> torch.Tensor:
    """One chunk of rows: hs [C, D], wc [V, D], ts [C] targets, ws [C] row weights -> the chunk's weighted loss
    sum (0-d float32). With grad_hs [C, D] (a view into dL/dh) and grad_w [V, D] float32, writes the chunk's dL/dh
    rows and adds its share of dL/dW."""
    logits = (hs @ wc.T).float()  # [C, V]: matmul in the compute dtype, statistics in float32
    picked = logits.gather(1, ts[:, None]).squeeze(1)  # [C] the targets' logits
    # logsumexp by hand, in place: torch.logsumexp would hold a second [C, V] float32 buffer.
    top = logits.amax(dim=-1, keepdim=True)  # [C, 1]
    e = logits.sub_(top).exp_()  # [C, V] exp(logit - max), in the logits' buffer
    z = e.sum(dim=-1)  # [C]
    loss = ((top.squeeze(1) + z.log() - picked) * ws).sum()  # sum of weighted (logsumexp - target logit)
    if grad_hs is None:
        return loss
    # dL/dlogits = (softmax - onehot(target)) * row weight, built in place in the same buffer.
    probs = e.div_(z[:, None])  # [C, V]
    probs.scatter_add_(1, ts[:, None], torch.full_like(z[:, None], -1.0))
    g = probs.mul_(ws[:, None]).to(dtype)  # [C, V] in the compute dtype, as autograd's would be
    grad_hs.copy_(g @ wc)  # [C, D]
    if dtype == torch.float32:
        grad_w.addmm_(g.T, hs)  # [V, D]
    else:  # a 16-bit product per chunk (float32 accumulation inside the matmul), summed over chunks in float32
        grad_w += (g.T @ hs).float()
    return loss


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         rows: int | Literal["auto"] = "auto", reduction: Reduction = "mean") -> torch.Tensor:
    """F.cross_entropy(F.linear(h, weight).float(), targets) without materialising the [N, V] logits.

    h: [N, D] (or [..., D] with targets [...]), weight: [V, D] (the LM head's, tied or not), targets long, rows
    equal to ignore_index left out (as F.cross_entropy). Matmuls in the autocast dtype when autocast is on for h's
    device, else in h's dtype; logsumexp and softmax in float32; returns a 0-d float32 tensor. rows: rows per
    chunk ("auto": `chunk_rows`). reduction: "mean" over the non-ignored rows, or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    h2 = h.reshape(-1, h.shape[-1])  # [N, D]
    t = targets.reshape(-1)  # [N]
    if t.shape[0] != h2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} rows of h but {t.shape[0]} targets")
    grads = torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad)
    n = chunk_rows(h2.shape[0], weight.shape[0], rows)
    return LinearCrossEntropyFn.apply(h2, weight, t, ignore_index, n, compute_dtype(h2), reduction, grads)
