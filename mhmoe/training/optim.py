"""AdamW with warmup + cosine/linear decay of the learning rate, and the weight-decay schedule.
"""

from __future__ import annotations

import math

import torch

from mhmoe.training.config import OptimConfig, TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    mid = cfg.steps // 2
    if o.schedule == "two_stage" and step >= mid:  # stage 2: a lower peak, cosine down to min_lr
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - mid) / max(1, cfg.steps - mid))))
        return o.lr * (o.min_lr_ratio + (o.stage2_lr_ratio - o.min_lr_ratio) * decay)
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule != "linear" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * decay)


def weight_decay_at(step: int, cfg: TrainConfig) -> float:
    """Weight decay of the decayed parameter group at `step`: optim.weight_decay, 0 from wd_off_at * steps on."""
    o = cfg.optim
    return 0.0 if o.wd_off_at > 0 and step >= o.wd_off_at * cfg.steps else o.weight_decay


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and embeddings (and the tied LM head)."""
    decay, no_decay = [], []
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embed_ids or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)
