"""`mhmoe consolidate`: a sharded run's distributed checkpoint as a native single-process checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mhmoe.distributed.dcp import list_distributed_checkpoints, load_distributed, load_rank_state
from mhmoe.errors import CheckpointError
from mhmoe.model import Transformer
from mhmoe.training.checkpoint import save_checkpoint
from mhmoe.training.optim import build_optimizer
from mhmoe.training.rundir import load_config


def consolidate(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """Reshard the DCP checkpoint `step` (default: newest) of a parallel run into one process and write it as a
    native checkpoint RUN_DIR/checkpoints/step_N (model.safetensors + trainer.pt), which `mhmoe eval`,
    `mhmoe export` and a 1-process `mhmoe train` (resume) read. Returns the checkpoint directory.

    Runs in one process without a process group, so rank 0 of a training job calls it while the others wait.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    found = dict(list_distributed_checkpoints(run_dir))
    if not found:
        raise CheckpointError(f"RUN_DIR: {run_dir} has no distributed checkpoint (dcp/step_N); train it with "
                              "--dp fsdp or --ep N under torchrun first")
    if step is None:
        step = max(found)
    if step not in found:
        raise CheckpointError(f"--step: no distributed checkpoint at step {step} in {run_dir}; available: "
                              f"{sorted(found)}")
    with torch.random.fork_rng(devices=[]):
        model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    info = load_distributed(found[step], model, optimizer)
    for g in optimizer.param_groups:  # the sharded run steps per parameter (mixed DTensors); one process: foreach
        g["foreach"] = True
    rank0 = load_rank_state(found[step], 0) or {}
    state = {"optimizer": optimizer.state_dict(), "rng_cpu": rank0.get("rng_cpu", torch.get_rng_state()),
             "rng_cuda": None, "step": step,
             "source": {"dcp": str(found[step]), "world": info.get("world"), "ep": info.get("ep")}}
    return save_checkpoint(run_dir, step, model, state, cfg.to_json())
