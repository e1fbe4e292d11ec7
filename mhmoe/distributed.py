"""Scale-out on torch.distributed (torchrun): data parallel (DDP or FSDP2) x expert parallel, distributed
checkpoints that reshard to any world size, and the memory-per-GPU calculator. See docs/SCALE_OUT.md.

    torchrun --nproc_per_node 8 -m mhmoe.distributed train --preset paper --model mhmoe-h2 --out runs/p --ep 8
    python -m mhmoe.distributed consolidate runs/p        # DCP shards -> checkpoints/step_N (mhmoe eval / export)
    python -m mhmoe.distributed memory --preset paper --gpus 8 --nodes 2

Parallel dimensions (world W = dp x ep processes, one per GPU):
    data parallel    every rank reads its own rows of the global batch (`TrainSampler`); the dense parameters
                     (embeddings, attention, norms, dense FFNs, routers, head/merge, shared experts) are
                     replicated (DDP) or sharded over all W ranks (FSDP2 `fully_shard`); gradients averaged over W
    expert parallel  the E experts of every MoE layer are split over the ep ranks of an expert-parallel group
                     (ranks g*ep .. g*ep+ep-1), E/ep each; the ep groups are replicas of each other, and an
                     expert's gradient is summed over its W/ep replicas (`sync_expert_grads`)
One MoE layer under expert parallelism (`ExpertParallelExperts`, same interface as `mhmoe.experts.Experts`):
    1. route locally, sort the S = N*K assignments by expert: each destination rank's rows are contiguous
    2. all_to_all the per-expert counts [ep, E/ep], then the rows (uneven splits): S rows of D/h features
    3. run the E/ep local experts on their contiguous groups (the same sorted matmuls as one process)
    4. all_to_all the results back (the backward of each all_to_all is the reverse all_to_all), un-sort, combine
MH-MoE sends sub-tokens: h*K rows of D/h per token = K*D values, exactly SMoE's K rows of D at the same top-k
(`comm_volume_per_token`); capacity limits, when set, apply per rank before dispatch, as in data parallelism.

Shape legend: N (sub-)tokens of this rank, Din = D/h, F expert hidden, E experts, El = E/ep local experts, K top-k,
S = N*K assignments (S' after capacity drops), R rows received by this rank, W world size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.configbase import ConfigError
from mhmoe.experts import DispatchStats, Experts
from mhmoe.ffn import FFNConfig
from mhmoe.model import ModelConfig, Transformer
from mhmoe.moe import MoELayer
from mhmoe.errors import UserError

if TYPE_CHECKING:
    from mhmoe.train import TrainConfig

DPMode = Literal["fsdp", "ddp"]


# ----------------------------------------------------------------------------------------------------------
# Differentiable all_to_all and the expert-parallel experts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        out_splits, in_splits = ctx.splits
        gx = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:  # noqa: ANN001
    """Send rows in_splits[r] of x (in rank order) to rank r, receive out_splits[r] rows from rank r; autograd-aware."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class CommStats:
    """One forward of an expert-parallel layer, one direction (the results come back the same way)."""

    rows: int = 0  # assignment rows dispatched (kept after capacity), self included
    offrank_rows: int = 0  # of which to other ranks
    bytes: int = 0  # rows * Din * element size
    offrank_bytes: int = 0


