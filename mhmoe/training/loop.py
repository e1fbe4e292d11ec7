"""Training: AdamW, warmup + cosine/linear decay, clipping, accumulation, autocast, checkpoints, exact resume.

A run directory holds everything: config.json (resolved config), tokenizer/, metrics.jsonl (one line per step),
evals.jsonl (periodic validation loss), tb/ (TensorBoard), checkpoints/step_N/. Running the same command again
resumes from the newest good checkpoint and, on CPU, reproduces the uninterrupted run's losses bit for bit:
the batch of step s is a pure function of (seed, s), and model, optimizer, scheduler and RNG state are restored.
Under torchrun every rank draws the same global batch and takes its own rows (DDP averages the gradients).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mhmoe.data.cache import tokenize_corpus
from mhmoe.data.corpora import resolve_data_root
from mhmoe.data.tokenizer import Tokenizer
from mhmoe.errors import ConfigError, TrainingError, UserError
from mhmoe.fileio import atomic_write_text
from mhmoe.model import Transformer
from mhmoe.training.checkpoint import (
    RunBusy,
    latest_good_checkpoint,
    load_model_weights,
    prune,
    run_lock,
    save_checkpoint,
)
from mhmoe.training.config import TrainConfig
from mhmoe.training.device import cpu_has_fast_bf16, resolve_device
from mhmoe.training.optim import build_optimizer, lr_at, weight_decay_at
from mhmoe.training.routing_health import RoutingMonitor
from mhmoe.training.rundir import (
    _check_same_config,
    _check_vocab,
    _read_jsonl,
    _read_wall,
    _write_wall,
    default_cache_dir,
    eval_bytes,
    prepare_tokenizer,
)


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


@dataclass
class RunState:
    """Where a run stands after `train` returns."""

    step: int
    finished: bool
    last_loss: float | None
    wall_s: float


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(
    cfg: TrainConfig, run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None, progress: bool = True, stop_after: int | None = None,
) -> RunState:
    """Train (or resume) the run in `run_dir` until cfg.steps; `stop_after` ends early after that step.

    Rank 0 holds the run directory's lock throughout; raises UserError if another process is training it.
    """
    resolve_data_root(data_root, cfg.preset)  # a missing or too-small data root: say so before the lock makes RUN_DIR
    with ExitStack() as stack:
        if _dist_info()[0] == 0:
            try:
                stack.enter_context(run_lock(Path(run_dir)))
            except RunBusy as e:
                raise UserError(f"--out: {e}") from None
        return _train(cfg, Path(run_dir), data_root, cache_dir, progress, stop_after)


def _train(cfg: TrainConfig, run_dir: Path, data_root: str | os.PathLike | None,
           cache_dir: str | os.PathLike | None, progress: bool, stop_after: int | None) -> RunState:
    t_start = time.time()
    run_dir = Path(run_dir)
    wall_path = run_dir / "train_wall.json"
    wall0 = _read_wall(wall_path)
    rank, world = _dist_info()
    device = resolve_device(cfg)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accum, rem = divmod(cfg.tokens_per_step, cfg.batch_size * cfg.seq_len * world)
    if rem or accum < 1:
        raise ConfigError(
            f"TrainConfig.tokens_per_step: {cfg.tokens_per_step} is not a multiple of batch_size * seq_len * "
            f"world_size ({cfg.batch_size * cfg.seq_len * world})"
        )
    root = resolve_data_root(data_root, cfg.preset)
    cache = default_cache_dir(cache_dir)
    config_json = cfg.to_json()

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        stored = run_dir / "config.json"
        if stored.is_file():
            _check_same_config(stored, cfg)
        else:
            atomic_write_text(stored, config_json)
        tok = prepare_tokenizer(cfg, run_dir, root, cache)
        _check_vocab(cfg, tok)
        train_corpus = tokenize_corpus(cfg.data.train_corpus, tok, root, cache, cfg.data.max_train_bytes)
    if world > 1:
        dist.barrier()
    if rank != 0:
        tok = Tokenizer.load(run_dir / "tokenizer")
        train_corpus = tokenize_corpus(cfg.data.train_corpus, tok, root, cache, cfg.data.max_train_bytes)

    from mhmoe.data.sampler import TrainSampler

    sampler = TrainSampler(train_corpus, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every resume
    model = Transformer(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim)

    start = 0
    found = latest_good_checkpoint(run_dir)
    if found is not None:
        start = found[0]
    routing = RoutingMonitor(model, cfg, device, start)  # routing (issue 16): health, bias update, dead experts
    if found is not None:
        ckpt = found[1]
        load_model_weights(model, ckpt)  # the routers' aux-loss-free biases included
        state = torch.load(ckpt / "trainer.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        routing.load_state_dict(state.get("routing"))  # routing (issue 16)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
    if rank == 0:  # drop log lines written after the checkpoint we resume from
        for name in ("metrics.jsonl", "evals.jsonl"):
            atomic_write_text(run_dir / name, "".join(l + "\n" for l in _read_jsonl(run_dir / name, start)))
    if start >= cfg.steps:
        return RunState(start, True, None, time.time() - t_start)

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if cfg.compile:
        net = torch.compile(net)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if cfg.dtype == "bfloat16" else nullcontext())
    if cfg.dtype == "bfloat16" and device.type == "cpu" and rank == 0 and not cpu_has_fast_bf16():
        print("mhmoe train: warning: TrainConfig.dtype=bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX) "
              "runs matmuls ~100x slower than float32; use --set dtype=float32", file=sys.stderr, flush=True)

    writer = pbar = None
    eval_corpora: dict[str, Any] = {}
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1)
        pbar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"{cfg.variant}", unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    last_loss = None
    stop_at = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    keep = set(cfg.milestones)
    try:
        for step in range(start, stop_at):
            t0 = time.time()
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if cfg.optim.wd_off_at > 0:  # group 0 is the decayed one (build_optimizer)
                optimizer.param_groups[0]["weight_decay"] = weight_decay_at(step, cfg)
            sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "lb": 0.0, "z": 0.0, "entropy": 0.0, "dropped": 0.0}
            for micro in range(accum):
                x, y = sampler.batch(step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = nullcontext() if world == 1 or micro == accum - 1 else net.no_sync()
                with sync:
                    with autocast:
                        out = net(x, y)
                    (out.loss / accum).backward()
                sums["loss"] += out.loss.item() / accum
                sums["ce"] += out.ce_loss.item() / accum
                sums["aux"] += out.aux_loss.item() / accum
                n_moe = max(1, len(out.aux))
                for a in out.aux:
                    sums["lb"] += a.lb_loss.item() / accum / n_moe
                    sums["z"] += a.z_loss.item() / accum / n_moe
                    sums["entropy"] += a.router_entropy.item() / accum / n_moe
                    sums["dropped"] += a.dropped_fraction.item() / accum / n_moe
                routing.add(out.aux)  # routing (issue 16): the step's loads and health, summed on the device
            if world > 1:
                t = torch.tensor([sums["loss"], sums["ce"]], device=device, dtype=torch.float64)
                dist.all_reduce(t)
                sums["loss"], sums["ce"] = (t / world).tolist()
            if not math.isfinite(sums["loss"]):
                good = latest_good_checkpoint(run_dir)
                raise TrainingError(
                    f"loss is {sums['loss']} at step {step + 1}; stopped without updating. The last good checkpoint "
                    f"(step {good[0] if good else 0}) is kept in {run_dir}; lower optim.lr or raise "
                    "optim.warmup_steps and rerun"
                )
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item()
                         if cfg.optim.grad_clip > 0 else float("nan"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            routing.end_step(done)  # routing (issue 16): loads summed over ranks, bias update, dead experts
            last_loss = sums["loss"]
            dt = time.time() - t0
            if rank == 0:
                rec = {"step": done, "tokens": done * cfg.tokens_per_step, "loss": sums["loss"], "ce": sums["ce"],
                       "aux": sums["aux"], "lb": sums["lb"], "z": sums["z"], "router_entropy": sums["entropy"],
                       "dropped": sums["dropped"], "lr": lr, "grad_norm": grad_norm,
                       "tok_per_s": cfg.tokens_per_step / max(dt, 1e-9),
                       **routing.record()}  # routing (issue 16): per-layer health and loads, one conversion
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                for k in ("loss", "ce", "aux", "lb", "z", "router_entropy", "lr", "grad_norm", "tok_per_s"):
                    writer.add_scalar(f"train/{k}", rec[k], done)
                routing.log_scalars(writer, rec, done)  # routing (issue 16)
                pbar.update(1)
                pbar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{rec['tok_per_s']:,.0f}", refresh=False)
                if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                    _periodic_eval(model, cfg, done, run_dir, tok, root, cache, eval_corpora, device, writer)
            if done % cfg.ckpt_every == 0 or done in keep:
                if rank == 0:
                    state = {"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                             "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                             "step": done, "routing": routing.state_dict()}  # routing (issue 16)
                    save_checkpoint(run_dir, done, model, state, config_json)
                    prune(run_dir, cfg.keep_checkpoints, keep)
                    _write_wall(wall_path, wall0 + time.time() - t_start)
                if world > 1:
                    dist.barrier()
    finally:
        if pbar is not None:
            pbar.close()
        if writer is not None:
            writer.close()
        if rank == 0:
            _write_wall(wall_path, wall0 + time.time() - t_start)
    final = stop_at
    return RunState(final, final >= cfg.steps, last_loss, time.time() - t_start)


def _periodic_eval(model, cfg, step, run_dir, tok, root, cache, corpora, device, writer) -> None:  # noqa: ANN001
    from mhmoe.training.evaluate import evaluate_corpus

    if not cfg.eval_tokens:
        return
    rec: dict[str, Any] = {"step": step, "tokens": step * cfg.tokens_per_step}
    for name in cfg.data.eval_domains:
        if name not in corpora:
            corpora[name] = tokenize_corpus(name, tok, root, cache, eval_bytes(cfg, cfg.eval_tokens))
        r = evaluate_corpus(model, corpora[name], cfg.seq_len, cfg.batch_size, cfg.eval_tokens, device,
                            torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
        rec[name] = r["loss"]
        writer.add_scalar(f"val/{name}", r["loss"], step)
    with open(run_dir / "evals.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
