"""Distributed checkpoints (torch.distributed.checkpoint): saved by any world size, loaded by any other (one
process included, which is how `mhmoe consolidate` turns them into the single-process checkpoint layout).

A checkpoint directory RUN_DIR/dcp/step_N holds DCP's shards and .metadata, trainer.json (the caller's `extra`
plus the world size and ep degree that wrote it) and rank_R.pt (each rank's own state, e.g. its RNG).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.distributed.expert_parallel import expert_parallel_modules
from mhmoe.distributed.parallel import Parallel, barrier
from mhmoe.errors import CheckpointError

# torch.distributed.checkpoint and torch.distributed.tensor are imported where a checkpoint is written or read:
# together about 0.5 s of every process start, and most processes (one-process training, evaluation, the CLI's
# reports) never touch a distributed checkpoint.

# ----------------------------------------------------------------------------------------------------------
# Distributed checkpoints (torch.distributed.checkpoint): any world size in, any world size out


def _wrap_experts(sd: dict[str, Any], model: nn.Module, par: Parallel, optim: bool) -> dict[str, Any]:
    """Expert-parallel tensors as DTensor shards of the full [E, ...] tensors (dim 0 over ep, replicated over dp),
    so that DCP stores global tensors and can reshard them; 1-process (full) tensors are left as they are."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mods = expert_parallel_modules(model)
    if not mods:
        return sd

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
                     par: Parallel, extra: dict[str, Any] | None = None,
                     rank_state: dict[str, Any] | None = None) -> Path:
    """Write a DCP checkpoint (every rank its shards and `rank_state`; `extra` as trainer.json) atomically
    into `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if par.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(par)
    state = {"model": _wrap_experts(get_model_state_dict(model), model, par, optim=False)}
    if optimizer is not None:
        state["optim"] = _wrap_experts(get_optimizer_state_dict(model, optimizer), model, par, optim=True)
    dcp.save(state, checkpoint_id=str(tmp), no_dist=par.world == 1)
    if rank_state is not None:
        torch.save(rank_state, tmp / f"rank_{par.rank}.pt")
    barrier(par)
    if par.rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**(extra or {}), "world": par.world, "ep": par.ep}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    barrier(par)
    return path


def load_distributed(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     par: Parallel | None = None) -> dict[str, Any]:
    """Load a DCP checkpoint written at any world size / ep degree into this topology's model (and optimizer);
    returns its trainer.json. With par None (one process, no process group) the model holds full tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

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


def load_rank_state(path: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """The `rank_state` rank `rank` saved into checkpoint `path`, or None (another world size, or none saved)."""
    f = Path(path) / f"rank_{rank}.pt"
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None


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


def prune_distributed(run_dir: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete old DCP checkpoints except the newest max(1, keep_last) (the one to resume from) and `keep_steps`."""
    for step, d in list_distributed_checkpoints(run_dir)[:-max(1, keep_last)]:
        if step not in keep_steps:
            shutil.rmtree(d, ignore_errors=True)
