"""BitNet b1.58 quantisers: absmean ternary weights, absmax 8-bit activations, straight-through gradients, int8
matmul.

Shape legend: N rows, K input width, M output width.
"""

from __future__ import annotations

import torch

EPS = 1e-5  # floor of both scales (b1.58 reference code), so an all-zero matrix or row quantises to zeros
ACT_MAX = 127  # 8-bit symmetric activation levels [-127, 127]


# ----------------------------------------------------------------------------------------------------------
# Quantisers


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of q (bit for bit), the gradient of x.

    Same gradient as the usual x + (q - x).detach(), but that form rounds (x + (q - x) != q in floating point),
    which would let the fake-quant forward drift from the integer kernels by an ulp and flip roundings downstream.
    """
    if not x.requires_grad:
        return q
    return q.detach() + (x - x.detach())


def absmean_scale(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """gamma = max(mean|W|, eps) for each of `groups` equal blocks of W's leading dimension: [groups] float32."""
    return w.detach().float().reshape(groups, -1).abs().mean(dim=1).clamp(min=EPS)


def quantize_weight(w: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels W~ in {-1, 0, 1} as float32 with the straight-through gradient of W / gamma, gamma [groups])."""
    gamma = absmean_scale(w, groups)
    scaled = (w.float().reshape(groups, -1) / gamma[:, None]).reshape(w.shape)
    if not scaled.requires_grad:
        return scaled.round_().clamp_(-1, 1), gamma
    return _ste(scaled, scaled.detach().round().clamp(-1, 1)), gamma


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax 8 bits: (levels x~ in [-127, 127] as float32 with the gradient of x s, s = 127/max|x| [..., 1]).

    x must be float32 (callers quantise in float32 under autocast).
    """
    xd = x.detach()  # max|x| without materialising |x| (and amin + amax beat torch.aminmax 10x on CPU)
    s = ACT_MAX / torch.maximum(-xd.amin(dim=-1, keepdim=True), xd.amax(dim=-1, keepdim=True)).clamp(min=EPS)
    scaled = x * s
    if not scaled.requires_grad:  # inference: in place, same values
        return scaled.round_().clamp_(-ACT_MAX, ACT_MAX), s
    return _ste(scaled, scaled.detach().round().clamp(-ACT_MAX, ACT_MAX)), s


def dequant(acc: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """acc = x~ @ W~ ([..., M], integer-valued float32 or int32) -> float32 acc * gamma / s.

    One formula for both paths, so they round identically (an int32 acc is promoted to float32 element by element,
    the same as acc.float()). w_scale is a scalar or [1] gamma, or [groups] for `groups` equal column blocks.
    """
    if groups == 1:
        return acc * (w_scale / x_scale)
    y = acc.unflatten(-1, (groups, -1)) * (w_scale[:, None] / x_scale[..., None])  # [..., groups, M/groups]
    return y.flatten(-2)


def quant_dtypes(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, output dtype): autocast's dtype when it is on (levels up to 127 are exact in bf16 and fp16 and
    the sums accumulate in float32; only the output rounds), else float32 for the matmul, where the integer sums are
    exact up to 2^24 (K < 132,104 inputs), and the input's dtype for the output."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return dt, dt
    return torch.float32, x.dtype


def int8_matmul(a: torch.Tensor, b: torch.Tensor, b_max: int = ACT_MAX) -> torch.Tensor:
    """a int8 [N, K] @ b int8 [K, M] -> int32 [N, M], exactly; |b| <= b_max (1 for ternary weights).

    torch._int_mm on CPU (torch 2.13) takes any shape, strides and N = 0 (measured, see tests/test_bitnet.py);
    on CUDA it needs N > 16 and K, M multiples of 8. Where it refuses, the same integers come from a float
    matmul: every partial sum is an integer of magnitude <= 127 * b_max * K, exact in float32 below 2^24 (and in
    float64 beyond). That is also faster than an int32 matmul on CPU and works on CUDA, which has none.
    """
    N, K = a.shape
    M = b.shape[1]
    if a.device.type == "cpu" or (N > 16 and K % 8 == 0 and M % 8 == 0):
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            pass
    if ACT_MAX * b_max * K < 2**24:
        return (a.float() @ b.float()).to(torch.int32)
    return (a.double() @ b.double()).to(torch.int32)
