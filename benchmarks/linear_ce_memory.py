"""Peak memory of the LM-head cross-entropy, three ways, on CPU (torch's MemTracker; no timing):

    full        F.cross_entropy(F.linear(h, W).float(), t): the [N, V] logits and their gradient
    liger       mhmoe.layers.loss.linear_cross_entropy: chunked, gradients computed in the forward (shipped)
    recompute   chunked as well, saving only h, W and the rows' logsumexp; the backward recomputes each chunk's
                logits (one more N x V x D matmul per step)

Each variant runs forward + backward of the loss alone on the same h [N, D], W [V, D] (created before tracking,
so not counted) and reports the peak of live tensor memory above them, and its max deviation from `full`.

    PYTHONPATH=. python benchmarks/linear_ce_memory.py [--rows 4096] [--dim 384] [--vocab 50304] [--chunk auto]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from mhmoe.layers.loss import chunk_rows, linear_cross_entropy


def _fwd_chunk(hs, w, ts):  # noqa: ANN001, ANN202
    logits = (hs @ w.T).float()  # [C, V]
    picked = logits.gather(1, ts[:, None]).squeeze(1)
    top = logits.amax(-1, keepdim=True)  # the shipped function's in-place logsumexp
    lse = top.squeeze(1) + logits.sub_(top).exp_().sum(-1).log()
    return lse, (lse - picked).sum()


def _bwd_chunk(hs, w, ts, lse, scale, grad_hs, grad_w):  # noqa: ANN001, ANN202
    p = (hs @ w.T).float().sub_(lse[:, None]).exp_()  # [C, V] softmax, recomputed
    p.scatter_add_(1, ts[:, None], torch.full_like(p[:, :1], -1.0))
    p.mul_(scale)
    grad_hs.copy_(p @ w)
    grad_w.addmm_(p.T, hs)


class RecomputeLinearCE(torch.autograd.Function):
    """The alternative design: forward keeps (h, W, lse [N]); backward recomputes each chunk's logits. Chunks in
    helper calls as in the shipped function, so a chunk's buffers are freed before the next one's."""

    @staticmethod
    def forward(ctx, h, w, t, rows):  # noqa: ANN001, ANN205
        total = torch.zeros((), dtype=torch.float32)
        lses = []
        for s in range(0, h.shape[0], rows):
            lse, part = _fwd_chunk(h[s:s + rows], w, t[s:s + rows])
            lses.append(lse)
            total = total + part
        ctx.save_for_backward(h, w, t, torch.cat(lses))
        ctx.rows = rows
        return total / h.shape[0]

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        h, w, t, lse = ctx.saved_tensors
        rows, n = ctx.rows, h.shape[0]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32)
        for s in range(0, n, rows):
            _bwd_chunk(h[s:s + rows], w, t[s:s + rows], lse[s:s + rows], g / n, grad_h[s:s + rows], grad_w)
        return grad_h, grad_w, None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--chunk", default="auto", help="rows per chunk, or auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    N, D, V = args.rows, args.dim, args.vocab
    h = (torch.randn(N, D) * 0.5).requires_grad_(True)
    w = (torch.randn(V, D) * 0.02).requires_grad_(True)
    t = torch.randint(V, (N,))
    rows = chunk_rows(N, V, "auto" if args.chunk == "auto" else int(args.chunk))
    variants = {
        "full": lambda: F.cross_entropy(F.linear(h, w).float(), t),
        "liger": lambda: linear_cross_entropy(h, w, t, rows=rows),
        "recompute": lambda: RecomputeLinearCE.apply(h, w, t, rows),
    }
    out: dict[str, dict] = {"rows": N, "dim": D, "vocab": V, "chunk_rows": rows, "dtype": "float32",
                            "torch": torch.__version__}
    grads = {}
    for name, fn in variants.items():
        h.grad = w.grad = None
        tracker = MemTracker()
        with tracker:
            loss = fn()
            loss.backward()
        peak = max((s["Total"] for s in tracker.get_tracker_snapshot("peak").values()), default=0)
        grads[name] = (loss.detach(), h.grad.clone(), w.grad.clone())
        # The gradients (N x D + V x D float32) are outputs every variant must hold: reported with the peak.
        out[name] = {"peak_mb": round(peak / 2**20, 1)}
    ref = grads["full"]
    for name in ("liger", "recompute"):
        out[name]["max_abs_diff"] = {k: float((a - b).abs().max()) for k, a, b in
                                     zip(("loss", "grad_h", "grad_w"), grads[name], ref)}
    out["full_logits_fp32_mb"] = round(N * V * 4 / 2**20, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
