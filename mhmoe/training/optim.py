"""AdamW with warmup + cosine/linear decay of the learning rate, and the weight-decay schedule.

The AdamW implementation follows the parameters (`adamw_implementation`): torch's fused kernel when every
parameter is a plain CUDA tensor (one kernel per step instead of foreach's several per parameter group), foreach
on CPU (the numbers of earlier CPU runs, which resume bit for bit) and a per-parameter loop where any parameter is
a tensor subclass (FSDP2's DTensors, alone or beside expert-parallel shards), which neither fused nor foreach
kernels take.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Literal

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


AdamWImplementation = Literal["fused", "foreach", "for-loop"]


def choose_adamw(device_types: Collection[str], plain: bool) -> AdamWImplementation:
    """The AdamW implementation for parameters on `device_types` ("cuda", "cpu", ...); plain: none of them is a
    tensor subclass (DTensor). fused on CUDA alone, foreach on anything else plain, for-loop otherwise."""
    if not plain:
        return "for-loop"
    return "fused" if set(device_types) == {"cuda"} else "foreach"


def adamw_implementation(params: Iterable[torch.Tensor]) -> AdamWImplementation:
    """`choose_adamw` for these parameters."""
    params = list(params)
    plain = all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params)
    return choose_adamw({p.device.type for p in params}, plain)


def set_adamw_implementation(optimizer: torch.optim.Optimizer, impl: AdamWImplementation) -> None:
    """Switch `optimizer` to `impl`, its state included: loading a state dict takes the saved groups' flags (a
    checkpoint written before fused AdamW, or by a sharded run), and the fused kernel wants each parameter's step
    count as a float32 tensor on the parameter's device, foreach a CPU one. The loop over tensor subclasses (a
    sharded run's DTensors) keeps its state as distributed checkpointing loaded it."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = impl == "fused", impl == "foreach"
        if impl == "for-loop":
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if type(step) is torch.Tensor:
                optimizer.state[p]["step"] = step.to(device=p.device if impl == "fused" else "cpu",
                                                     dtype=torch.float32)


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set the learning rate (and, under wd_off_at, the decayed group's weight decay) of optimizer step `step`
    (0-based); returns the learning rate. The one place `mhmoe train` and `mhmoe bench train` take them from."""
    lr = lr_at(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    if cfg.optim.wd_off_at > 0:  # group 0 is the decayed one (build_optimizer)
        optimizer.param_groups[0]["weight_decay"] = weight_decay_at(step, cfg)
    return lr


def step_optimizer(optimizer: torch.optim.Optimizer, compile_mode: str) -> None:
    """The update and the gradients' reset; under CUDA graphs ("cudagraphs") the gradients are zeroed in place,
    not freed, so that they keep accumulating in the same tensors (mhmoe.training.compile)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=compile_mode != "cudagraphs")


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW (`adamw_implementation` of the model's parameters); no weight decay on norms, biases and embeddings
    (and the tied LM head)."""
    decay, no_decay = [], []
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embed_ids or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = adamw_implementation(decay + no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=impl == "foreach",
                             fused=impl == "fused")
