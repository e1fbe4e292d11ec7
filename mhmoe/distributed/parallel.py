"""Process topology for data parallel (DDP or FSDP2) x expert parallel, one process per device.

Parallel dimensions (world W = dp x ep processes):
    data parallel    every rank reads its own rows of the global batch; the dense parameters (embeddings,
                     attention, norms, dense FFNs, routers, head/merge, shared experts) are replicated (DDP) or
                     sharded over all W ranks (FSDP2 `fully_shard`); gradients averaged over W
    expert parallel  the E experts of every MoE layer are split over the ep ranks of an expert-parallel group
                     (ranks g*ep .. g*ep+ep-1), E/ep each; the ep groups are replicas of each other, and an
                     expert's gradient is summed over its W/ep replicas (`sync_expert_grads`)

`ParallelConfig` is what the user asks for (`mhmoe train --dp --ep`), `dist_env` what torchrun started, and
`Parallel` this process's place in the resulting grid. A run without torchrun is the 1-process grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.configbase import Config
from mhmoe.distributed.expert_parallel import expert_parallel_modules, shard_experts
from mhmoe.errors import ConfigError, MhmoeError, TrainingError, UserError
from mhmoe.model import ModelConfig, Transformer

DPMode = Literal["fsdp", "ddp"]
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------
# What torchrun started, and what the user asked for


@dataclass(frozen=True)
class DistEnv:
    """This process's rank among `world` processes (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """The launcher's environment; without torchrun (WORLD_SIZE unset) one process of rank 0."""
    env = os.environ if environ is None else environ
    values = {}
    for name, key, default in (("rank", "RANK", 0), ("world", "WORLD_SIZE", 1), ("local_rank", "LOCAL_RANK", 0)):
        text = env.get(key)
        try:
            values[name] = default if text is None or text == "" else int(text)
        except ValueError:
            raise UserError(f"${key}: {text!r} is not an integer; launch with torchrun or unset it") from None
    if values["world"] < 1 or not 0 <= values["rank"] < values["world"]:
        raise UserError(f"$RANK / $WORLD_SIZE: rank {values['rank']} of {values['world']} processes is not a valid "
                        "place; launch with torchrun or unset both")
    return DistEnv(**values)


@dataclass(frozen=True)
class ParallelConfig(Config):
    """The parallel layout of a run: `dp` for the dense parameters (replicated with DDP or sharded with FSDP2),
    `ep` the expert-parallel degree. The default is a plain run: one process, or DDP under torchrun."""

    dp: DPMode = "ddp"
    ep: int = 1

    def validate(self) -> None:
        if self.ep < 1:
            raise ConfigError(f"--ep: must be >= 1 (1 = no expert parallelism), got {self.ep}")

    def check(self, world: int, model: ModelConfig) -> None:
        """Whether this layout fits `world` processes and `model`, judged alike on every rank before any process
        group exists, so that a refused layout stops every rank with the same line instead of a hung peer."""
        if world % self.ep:
            raise UserError(f"--ep: must divide the number of processes ({world}), got {self.ep}; start a multiple "
                            f"of {self.ep} processes (torchrun --nproc_per_node) or lower --ep")
        if self.ep == 1:
            return
        if model.bitnet:  # BitExperts carry per-expert norms and quantised kernels that sharding does not cover
            raise ConfigError(f"--ep: BitNet experts (model.bitnet=true) cannot be expert-sharded; use --ep 1, got "
                              f"{self.ep}")
        if model.moe_ffn.kind == "moe" and model.moe_ffn.num_experts % self.ep:
            raise ConfigError(f"--ep: must divide model.moe_ffn.num_experts ({model.moe_ffn.num_experts}), got "
                              f"{self.ep}; use a divisor of it")


# ----------------------------------------------------------------------------------------------------------
# Topology


@dataclass
class Parallel:
    """This process's place in a (dp x ep) grid of W = dp * ep ranks, rank = d * ep + e.

    Attributes:
        world, rank: the whole job; dp, ep: the two degrees; mode: how the dense parameters are split.
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
    mode: DPMode = "ddp"
    world_mesh: Any = None
    mesh: Any = None
    ep_group: Any = None
    replica_group: Any = None

    @property
    def sharded(self) -> bool:
        """Whether no rank holds the whole model (FSDP2 or expert parallelism): checkpoints are then written by
        every rank (torch.distributed.checkpoint) and evaluations run on every rank."""
        return self.world > 1 and (self.mode == "fsdp" or self.ep > 1)


