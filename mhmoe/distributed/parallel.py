"""Process topology for data parallel (DDP or FSDP2) x expert parallel, one process per device.

Parallel dimensions (world W = dp x ep processes):
    data parallel    every rank reads its own rows of the global batch; the dense parameters (embeddings,
                     attention, norms, dense FFNs, routers, head/merge, shared experts) are replicated (DDP) or
                     sharded over all W ranks (FSDP2 `fully_shard`); gradients averaged over W
    expert parallel  the E experts of every MoE layer are split over the ep ranks of an expert-parallel group
                     (ranks g*ep .. g*ep+ep-1), E/ep each; the ep groups are replicas of each other, and an
                     expert's gradient is summed over its W/ep replicas (`sync_expert_grads`)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.distributed.expert_parallel import expert_parallel_modules, shard_experts
from mhmoe.errors import UserError
from mhmoe.model import Transformer

DPMode = Literal["fsdp", "ddp"]


# ----------------------------------------------------------------------------------------------------------
# Topology


@dataclass
class Parallel:
    """This process's place in a (dp x ep) grid of W = dp * ep ranks, rank = d * ep + e.

    Attributes:
        world, rank: the whole job; dp, ep: the two degrees.
        world_mesh: 1-D DeviceMesh of all ranks (FSDP2 shards the dense parameters over it).
        ep_group: the ranks sharing one copy of the experts (consecutive ranks: inside one node first).
        replica_group: the ranks holding the same experts (one per ep group).
        device: this rank's device.
    """

    world: int
    rank: int
    dp: int
    ep: int
    device: torch.device
    world_mesh: Any = None
    mesh: Any = None
    ep_group: Any = None
    replica_group: Any = None


def init_parallel(ep: int = 1, device: str = "auto") -> Parallel:
    """Initialise the process group from torchrun's environment (gloo on CPU, nccl on CUDA) and the meshes.

    Without torchrun (WORLD_SIZE unset) this is the 1-process topology and nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if ep < 1 or world % ep:
        raise UserError(f"--ep: must divide the number of processes ({world}), got {ep}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dev = torch.device("cuda", torch.cuda.current_device())
    if world == 1:
        return Parallel(1, 0, 1, 1, dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("world",))
    return Parallel(world, rank, world // ep, ep, dev, world_mesh, mesh, mesh.get_group("ep"), mesh.get_group("dp"))


def parallelize(model: Transformer, par: Parallel, mode: DPMode = "fsdp") -> nn.Module:
    """Expert-shard (ep > 1) and data-parallelise `model` in place; returns the module to call (DDP wraps).

    FSDP2: one `fully_shard` unit per block plus the root (embeddings, final norm, tied LM head), over all W
    ranks; expert-parallel weights are left out of FSDP (ignored_params) and synchronised by sync_expert_grads.
    DDP: the expert-parallel weights are excluded from its all-reduce in the same way.
    """
    if par.ep > 1:
        shard_experts(model, par.ep_group)
    if par.world == 1:
        return model
    experts = {p for _, m in expert_parallel_modules(model) for p in m.parameters()}
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=par.world_mesh, ignored_params=experts or None)
        fully_shard(model, mesh=par.world_mesh, ignored_params=experts or None)
        return model
    ignore = [f"{name}.{p}" for name, _ in expert_parallel_modules(model) for p in ("w1", "w3", "w2")]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[par.device.index] if par.device.type == "cuda"
                                                     else None)


def sync_expert_grads(model: nn.Module, par: Parallel) -> None:
    """Turn each rank's expert-parallel gradients (sums over its ep group's tokens of per-rank mean losses) into
    the gradient of the global mean loss, as DDP/FSDP do for the dense ones: sum over the replicas, divide by W."""
    if par.world == 1:
        return
    for _, mod in expert_parallel_modules(model):
        for p in (mod.w1, mod.w3, mod.w2):
            if p.grad is None:
                continue
            if par.dp > 1:
                dist.all_reduce(p.grad, group=par.replica_group)
            p.grad.div_(par.world)


def clip_grad_norm(model: nn.Module, par: Parallel, max_norm: float) -> float:
    """Global gradient norm over all ranks (FSDP shards, DDP replicas and expert shards each counted once),
    then scale every gradient by min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does."""
    params = [p for p in model.parameters() if p.grad is not None]
    if par.world == 1:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else _norm(params))
    from torch.distributed.tensor import DTensor

    experts = {id(p) for _, m in expert_parallel_modules(model) for p in m.parameters()}
    sq = torch.zeros((), device=par.device, dtype=torch.float64)
    for p in params:
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        s = g.detach().double().pow(2).sum()
        if isinstance(p.grad, DTensor):
            sq += s  # a shard: each element on exactly one rank
        elif id(p) in experts:
            sq += s / par.dp  # the same expert shard on its dp replicas
        else:
            sq += s / par.world  # replicated on every rank (DDP)
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
    return norm


def _norm(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
