"""Calculators for scale-out: all_to_all volume per token and memory per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from mhmoe.complexity import model_param_count, param_count
from mhmoe.distributed.parallel import DPMode
from mhmoe.layers.config import FFNConfig
from mhmoe.model import ModelConfig

# ----------------------------------------------------------------------------------------------------------
# Calculators


def comm_volume_per_token(ffn: FFNConfig, ep: int, bytes_per_value: int = 2) -> dict[str, float]:
    """All-to-all traffic of one MoE layer per token and direction (forward dispatch; the combine returns the same
    amount, and backward repeats both): h*K rows of D/h values, of which (ep-1)/ep leave the rank on average
    under uniform routing. Independent of h: MH-MoE moves exactly what SMoE with the same top-k moves."""
    if ffn.kind != "moe":
        return {"rows": 0, "values": 0, "bytes": 0, "offrank_bytes": 0.0}
    rows = ffn.heads * ffn.top_k
    values = rows * ffn.head_dim  # = top_k * D
    return {"rows": rows, "values": values, "bytes": values * bytes_per_value,
            "offrank_bytes": values * bytes_per_value * (ep - 1) / ep}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of parameters, gradients and optimizer state (activations excluded)."""

    params: float  # parameters held by one GPU
    param_bytes: float
    grad_bytes: float
    optim_bytes: float
    gather_bytes: float  # FSDP: the largest block's unsharded dense parameters, twice (current + prefetched)

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.gather_bytes


def memory_per_gpu(cfg: ModelConfig, world: int, ep: int = 1, mode: DPMode = "fsdp", param_bytes: int = 4,
                   grad_bytes: int = 4, optim_bytes: int = 8) -> MemoryEstimate:
    """Model states per GPU for W = world GPUs in a (W/ep x ep) grid: fp32 parameters and gradients and AdamW's two
    fp32 moments by default (bf16 autocast keeps fp32 master weights). Dense parameters: all on each GPU (DDP) or
    1/W (FSDP); expert parameters: 1/ep with expert parallelism, else like the dense ones."""
    if ep < 1 or world % ep:
        raise ValueError(f"ep ({ep}) must divide world ({world})")
    total = model_param_count(cfg)["total"]
    expert_per_layer = [param_count(cfg.ffn_config(i)).experts if cfg.is_moe_block(i) else 0
                        for i in range(cfg.n_layers)]
    experts = sum(expert_per_layer)
    dense = total - experts
    dense_gpu = dense / world if mode == "fsdp" else dense
    experts_gpu = experts / ep if ep > 1 else (experts / world if mode == "fsdp" else experts)
    n = dense_gpu + experts_gpu
    gather = 0.0
    if mode == "fsdp" and world > 1:
        d = cfg.dim
        gathered_experts = [0 if ep > 1 else e for e in expert_per_layer]  # EP experts are never gathered
        block = max(4 * d * d + 2 * d + param_count(cfg.ffn_config(i)).total - expert_per_layer[i] + gathered_experts[i]
                    for i in range(cfg.n_layers))
        gather = 2 * block * param_bytes
    return MemoryEstimate(n, n * param_bytes, n * grad_bytes, n * optim_bytes, gather)


DEFAULT_LAYOUTS: tuple[tuple[str, int, int, DPMode], ...] = (
    ("1 GPU", 1, 1, "ddp"), ("1 node, DDP x8", 8, 1, "ddp"), ("1 node, FSDP x8", 8, 1, "fsdp"),
    ("1 node, FSDP x8 + EP 8", 8, 8, "fsdp"), ("2 nodes, FSDP x16 + EP 8", 16, 8, "fsdp"),
)


def memory_table(models: dict[str, ModelConfig],
                 layouts: tuple[tuple[str, int, int, DPMode], ...] = DEFAULT_LAYOUTS) -> str:
    """Markdown table of memory_per_gpu (GiB), one row per named model, one column per (name, world, ep, mode)."""
    gib = 2 ** 30
    lines = ["| model | params | " + " | ".join(name for name, *_ in layouts) + " |",
             "|---|---:|" + "---:|" * len(layouts)]
    for name, cfg in models.items():
        cells = [f"{memory_per_gpu(cfg, w, e, m).total_bytes / gib:.2f}" for _, w, e, m in layouts]
        lines.append(f"| {name} | {model_param_count(cfg)['total'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)