def init_parallel(parallel: ParallelConfig, device: torch.device, env: DistEnv | None = None) -> Parallel:
    """Initialise the process group from torchrun's environment (gloo on CPU, nccl on CUDA) and the meshes.

    Without torchrun (world 1) this is the 1-process topology and nothing is initialised. On CUDA the process
    takes the device of its LOCAL_RANK.
    """
    env = env or dist_env()
    if env.world % parallel.ep:
        raise UserError(f"--ep: must divide the number of processes ({env.world}), got {parallel.ep}")
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", torch.cuda.current_device())
    if env.world == 1:
        return Parallel(1, 0, 1, 1, device, parallel.dp)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # torch.distributed's mesh, FSDP2 and DTensor are imported once several processes run: together about 0.5 s of
    # every process start, which one-process runs and the CLI's reports never need.
    from torch.distributed.device_mesh import init_device_mesh

    ep = parallel.ep
    mesh = init_device_mesh(device.type, (env.world // ep, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(device.type, (env.world,), mesh_dim_names=("world",))
    return Parallel(env.world, env.rank, env.world // ep, ep, device, parallel.dp, world_mesh, mesh,
                    mesh.get_group("ep"), mesh.get_group("dp"))


def parallelize(model: Transformer, par: Parallel) -> nn.Module:
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
    if par.mode == "fsdp":
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


def clip_grad_norm(model: nn.Module, par: Parallel, max_norm: float) -> torch.Tensor:
    """The global gradient norm as a 0-dim device tensor (no host sync), after scaling every gradient by
    min(1, max_norm / (norm + 1e-6)) when max_norm > 0.

    Where every rank holds all gradients (one process, DDP) this is torch.nn.utils.clip_grad_norm_ itself;
    otherwise the squares are summed over all ranks with FSDP shards, DDP replicas and expert shards each
    counted once.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not par.sharded:
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
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
    norm = sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        with torch.no_grad():
            for p in params:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                g.mul_(coef.to(g.dtype))
    return norm


def all_reduce_sum(t: torch.Tensor, par: Parallel) -> torch.Tensor:
    """`t` summed over all ranks (in place; `t` itself on one process)."""
    if par.world > 1:
        dist.all_reduce(t)
    return t


def barrier(par: Parallel) -> None:
    if par.world > 1:
        dist.barrier()


def together(par: Parallel, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank and fail on all of them if it failed on any: each rank then raises the error of
    the lowest failing rank (its own exception on that rank), so a refusal made by one rank (rank 0 checking
    the run directory) stops every rank with the same one-line message instead of leaving the others to die in
    their next collective with a transport error."""
    try:
        result, err = fn(), None
    except Exception as e:  # noqa: BLE001 (shared, then re-raised)
        result, err = None, e
    if par.world > 1:
        if err is None:
            shared = None
        elif isinstance(err, MhmoeError):
            shared = err
        else:  # a bug, not a refusal: the others say where to look
            shared = TrainingError(f"rank {par.rank} failed with {type(err).__name__}; see its traceback above")
        errors: list[Any] = [None] * par.world
        dist.all_gather_object(errors, shared)
        if err is None:
            err = next((e for e in errors if e is not None), None)
        del errors, shared
    if err is None:
        return result
    # Raised without a reference to it left in this frame: the traceback holds the frame, and a frame that holds
    # the exception is a cycle that keeps every caller's frame, and so the process groups, alive until the garbage
    # collector runs, at worst in the interpreter's finalisation. Gloo's threads freed there abort the process
    # ("terminate called without an active exception", SIGABRT; one torchrun launch in about 30 refused so).
    try:
        raise err
    finally:
        del err
