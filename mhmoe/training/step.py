"""One optimizer step: forward/backward of its micro-batches, gradient synchronisation and clipping, and the
step's metrics.

The metrics stay on the device while the step runs (sums of float64 tensors) and reach the host once, at the
end: one all-reduce over the ranks, one transfer that also carries the RoutingMonitor's record (expert loads and
per-layer routing health, reduced by the monitor). The loss-side per-MoE-layer metrics come from
`moe_layer_metrics`, the one place that reads them from the layers' MoEAux; add a metric there and give it a
reduction in LAYER_METRICS, and it appears in metrics.jsonl.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.data.sampler import TrainSampler
from mhmoe.distributed.parallel import Parallel, clip_grad_norm, sync_expert_grads
from mhmoe.layers.config import MoEAux
from mhmoe.model import ModelOutput
from mhmoe.profiling import MODEL, OPTIMIZER, label
from mhmoe.training.compile import CompileMode
from mhmoe.training.routing_health import RoutingMonitor

# How a per-layer metric of one micro-batch becomes its metrics.jsonl value:
#   mean       one float: averaged over the MoE layers, the micro-batches and the ranks
#   layer_mean one value per layer: averaged over the micro-batches and the ranks
#   layer_sum  one value per layer: summed over the micro-batches and the ranks (counts)
Reduction = Literal["mean", "layer_mean", "layer_sum"]
LAYER_METRICS: dict[str, Reduction] = {
    "lb": "mean",
    "z": "mean",
    "router_entropy": "mean",
    "dropped": "mean",
}  # the loads and the per-layer routing health come from the step's RoutingMonitor


def moe_layer_metrics(aux: list[MoEAux]) -> dict[str, torch.Tensor]:
    """The per-layer metrics of one forward as device tensors with one row per MoE layer ([n_moe] or
    [n_moe, E]); keys are those of LAYER_METRICS. Empty for a model without MoE layers."""
    if not aux:
        return {}
    return {
        "lb": torch.stack([a.lb_loss.detach() for a in aux]),
        "z": torch.stack([a.z_loss.detach() for a in aux]),
        "router_entropy": torch.stack([a.router_entropy.detach() for a in aux]),
        "dropped": torch.stack([a.dropped_fraction.detach() for a in aux]),
    }


class StepStats:
    """The sums of one optimizer step over its `accum` micro-batches, on the device.

    The arithmetic is that of a Python float sum of `.item()` values (float64, micro-batch by micro-batch and
    layer by layer), so a run's logged values do not depend on where they were summed.
    """

    def __init__(self, accum: int, device: torch.device) -> None:
        self.accum = accum
        self.losses = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, aux
        self.layers: dict[str, torch.Tensor] = {}

    def add(self, out: ModelOutput) -> None:
        """Fold in one micro-batch's output."""
        self.losses += torch.stack([out.loss.detach().double(), out.ce_loss.detach().double(),
                                    out.aux_loss.detach().double()]) / self.accum
        for name, rows in moe_layer_metrics(out.aux).items():
            how = LAYER_METRICS[name]
            if how == "layer_sum":
                self.layers[name] = self.layers[name] + rows if name in self.layers else rows.clone()
                continue
            rows = rows.double() / self.accum
            if how == "mean":
                rows = rows / rows.shape[0]
                acc = self.layers.get(name, torch.zeros(rows.shape[1:], dtype=torch.float64, device=rows.device))
                for row in rows.unbind(0):  # layer by layer, as the float sum it replaces
                    acc = acc + row
                self.layers[name] = acc
            else:
                self.layers[name] = self.layers[name] + rows if name in self.layers else rows

    def to_host(self, par: Parallel, grad_norm: torch.Tensor | None, routing: RoutingMonitor) -> dict[str, Any]:
        """The step's metrics as Python values: averaged (sums: summed) over the ranks with one all-reduce,
        then brought to the host with one transfer, the routing record (already reduced by its monitor) with them.
        grad_norm None: not computed (logged as NaN)."""
        names = [n for n in LAYER_METRICS if n in self.layers]
        parts = [self.losses] + [self.layers[n].double().flatten() for n in names]
        flat = torch.cat(parts)
        if par.world > 1:
            dist.all_reduce(flat)
            is_mean = torch.cat([torch.ones(3, dtype=torch.bool, device=flat.device)]
                                + [torch.full((self.layers[n].numel(),), LAYER_METRICS[n] != "layer_sum",
                                              device=flat.device) for n in names])
            flat = torch.where(is_mean, flat / par.world, flat)
        norm = grad_norm.detach().double().reshape(1) if grad_norm is not None else flat.new_full((1,), math.nan)
        pending = routing.pending()
        extra = pending.flatten() if pending is not None else flat.new_zeros(0)
        host = torch.cat([flat, norm, extra]).cpu()  # the step's one device-to-host transfer
        n_main = flat.numel() + 1
        routing_rows = host[n_main:].view(pending.shape).tolist() if pending is not None else None
        host = host[:n_main]

        out: dict[str, Any] = {"loss": host[0].item(), "ce": host[1].item(), "aux": host[2].item()}
        for name, how in LAYER_METRICS.items():
            v = self._slice(host, names, name)
            if how == "mean":
                out[name] = 0.0 if v is None else v.item()
            elif v is None:
                out[name] = []
            else:
                out[name] = (v.round().long() if how == "layer_sum" else v).tolist()
        out["grad_norm"] = host[-1].item()
        out.update(routing.record(routing_rows))  # tokens_per_expert, expert_load_max_over_mean and the health
        return out

    def _slice(self, flat: torch.Tensor, names: list[str], name: str) -> torch.Tensor | None:
        if name not in names:
            return None
        start = 3
        for n in names:
            size = self.layers[n].numel()
            if n == name:
                return flat[start: start + size].view(self.layers[n].shape)
            start += size
        return None


