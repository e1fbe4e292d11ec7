"""Routing health of one MoE layer call, as pure tensor functions: device tensors in, device tensors out, no host
sync (MoELayer.forward puts them in MoEAux; the training loop averages them over a step in one conversion).

    load_cv            std / mean of the per-expert load (population std over the E experts); 0 = balanced
    load_max_mean      max / mean of the per-expert load; 1 = balanced, E/K = one expert takes every token
    expert_activation  fraction of the E experts that receive at least one (sub-)token of a sequence, averaged
                       over the sequences of the batch: the "expert activation" of MH-MoE v1 (Wu et al., arXiv
                       2404.15045, Fig. 1: SMoE 8.33% vs MH-MoE 90.71%), a per-sequence count as we read it
    subtoken_distinct  MH-MoE: fraction of tokens whose h sub-tokens' top-1 experts (each sub-token's first
                       choice, the highest selection score) are pairwise distinct; NaN for h = 1
Dead experts need a window across steps and are tracked by the training side (mhmoe.training.routing_health).

Shape legend: N = B*T*h (sub-)tokens, B sequences, T time, h heads, E experts, K top-k.
"""

from __future__ import annotations

import torch


def _as_float(load: torch.Tensor) -> torch.Tensor:
    return load if load.is_floating_point() else load.float()


def load_cv(load: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation std/mean of load [E] (population std, correction 0); 0-d, NaN for no load."""
    x = _as_float(load)
    return x.std(correction=0) / x.mean()


def load_max_mean(load: torch.Tensor) -> torch.Tensor:
    """max/mean of load [E]; 0-d."""
    x = _as_float(load)
    return x.max() / x.mean()


def expert_activation(indices: torch.Tensor, sequences: int, num_experts: int) -> torch.Tensor:
    """Mean over the `sequences` sequences of the fraction of experts hit by at least one of its assignments.

    indices: [N, K] with the sub-tokens of sequence b in rows b*N/B .. (b+1)*N/B - 1 (MoELayer's layout: tokens
    in [B, T] order, the h sub-tokens of a token adjacent). Returns a 0-d float32 tensor; NaN for an empty batch.
    """
    n = indices.shape[0]
    if n == 0:
        return torch.full((), float("nan"), device=indices.device)
    if sequences < 1 or n % sequences:
        raise ValueError(f"expert_activation: {n} rows do not split into {sequences} sequences")
    seq = torch.arange(n, device=indices.device) // (n // sequences)  # [N] sequence of each row
    cell = (seq.unsqueeze(1) * num_experts + indices).reshape(-1)  # [N*K] (sequence, expert) pair ids
    # A scatter, not torch.bincount, which sizes its output from the data and so syncs with the host on CUDA.
    counts = torch.zeros(sequences * num_experts, dtype=torch.long, device=cell.device)
    hits = counts.scatter_add_(0, cell, torch.ones_like(cell)).view(sequences, num_experts) > 0  # [B, E]
    return hits.float().mean(dim=1).mean()


def subtoken_distinct(indices: torch.Tensor, heads: int) -> torch.Tensor:
    """Fraction of tokens whose `heads` sub-tokens have pairwise distinct top-1 experts; NaN when heads == 1.

    indices: [N, K], rows grouped by token (h adjacent rows per token), column 0 = each sub-token's first choice.
    """
    if heads == 1:
        return torch.full((), float("nan"), device=indices.device)
    top1 = indices[:, 0].reshape(-1, heads).sort(dim=1).values  # [N/h, h] sorted first choices per token
    return (top1[:, 1:] != top1[:, :-1]).all(dim=1).float().mean()  # sorted: distinct iff neighbours differ