class ExpertParallelExperts(Experts):
    """Experts [rank*El, (rank+1)*El) of an expert-parallel group, with `Experts`' forward signature.

    Parameters w1, w3: [El, Din, F], w2: [El, F, Din] keep the names of the module they replace, so the
    state-dict keys are those of the single-process model (DCP checkpoints store them as shards of [E, ...]).
    """

    def __init__(self, experts: Experts, group=None) -> None:  # noqa: ANN001
        nn.Module.__init__(self)
        if type(experts) is not Experts:  # BitExperts (BitNet) carry per-expert norms and quantised kernels
            raise NotImplementedError(f"expert parallelism supports mhmoe.experts.Experts, not {type(experts).__name__}")
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        E = experts.num_experts
        if E % self.ep_size:
            raise ConfigError(f"--ep: num_experts ({E}) must be divisible by the expert-parallel size ({self.ep_size})")
        self.num_experts, self.in_dim, self.hidden_dim = E, experts.in_dim, experts.hidden_dim
        self.dispatch, self.recompute, self.threading = experts.dispatch, experts.recompute, experts.threading
        self.local_experts = E // self.ep_size
        lo, hi = self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts
        self.w1 = nn.Parameter(experts.w1.detach()[lo:hi].clone())
        self.w3 = nn.Parameter(experts.w3.detach()[lo:hi].clone())
        self.w2 = nn.Parameter(experts.w2.detach()[lo:hi].clone())
        self.comm = CommStats()

    def extra_repr(self) -> str:
        return (f"experts {self.ep_rank * self.local_experts}..{(self.ep_rank + 1) * self.local_experts - 1} of "
                f"{self.num_experts}, in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, ep={self.ep_size}")

    @torch.compiler.disable  # data-dependent splits, as Experts.forward
    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, capacity: int | None = None
    ) -> tuple[torch.Tensor, DispatchStats]:
        """x: [N, Din], indices/weights: [N, K] (this rank's routing) -> y: [N, Din], as Experts.forward."""
        N, K = indices.shape
        E, El, P = self.num_experts, self.local_experts, self.ep_size
        flat = indices.reshape(-1)  # [S]
        order = torch.argsort(flat, stable=True)  # [S] grouped by expert, hence by owner rank
        counts = torch.bincount(flat, minlength=E)  # [E]
        stats = DispatchStats(tokens_per_expert=counts, dropped=0)
        if capacity is not None:  # the same per-rank drop as Experts.forward, before anything is sent
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(order.numel(), device=x.device) - starts[flat[order]]
            order = order[pos < capacity]
            counts = counts.clamp(max=capacity)
            stats.dropped = int(N * K - order.numel())
        xs = x.index_select(0, order // K)  # [S', Din] sorted by expert
        send = counts.view(P, El)  # rows for rank p's local expert j
        recv = torch.empty_like(send)  # rows from rank p for my local expert j
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()  # the host sync of the layer
        xr = all_to_all(xs, recv_splits, send_splits, self.group)  # [R, Din] by source rank, then local expert
        # Regroup by local expert; stable, so an expert sees rank 0's rows, then rank 1's, ... (token order).
        expert_of_row = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(P), recv.flatten())
        perm = torch.argsort(expert_of_row, stable=True)  # [R]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        yl = self._run_sorted(xr.index_select(0, perm), recv.sum(0))  # [R, Din]
        ys = all_to_all(yl.index_select(0, inv), send_splits, recv_splits, self.group)  # [S', Din] sorted order
        y_assign = ys.new_zeros(N * K, self.in_dim).index_copy(0, order, ys)  # [S, Din]
        y = (y_assign.view(N, K, self.in_dim) * weights.to(ys.dtype).unsqueeze(-1)).sum(dim=1)  # [N, Din]
        row_bytes = self.in_dim * xs.element_size()
        off = int(xs.shape[0] - send_splits[self.ep_rank])
        self.comm = CommStats(int(xs.shape[0]), off, int(xs.shape[0]) * row_bytes, off * row_bytes)
        return y, stats


def shard_experts(model: nn.Module, group=None) -> nn.Module:  # noqa: ANN001
    """Swap, in place, the experts of every MoE layer of `model` for this rank's ExpertParallelExperts over
    `group` (all ranks of the group must call it on identically initialised models). Returns `model`."""
    for mod in list(model.modules()):
        if isinstance(mod, MoELayer) and not isinstance(mod.experts, ExpertParallelExperts):
            mod.experts = ExpertParallelExperts(mod.experts, group)
    return model