def train_step(step: int, net: nn.Module, model: nn.Module, sampler: TrainSampler, accum: int, par: Parallel,
               grad_clip: float, autocast: AbstractContextManager, routing: RoutingMonitor,
               compile_mode: CompileMode = "off") -> dict[str, Any]:
    """Forward and backward of the `accum` micro-batches of optimizer step `step` (0-based), expert-gradient
    synchronisation and clipping; returns the step's metrics (StepStats.to_host). The weights are not updated:
    the caller checks the loss first.

    net: the module to call (DDP wraps `model`, torch.compile may wrap either); model: the module whose
    parameters are trained; routing: the run's routing monitor (health metrics, the aux-loss-free bias update,
    dead experts); compile_mode: how `net` was compiled (mhmoe.training.compile). Under "cudagraphs" each
    micro-batch is a new CUDA-graph step whose outputs the next replay overwrites: StepStats and the routing
    monitor keep only tensors of their own (sums, stacks, clones), the output is dropped before the next
    micro-batch, and the gradients are allocated before the first backward so that autograd accumulates into
    them in place rather than keeping the backward graph's output buffers as .grad (the caller zeroes them with
    set_to_none=False).
    """
    stats = StepStats(accum, par.device)
    ddp = par.world > 1 and par.mode == "ddp"
    cudagraphs = compile_mode == "cudagraphs"
    if cudagraphs:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    for micro in range(accum):
        x, y = sampler.batch(step, micro)
        x, y = x.to(par.device, non_blocking=True), y.to(par.device, non_blocking=True)
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        # DDP all-reduces on the last micro-batch only; FSDP2 reduce-scatters each one.
        sync = net.no_sync() if ddp and micro < accum - 1 else nullcontext()
        with sync:
            with autocast, label(MODEL):  # profiler ranges (mhmoe.profiling): no-ops unless a profiler records
                out = net(x, y)
            (out.loss / accum).backward()
        stats.add(out)
        routing.add(out.aux)
        del out  # nothing of this micro-batch's graph outputs outlives it (the next CUDA-graph replay reuses them)
    sync_expert_grads(model, par)
    with label(OPTIMIZER):
        grad_norm = clip_grad_norm(model, par, grad_clip) if grad_clip > 0 else None
    routing.end_step(step + 1)
    return stats.to_host(par, grad_norm, routing)
