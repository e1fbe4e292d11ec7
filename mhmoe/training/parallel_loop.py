"""Training under torchrun (to be merged into the one loop).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from mhmoe.distributed.dcp import (
    _barrier,
    consolidate,
    list_distributed_checkpoints,
    load_distributed,
    save_distributed,
)
from mhmoe.distributed.parallel import DPMode, clip_grad_norm, init_parallel, parallelize, sync_expert_grads
from mhmoe.errors import ConfigError
from mhmoe.model import Transformer
from mhmoe.training.config import TrainConfig

# ----------------------------------------------------------------------------------------------------------
# Training under torchrun


def train_parallel(cfg: "TrainConfig", run_dir: str | os.PathLike, data_root: str | None = None, cache_dir: str | None = None,
                   ep: int = 1, mode: DPMode = "fsdp", progress: bool = True, stop_after: int | None = None) -> dict:
    """`mhmoe.train.train`'s loop (same batches, init, AdamW, schedule, clipping, metrics.jsonl) on a (dp x ep)
    grid: DDP or FSDP2 for the dense parameters, expert parallelism of degree `ep`; DCP checkpoints in
    RUN_DIR/dcp/step_N every cfg.ckpt_every steps and at the end, resumed at any world size, and the final one
    consolidated into RUN_DIR/checkpoints/ for `mhmoe eval` / `mhmoe export`. Returns {"step", "loss", "wall_s"}."""
    from mhmoe.data.cache import tokenize_corpus
    from mhmoe.data.corpora import resolve_data_root
    from mhmoe.data.sampler import TrainSampler
    from mhmoe.data.tokenizer import Tokenizer
    from mhmoe.errors import TrainingError
    from mhmoe.fileio import atomic_write_text
    from mhmoe.training.optim import build_optimizer, lr_at
    from mhmoe.training.rundir import (
        _check_same_config,
        _check_vocab,
        _read_jsonl,
        default_cache_dir,
        prepare_tokenizer,
    )

    t_start = time.time()
    run_dir = Path(run_dir)
    if cfg.model.moe_ffn.kind == "moe" and cfg.model.moe_ffn.uses_bias:  # routing (issue 16): no bias update here yet
        raise ConfigError("model.moe_ffn.balancing: 'bias'/'both' needs the bias update of `mhmoe train` "
                          "(mhmoe.training.loop), which this torchrun loop lacks until the loops merge; use "
                          "balancing='aux_loss' here")
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
            from mhmoe.training.optim import weight_decay_at

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
