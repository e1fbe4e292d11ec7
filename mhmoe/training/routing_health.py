"""The training loop's routing side: per-step routing health, the aux-loss-free bias update, dead experts.

The step (mhmoe.training.step.train_step) makes the calls:
    monitor.add(out.aux)        after each micro-batch's forward: device sums, no host sync
    monitor.end_step(step)      after the backward of the step's last micro-batch: one all_reduce of the step's
                                [L, E+3] sums when torch.distributed is initialised, the bias update (balancing
                                "bias"/"both"; the bias is not a parameter, so updating it before or after
                                optimizer.step() is the same: the next forward sees both), the dead-expert window
    monitor.pending()           the step's record as one device tensor, brought to the host in the step's one
                                transfer, then turned into metrics.jsonl fields by monitor.record(rows)
    monitor.state_dict()        the dead-expert window, saved with the checkpoint so a resumed run reports the same
Per MoE layer (lists in depth order), metrics.jsonl gets
    load_cv, load_max_mean      of the step's load (assignments per expert over all micro-batches and ranks)
    expert_activation           mean over the step's sequences (mhmoe.layers.routing_stats)
    dead_experts                experts with no assignment in the last TrainConfig.dead_expert_window steps
    subtoken_distinct           MH-MoE (heads > 1) only, else null
    router_entropy_per_layer    mean router entropy (nats) of each layer
    bias_norm                   L2 norm of each router's selection bias (balancing "bias"/"both" only)
    tokens_per_expert, expert_load_max_over_mean   as before (now the global load under torch.distributed)

Shape legend: L MoE layers, E experts, M metrics per layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.layers.balancing import moe_routers, sum_over_ranks, update_router_biases
from mhmoe.layers.config import MoEAux
from mhmoe.layers.routing_stats import load_cv, load_max_mean
from mhmoe.training.config import TrainConfig

# Per-micro-batch statistics averaged over the step, in this order after the E load columns.
_MEANS = ("expert_activation", "subtoken_distinct", "router_entropy")


class DeadExpertTracker:
    """The last step at which each expert of each layer received an assignment: [L, E] long, on the device.

    An expert is dead at step s when it got nothing in steps s-window+1 .. s, i.e. s - last_seen >= window. Steps
    count from the run's start (last_seen 0), so nothing is dead before `window` steps have passed.
    """

    def __init__(self, layers: int, experts: int, window: int, device: torch.device | str = "cpu",
                 start: int = 0) -> None:
        self.window = window
        self.last_seen = torch.full((layers, experts), start, dtype=torch.long, device=device)  # [L, E]

    def update(self, step: int, loads: torch.Tensor) -> None:
        """loads [L, E] of step `step` (1-based, the step just finished)."""
        self.last_seen = torch.where(loads > 0, torch.full_like(self.last_seen, step), self.last_seen)

    def dead(self, step: int) -> torch.Tensor:
        """[L] long: dead experts per layer at `step`."""
        return (step - self.last_seen >= self.window).sum(dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"last_seen": self.last_seen.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["last_seen"].shape != self.last_seen.shape:
            raise ValueError(f"DeadExpertTracker: state for {tuple(state['last_seen'].shape)} layers x experts, "
                             f"model has {tuple(self.last_seen.shape)}")
        self.last_seen = state["last_seen"].to(self.last_seen.device)


class RoutingMonitor:
    """Routing health of a training run, step by step; see the module docstring for the calls and fields."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device | str, start: int = 0) -> None:
        ffn = cfg.model.moe_ffn
        self.model = model
        self.layers = sum(cfg.model.is_moe_block(i) for i in range(cfg.model.n_layers))
        self.experts = ffn.num_experts if ffn.kind == "moe" else 0
        self.heads = ffn.heads
        self.bias = ffn.kind == "moe" and ffn.uses_bias
        self.device = torch.device(device)
        self.tracker = DeadExpertTracker(self.layers, self.experts, cfg.dead_expert_window, device, start)
        self._sums: torch.Tensor | None = None  # [L, E + 3] float64: loads, then the _MEANS sums
        self._micro = 0
        self._step: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add(self, auxes: list[MoEAux]) -> None:
        """Accumulate one micro-batch's MoEAux (one per MoE layer, depth order); device ops only."""
        if not auxes:
            return
        rows = torch.stack([torch.cat([a.tokens_per_expert.double(), torch.stack(
            [getattr(a, k).detach().double() for k in _MEANS])]) for a in auxes])  # [L, E + 3]
        self._sums = rows if self._sums is None else self._sums + rows
        self._micro += 1

    def end_step(self, step: int) -> None:
        """After optimizer.step() of step `step` (1-based): sum over ranks, bias update, dead-expert window."""
        if self._sums is None:
            self._step = None
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        sums = sum_over_ranks(self._sums)  # the one collective: loads and the means' sums together
        loads = sums[:, : self.experts]  # [L, E] global assignments per expert, exact in float64
        means = sums[:, self.experts:] / (self._micro * world)  # [L, 3]
        if self.bias:
            update_router_biases(self.model, loads, reduce=False)
        self.tracker.update(step, loads)
        health = torch.stack([torch.stack([load_cv(l) for l in loads]), torch.stack([load_max_mean(l) for l in loads]),
                              self.tracker.dead(step).double()], dim=1)  # [L, 3]
        if self.bias:
            norms = torch.stack([torch.linalg.vector_norm(r.expert_bias.double()) for r in moe_routers(self.model)])
            health = torch.cat([health, norms[:, None]], dim=1)  # [L, 4]
        self._step = (step, loads, means, health)
        self._sums, self._micro = None, 0

    def pending(self) -> torch.Tensor | None:
        """The step's record as one [L, C] float64 device tensor (None before end_step or without MoE layers), for
        the caller to bring to the host in the same transfer as its own metrics."""
        if self._step is None:
            return None
        _, loads, means, health = self._step
        legacy = loads.long()
        legacy_mm = legacy.max(dim=1).values / legacy.float().mean(dim=1)  # [L] as the loop computed it before
        return torch.cat([loads, means, health, legacy_mm.double()[:, None]], dim=1)

    def record(self, rows: list[list[float]] | None = None) -> dict[str, Any]:
        """The step's metrics.jsonl fields (lists with one value per MoE layer) from `pending()` brought to the
        host (rows); rows None converts `pending()` here."""
        if self._step is None:
            return {"tokens_per_expert": [], "expert_load_max_over_mean": [], "load_cv": [], "load_max_mean": [],
                    "dead_experts": [], "expert_activation": [], "subtoken_distinct": None,
                    "router_entropy_per_layer": []}
        if rows is None:
            rows = self.pending().tolist()
        health_cols = 4 if self.bias else 3
        E = self.experts
        col = {name: [r[E + i] for r in rows] for i, name in enumerate(_MEANS)}
        hcol = [[r[E + len(_MEANS) + i] for r in rows] for i in range(health_cols)]
        rec = {"tokens_per_expert": [[int(v) for v in r[:E]] for r in rows],
               "expert_load_max_over_mean": [r[-1] for r in rows],
               "load_cv": hcol[0], "load_max_mean": hcol[1], "dead_experts": [int(v) for v in hcol[2]],
               "expert_activation": col["expert_activation"],
               "subtoken_distinct": col["subtoken_distinct"] if self.heads > 1 else None,
               "router_entropy_per_layer": col["router_entropy"]}
        if self.bias:
            rec["bias_norm"] = hcol[3]
        return rec

    def log_scalars(self, writer: Any, rec: dict[str, Any], step: int) -> None:
        """TensorBoard scalars routing/<metric>/layer<i> from a record made by `record()` (no further sync)."""
        keys = ("load_cv", "load_max_mean", "dead_experts", "expert_activation", "subtoken_distinct",
                "router_entropy_per_layer", "bias_norm")
        for k in keys:
            for i, v in enumerate(rec.get(k) or []):
                writer.add_scalar(f"routing/{k}/layer{i}", v, step)

    def state_dict(self) -> dict[str, Any]:
        return {"dead_expert_last_seen": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None, step: int = 0) -> None:
        """Restore the dead-expert window of a checkpoint at `step`; None (a checkpoint from before it was saved,
        or from another world size) starts the window at `step`."""
        if state is not None:
            self.tracker.load_state_dict(state["dead_expert_last_seen"])
        else:
            self.tracker.last_seen.fill_(step)