def expert_parallel_modules(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    """(qualified name, module) of every expert-parallel layer, in model order (wrappers' prefixes removed)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelExperts):
            out.append((_clean_fqn(name), mod))
    return out


def _clean_fqn(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


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


# ----------------------------------------------------------------------------------------------------------
# Distributed checkpoints (torch.distributed.checkpoint): any world size in, any world size out


def _wrap_experts(sd: dict[str, Any], model: nn.Module, par: Parallel, optim: bool) -> dict[str, Any]:
    """Expert-parallel tensors as DTensor shards of the full [E, ...] tensors (dim 0 over ep, replicated over dp),
    so that DCP stores global tensors and can reshard them; 1-process (full) tensors are left as they are."""
    mods = expert_parallel_modules(model)
    if not mods:
        return sd
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def wrap(t: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(t, par.mesh, [Replicate(), Shard(0)], run_check=False)

    for name, _ in mods:
        for p in ("w1", "w3", "w2"):
            key = f"{name}.{p}"
            if optim and key in sd["state"]:  # a new inner dict: the returned one may be the optimizer's own
                sd["state"][key] = {k: wrap(v) if k in ("exp_avg", "exp_avg_sq") and not isinstance(v, DTensor)
                                    else v for k, v in sd["state"][key].items()}
            elif key in sd and not isinstance(sd[key], DTensor):
                sd[key] = wrap(sd[key])
    return sd


def _unwrap_experts(sd: dict[str, Any], model: nn.Module, optim: bool) -> dict[str, Any]:
    keys = {f"{name}.{p}" for name, _ in expert_parallel_modules(model) for p in ("w1", "w3", "w2")}
    if optim:
        for key in keys & sd["state"].keys():
            sd["state"][key] = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in sd["state"][key].items()}
    else:
        for key in keys:
            if key in sd and hasattr(sd[key], "to_local"):
                sd[key] = sd[key].to_local()
    return sd


def save_distributed(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     par: Parallel, extra: dict[str, Any] | None = None) -> Path:
    """Write a DCP checkpoint (every rank its shards; `extra` as trainer.json) atomically into `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if par.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(par)
    state = {"model": _wrap_experts(get_model_state_dict(model), model, par, optim=False)}
    if optimizer is not None:
        state["optim"] = _wrap_experts(get_optimizer_state_dict(model, optimizer), model, par, optim=True)
    dcp.save(state, checkpoint_id=str(tmp), no_dist=par.world == 1)
    if par.rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**(extra or {}), "world": par.world, "ep": par.ep}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier(par)
    return path


def load_distributed(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     par: Parallel | None = None) -> dict[str, Any]:
    """Load a DCP checkpoint written at any world size / ep degree into this topology's model (and optimizer);
    returns its trainer.json. With par None (one process, no process group) the model holds full tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    from mhmoe.checkpoint import CheckpointError

    path = Path(path)
    if not (path / ".metadata").is_file() or not (path / "trainer.json").is_file():
        raise CheckpointError(f"{path}: not a complete distributed checkpoint (.metadata / trainer.json missing)")
    par = par or Parallel(1, 0, 1, 1, torch.device("cpu"))
    state = {"model": _wrap_experts(get_model_state_dict(model), model, par, optim=False)}
    if optimizer is not None:
        state["optim"] = _wrap_experts(get_optimizer_state_dict(model, optimizer), model, par, optim=True)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=par.world == 1 or not dist.is_initialized())
    set_model_state_dict(model, _unwrap_experts(state["model"], model, optim=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, _unwrap_experts(state["optim"], model, optim=True))
    return json.loads((path / "trainer.json").read_text())


def _barrier(par: Parallel) -> None:
    if par.world > 1:
        dist.barrier()


def list_distributed_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete DCP checkpoints RUN_DIR/dcp/step_N, oldest first."""
    root = Path(run_dir) / "dcp"
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("step_") and d.name[5:].isdigit() and (d / ".metadata").is_file() \
                    and (d / "trainer.json").is_file():
                out.append((int(d.name[5:]), d))
    return sorted(out)


def consolidate(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """Reshard the DCP checkpoint `step` (default: newest) of a parallel run into one process and write it as a
    native checkpoint RUN_DIR/checkpoints/step_N (model.safetensors + trainer.pt), which `mhmoe eval`,
    `mhmoe export` and a 1-process `mhmoe train` (resume) read. Returns the checkpoint directory."""
    from mhmoe.checkpoint import CheckpointError, save_checkpoint
    from mhmoe.train import build_optimizer, load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    found = dict(list_distributed_checkpoints(run_dir))
    if not found:
        raise CheckpointError(f"RUN_DIR: {run_dir} has no distributed checkpoint (dcp/step_N); train it first")
    if step is None:
        step = max(found)
    if step not in found:
        raise CheckpointError(f"--step: no distributed checkpoint at step {step} in {run_dir}; available: {sorted(found)}")
    with torch.random.fork_rng(devices=[]):
        model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    info = load_distributed(found[step], model, optimizer)
    for g in optimizer.param_groups:  # the parallel run steps per parameter (mixed DTensors); train.py uses foreach
        g["foreach"] = True
    state = {"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(), "rng_cuda": None, "step": step,
             "source": {"dcp": str(found[step]), "world": info.get("world"), "ep": info.get("ep")}}
    return save_checkpoint(run_dir, step, model, state, cfg.to_json())


# ----------------------------------------------------------------------------------------------------------
# Training under torchrun


def train_parallel(cfg: "TrainConfig", run_dir: str | os.PathLike, data_root: str | None = None, cache_dir: str | None = None,
                   ep: int = 1, mode: DPMode = "fsdp", progress: bool = True, stop_after: int | None = None) -> dict:
    """`mhmoe.train.train`'s loop (same batches, init, AdamW, schedule, clipping, metrics.jsonl) on a (dp x ep)
    grid: DDP or FSDP2 for the dense parameters, expert parallelism of degree `ep`; DCP checkpoints in
    RUN_DIR/dcp/step_N every cfg.ckpt_every steps and at the end, resumed at any world size, and the final one
    consolidated into RUN_DIR/checkpoints/ for `mhmoe eval` / `mhmoe export`. Returns {"step", "loss", "wall_s"}."""
    from mhmoe.fileio import atomic_write_text
    from mhmoe.data import TrainSampler, Tokenizer, resolve_data_root, tokenize_corpus
    from mhmoe.train import (
        TrainingError, _check_same_config, _check_vocab, _read_jsonl, build_optimizer, default_cache_dir, lr_at,
        prepare_tokenizer,
    )

    t_start = time.time()
    run_dir = Path(run_dir)
    par = init_parallel(ep, cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accum, rem = divmod(cfg.tokens_per_step, cfg.batch_size * cfg.seq_len * par.world)
    if rem or accum < 1:
        raise ConfigError(
            f"TrainConfig.tokens_per_step: {cfg.tokens_per_step} is not a multiple of batch_size * seq_len * "
            f"world_size ({cfg.batch_size * cfg.seq_len * par.world})"
        )
    root, cache = resolve_data_root(data_root), default_cache_dir(cache_dir)
    if par.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        stored = run_dir / "config.json"
        if stored.is_file():
            _check_same_config(stored, cfg)
        else:
            atomic_write_text(stored, cfg.to_json())
        tok = prepare_tokenizer(cfg, run_dir, root, cache)
        _check_vocab(cfg, tok)
        corpus = tokenize_corpus(cfg.data.train_corpus, tok, root, cache, cfg.data.max_train_bytes)
    _barrier(par)
    if par.rank != 0:
        tok = Tokenizer.load(run_dir / "tokenizer")
        corpus = tokenize_corpus(cfg.data.train_corpus, tok, root, cache, cfg.data.max_train_bytes)
    sampler = TrainSampler(corpus, cfg.seq_len, cfg.batch_size, cfg.seed, par.rank, par.world)

    torch.manual_seed(cfg.seed)  # identical full weights everywhere before sharding: the 1-process init
    model = Transformer(cfg.model).to(par.device)
    net = parallelize(model, par, mode)
    optimizer = build_optimizer(model, cfg.optim)
    for g in optimizer.param_groups:  # foreach kernels reject a mix of DTensor (FSDP) and plain (expert) tensors
        g["foreach"] = False
    start = 0
    ckpts = list_distributed_checkpoints(run_dir)
    if ckpts:
        start = int(load_distributed(ckpts[-1][1], model, optimizer, par)["step"])
    if par.rank == 0:
        atomic_write_text(run_dir / "metrics.jsonl", "".join(l + "\n" for l in _read_jsonl(run_dir / "metrics.jsonl", start)))
    autocast = (torch.autocast(device_type=par.device.type, dtype=torch.bfloat16)
                if cfg.dtype == "bfloat16" else nullcontext())
    stop_at = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    keep = set(cfg.milestones)
    last = None
    for step in range(start, stop_at):
        t0 = time.time()
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if getattr(cfg.optim, "wd_off_at", 0) > 0:  # group 0 is the decayed one (build_optimizer)
            from mhmoe.train import weight_decay_at

            optimizer.param_groups[0]["weight_decay"] = weight_decay_at(step, cfg)
        sums = torch.zeros(3, dtype=torch.float64)  # loss, ce, aux
        for micro in range(accum):
            x, y = sampler.batch(step, micro)
            x, y = x.to(par.device), y.to(par.device)
            sync = net.no_sync() if mode == "ddp" and par.world > 1 and micro < accum - 1 else nullcontext()
            with sync:
                with autocast:
                    out = net(x, y)
                (out.loss / accum).backward()
            sums += torch.tensor([out.loss.item(), out.ce_loss.item(), out.aux_loss.item()], dtype=torch.float64) / accum
        if par.world > 1:
            sums = sums.to(par.device)
            dist.all_reduce(sums)
            sums = sums.cpu() / par.world
        loss, ce, aux = sums.tolist()
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {step + 1}; stopped without updating; lower optim.lr and rerun")
        sync_expert_grads(model, par)
        grad_norm = clip_grad_norm(model, par, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done, last = step + 1, loss
        if par.rank == 0:
            dt = time.time() - t0
            rec = {"step": done, "tokens": done * cfg.tokens_per_step, "loss": loss, "ce": ce, "aux": aux, "lr": lr,
                   "grad_norm": grad_norm, "tok_per_s": cfg.tokens_per_step / max(dt, 1e-9), "world": par.world,
                   "dp": par.dp, "ep": par.ep, "mode": mode}
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            if progress:
                print(f"step {done}/{cfg.steps} loss {loss:.4f} lr {lr:.2e} {rec['tok_per_s']:,.0f} tok/s",
                      file=sys.stderr, flush=True)
        if done % cfg.ckpt_every == 0 or done in keep or done == stop_at:
            save_distributed(run_dir / "dcp" / f"step_{done:07d}", model, optimizer, par, {"step": done})
            if par.rank == 0:
                for s, d in list_distributed_checkpoints(run_dir)[:-max(1, cfg.keep_checkpoints)]:
                    if s not in keep:
                        shutil.rmtree(d, ignore_errors=True)
    if par.rank == 0 and stop_at > start:
        consolidate(run_dir, stop_at)  # one process, no collectives: the others wait at the barrier
    _barrier(par)
    return {"step": stop_at, "loss": last, "wall_s": time.time() - t_start}


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
    from mhmoe.complexity import model_param_count, param_count

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


def memory_table(preset_name: str = "paper", variants: tuple[str, ...] = ("smoe", "mhmoe-h2", "mhmoe-h3"),
                 layouts: tuple[tuple[str, int, int, DPMode], ...] | None = None) -> str:
    """Markdown table of memory_per_gpu (GiB) for the preset's variants over typical layouts."""
    from mhmoe.complexity import model_param_count
    from mhmoe.presets import preset

    layouts = layouts or (
        ("1 GPU", 1, 1, "ddp"), ("1 node, DDP x8", 8, 1, "ddp"), ("1 node, FSDP x8", 8, 1, "fsdp"),
        ("1 node, FSDP x8 + EP 8", 8, 8, "fsdp"), ("2 nodes, FSDP x16 + EP 8", 16, 8, "fsdp"),
    )
    gib = 2 ** 30
    lines = ["| model | params | " + " | ".join(name for name, *_ in layouts) + " |",
             "|---|---:|" + "---:|" * len(layouts)]
    for v in variants:
        cfg = preset(preset_name, v).model
        cells = [f"{memory_per_gpu(cfg, w, e, m).total_bytes / gib:.2f}" for _, w, e, m in layouts]
        lines.append(f"| {v} | {model_param_count(cfg)['total'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI: python -m mhmoe.distributed {train,consolidate,memory}


def _cli_train(args: argparse.Namespace) -> int:
    from mhmoe.train import resolve_config

    cfg = resolve_config(args.preset, args.model, args.set or [], Path(args.out))
    res = train_parallel(cfg, args.out, args.data_root, args.cache_dir, args.ep, args.dp, not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finished at step {res['step']}/{cfg.steps} in {res['wall_s']:.1f}s; run directory: {args.out}")
    return 0


def _cli_consolidate(args: argparse.Namespace) -> int:
    print(f"wrote {consolidate(args.run_dir, args.step)}")
    return 0


def _cli_memory(args: argparse.Namespace) -> int:
    from mhmoe.presets import preset

    world = args.gpus * args.nodes
    ep = args.ep or min(args.gpus, preset(args.preset, "smoe").model.moe_ffn.num_experts)
    layouts = (("1 GPU", 1, 1, "ddp"), (f"DDP x{world}", world, 1, "ddp"), (f"FSDP x{world}", world, 1, "fsdp"),
               (f"FSDP x{world} + EP {ep}", world, ep, "fsdp"))
    print(f"GiB per GPU of fp32 parameters + gradients + AdamW moments (+ FSDP gather buffers), preset {args.preset}:")
    print(memory_table(args.preset, tuple(args.models.split(",")), layouts))
    print("\nall-to-all per token per MoE layer and direction (bf16):")
    for v in args.models.split(","):
        ffn = preset(args.preset, v).model.moe_ffn
        c = comm_volume_per_token(ffn, ep)
        print(f"  {v:<10} h={ffn.heads} top-{ffn.top_k}: {c['rows']:>2} rows x {ffn.head_dim:>4} = {c['values']:>5} values "
              f"= {c['bytes']:>5} B ({c['offrank_bytes']:,.0f} B off-rank at ep={ep}); SMoE top-{ffn.top_k}: "
              f"{ffn.top_k} rows x {ffn.dim} = {ffn.top_k * ffn.dim} values")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mhmoe.distributed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train under torchrun: DDP/FSDP2 x expert parallel, DCP checkpoints")
    t.add_argument("--preset", default=None)
    t.add_argument("--model", default=None)
    t.add_argument("--out", required=True)
    t.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides the number of processes)")
    t.add_argument("--dp", choices=["fsdp", "ddp"], default="fsdp", help="data parallelism of the dense parameters")
    t.add_argument("--set", action="append", metavar="KEY=VALUE")
    t.add_argument("--data-root", default=None)
    t.add_argument("--cache-dir", default=None)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cli_train)
    c = sub.add_parser("consolidate", help="DCP checkpoint -> RUN_DIR/checkpoints/step_N (one process)")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--step", type=int, default=None)
    c.set_defaults(func=_cli_consolidate)
    m = sub.add_parser("memory", help="memory per GPU and all-to-all volume for a preset")
    m.add_argument("--preset", default="paper")
    m.add_argument("--models", default="smoe,mhmoe-h2,mhmoe-h3")
    m.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    m.add_argument("--nodes", type=int, default=1)
    m.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: min(gpus, experts))")
    m.set_defaults(func=_cli_memory)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mhmoe.distributed`; user errors are one line and exit code 2."""
    from mhmoe.checkpoint import CheckpointError
    from mhmoe.data import DataError
    from mhmoe.train import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"mhmoe.distributed {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
