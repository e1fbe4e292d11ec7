"""Training: AdamW, warmup + cosine/linear decay, clipping, accumulation, autocast, checkpoints, exact resume, on
one process or under torchrun: DDP, or FSDP2 and expert parallelism (`ParallelConfig`; mhmoe.distributed).

A run directory holds everything: config.json (resolved config), tokenizer/, metrics.jsonl (one line per step),
evals.jsonl (periodic validation loss), tb/ (TensorBoard), checkpoints/step_N/. Running the same command again
resumes from the newest good checkpoint and, on CPU, reproduces the uninterrupted run's losses bit for bit:
the batch of step s is a pure function of (seed, s), and model, optimizer, scheduler and RNG state are restored.
Under torchrun every rank draws the same global batch and takes its own rows (`micro_batches`); a run in which
no rank holds the whole model (FSDP2 or expert parallelism) checkpoints with torch.distributed.checkpoint into
dcp/step_N/ (resumable at any world size) and consolidates its newest one into checkpoints/ when it stops.
Whatever the layout, a run logs the same metrics and evaluations.
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
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from mhmoe.data.cache import TokenizedCorpus
from mhmoe.data.corpora import resolve_data_root
from mhmoe.data.pack import Pack, is_pack, load_corpus
from mhmoe.data.sampler import TrainSampler
from mhmoe.data.tokenizer import Tokenizer
from mhmoe.distributed.dcp import (
    list_distributed_checkpoints,
    load_distributed,
    load_rank_state,
    prune_distributed,
    save_distributed,
)
from mhmoe.distributed.parallel import (
    Parallel,
    ParallelConfig,
    barrier,
    dist_env,
    init_parallel,
    parallelize,
    together,
)
from mhmoe.errors import TrainingError, UserError
from mhmoe.fileio import atomic_write_text
from mhmoe.model import Transformer
from mhmoe.training.checkpoint import (
    RunBusy,
    latest_good_checkpoint,
    load_model_weights,
    prune,
    run_lock,
    save_checkpoint,
    step_dir,
    verify,
)
from mhmoe.training.compile import CompileMode, compile_model, resolve_compile
from mhmoe.training.config import TrainConfig, micro_batches
from mhmoe.training.consolidate import consolidate
from mhmoe.training.device import cpu_has_fast_bf16, resolve_device
from mhmoe.training.evaluate import evaluate_corpus
from mhmoe.training.optim import (
    adamw_implementation,
    apply_schedule,
    build_optimizer,
    set_adamw_implementation,
    step_optimizer,
)
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
from mhmoe.training.step import train_step


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
    parallel: ParallelConfig | None = None,
) -> RunState:
    """Train (or resume) the run in `run_dir` until cfg.steps; `stop_after` ends early after that step.

    parallel: the layout under torchrun (default: DDP, or one process without torchrun). Rank 0 holds the run
    directory's lock throughout; raises UserError if another process is training it. Every error that stops
    one rank before training starts stops all of them, with the same message.
    """
    parallel = parallel or ParallelConfig()
    env = dist_env()
    # What can be judged without the run directory is judged here, alike on every rank and before a process
    # group exists: a rank refusing alone would leave the others waiting for it.
    parallel.check(env.world, cfg.model)
    micro, accum = micro_batches(cfg, env.world)
    device = resolve_device(cfg)
    compile_mode = resolve_compile(cfg, device, env.world)  # a refused "cudagraphs": said before RUN_DIR exists
    root = resolve_data_root(data_root, cfg.preset)  # a missing or too-small data root: say so before RUN_DIR exists
    if is_pack(root):  # so is a pack built for another config
        Pack(root).check(cfg.data)
    started = env.world > 1 and not dist.is_initialized()
    par = init_parallel(parallel, device, env)
    try:
        with ExitStack() as stack:
            return _train(cfg, Path(run_dir), root, default_cache_dir(cache_dir), progress, stop_after, par,
                          micro, accum, stack, compile_mode)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, run_dir: Path, root: Path, cache: Path, progress: bool, stop_after: int | None,
           par: Parallel, micro: int, accum: int, stack: ExitStack, compile_mode: CompileMode) -> RunState:
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config_json = cfg.to_json()
    evaluating = par.rank == 0 or par.sharded  # sharded models need every rank in each forward
    eval_names = list(cfg.data.eval_domains) if cfg.eval_tokens else []

    def corpora(tok: Tokenizer) -> tuple[TokenizedCorpus, dict[str, TokenizedCorpus]]:
        train_corpus = load_corpus(cfg.data.train_corpus, tok, root, cache, cfg.data.max_train_bytes)
        evals = {name: load_corpus(name, tok, root, cache, eval_bytes(cfg, cfg.eval_tokens), cfg.eval_tokens)
                 for name in (eval_names if evaluating else [])}
        return train_corpus, evals

    def prepare() -> Any:  # rank 0 writes the run directory, the tokenizer and the token caches first
        if par.rank != 0:
            return None
        try:
            stack.enter_context(run_lock(run_dir))
        except RunBusy as e:
            raise UserError(f"--out: {e}") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        stored = run_dir / "config.json"
        if stored.is_file():
            _check_same_config(stored, cfg)
        else:
            atomic_write_text(stored, config_json)
        tok = prepare_tokenizer(cfg, run_dir, root, cache)
        _check_vocab(cfg, tok)
        return (tok, *corpora(tok))

    prepared = together(par, prepare)

    def load() -> Any:  # then the other ranks read them
        if par.rank == 0:
            return prepared
        tok = Tokenizer.load(run_dir / "tokenizer")
        return (tok, *corpora(tok))

    tok, train_corpus, eval_corpora = together(par, load)
    wall_path = run_dir / "train_wall.json"
    wall0 = _read_wall(wall_path)

    sampler = TrainSampler(train_corpus, cfg.seq_len, micro, cfg.seed, par.rank, par.world)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (sharded: before sharding) and resume
    model = Transformer(cfg.model).to(par.device)
    net = parallelize(model, par) if par.sharded else model  # FSDP2 / expert shards: before the optimizer
    optimizer = build_optimizer(model, cfg.optim)  # fused on CUDA, foreach on CPU, a loop over DTensors
    routing = RoutingMonitor(model, cfg, par.device)
    start = _resume(run_dir, model, optimizer, par, routing)
    # A loaded state dict brings its groups' flags (a checkpoint from before fused AdamW): this run's choice wins.
    set_adamw_implementation(optimizer, adamw_implementation(model.parameters()))
    if par.rank == 0:  # drop log lines written after the checkpoint we resume from
        for name in ("metrics.jsonl", "evals.jsonl"):
            atomic_write_text(run_dir / name, "".join(l + "\n" for l in _read_jsonl(run_dir / name, start)))
    if start >= cfg.steps:
        return RunState(start, True, None, time.time() - t_start)

    if not par.sharded:
        net = parallelize(model, par)  # DDP under torchrun, the model itself on one process
    net = compile_model(net, cfg, par.device, par.world)  # TrainConfig.compile, resolved above
    autocast = (torch.autocast(device_type=par.device.type, dtype=torch.bfloat16)
                if cfg.dtype == "bfloat16" else nullcontext())
    # Said after the first step, with its time: stderr holds nothing but the error of a run that fails before.
    warn_slow_bf16 = (cfg.dtype == "bfloat16" and par.device.type == "cpu" and par.rank == 0
                      and not cpu_has_fast_bf16())

    writer = pbar = None
    if par.rank == 0:
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1)
        pbar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"{cfg.variant}", unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    last_loss = None
    stop_at = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    keep = set(cfg.milestones)
    try:
        for step in range(start, stop_at):
            t0 = time.time()
            lr = apply_schedule(optimizer, step, cfg)
            m = train_step(step, net, model, sampler, accum, par, cfg.optim.grad_clip, autocast, routing,
                           compile_mode)
            if not math.isfinite(m["loss"]):  # the same all-reduced loss on every rank: all of them stop here
                raise TrainingError(
                    f"loss is {m['loss']} at step {step + 1}; stopped without updating. The last good checkpoint "
                    f"(step {_last_good(run_dir, par)}) is kept in {run_dir}; lower optim.lr or raise "
                    "optim.warmup_steps and rerun"
                )
            step_optimizer(optimizer, compile_mode)
            done = step + 1
            last_loss = m["loss"]
            dt = time.time() - t0
            if warn_slow_bf16 and step == start:
                print(f"mhmoe train: warning: TrainConfig.dtype=bfloat16 on a CPU without native bf16 (no "
                      f"AVX512-BF16/AMX): matmuls run ~100x slower than in float32 (step {done} took {dt:.1f} s); "
                      "use --set dtype=float32", file=sys.stderr, flush=True)
            if par.rank == 0:
                rec = {"step": done, "tokens": done * cfg.tokens_per_step, "loss": m["loss"], "ce": m["ce"],
                       "aux": m["aux"], "lb": m["lb"], "z": m["z"], "router_entropy": m["router_entropy"],
                       "dropped": m["dropped"], "lr": lr, "grad_norm": m["grad_norm"],
                       "tok_per_s": cfg.tokens_per_step / max(dt, 1e-9),
                       "expert_load_max_over_mean": m["expert_load_max_over_mean"],
                       "tokens_per_expert": m["tokens_per_expert"]}
                added = [k for k in m if k not in rec]  # per-layer routing health and later additions: after these
                rec.update((k, m[k]) for k in added)
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                for k in ("loss", "ce", "aux", "lb", "z", "router_entropy", "lr", "grad_norm", "tok_per_s",
                          *(k for k in added if isinstance(m[k], float))):
                    writer.add_scalar(f"train/{k}", rec[k], done)
                routing.log_scalars(writer, rec, done)
                pbar.update(1)
                pbar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rec['tok_per_s']:,.0f}", refresh=False)
            eval_due = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
            if evaluating and cfg.eval_tokens and eval_due:
                _periodic_eval(model, cfg, done, eval_corpora, par, run_dir, writer)
            if done % cfg.ckpt_every == 0 or done in keep:
                _save(run_dir, done, model, optimizer, par, cfg, config_json, keep, routing)
                if par.rank == 0:
                    _write_wall(wall_path, wall0 + time.time() - t_start)
                barrier(par)
    finally:
        if pbar is not None:
            pbar.close()
        if writer is not None:
            writer.close()
        if par.rank == 0:
            _write_wall(wall_path, wall0 + time.time() - t_start)
    if par.sharded:
        together(par, lambda: _consolidate_newest(run_dir) if par.rank == 0 else None)
    return RunState(stop_at, stop_at >= cfg.steps, last_loss, time.time() - t_start)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: native (one process, DDP) or distributed (FSDP2, expert parallel)


def _rng_state(par: Parallel) -> dict[str, Any]:
    return {"rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if par.device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any] | None, par: Parallel) -> None:
    if state is None:  # a distributed checkpoint from another world size: the RNG goes on from the seed
        return
    torch.set_rng_state(state["rng_cpu"].cpu())  # trainer.pt is loaded onto the run's device
    if par.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"].cpu())


def _resume(run_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer, par: Parallel,
            routing: RoutingMonitor) -> int:
    """Load the newest checkpoint of this run's kind into model and optimizer; returns its step (0: none)."""
    if par.sharded:
        found = list_distributed_checkpoints(run_dir)
        if not found:
            return 0
        step, path = found[-1]
        load_distributed(path, model, optimizer, par)
        rank_state = load_rank_state(path, par.rank)
        _set_rng_state(rank_state, par)
        routing.load_state_dict((rank_state or {}).get("routing"), step)  # another world size: the window restarts
        return step
    found_native = latest_good_checkpoint(run_dir)
    if found_native is None:
        return 0
    step, ckpt = found_native
    load_model_weights(model, ckpt)
    state = torch.load(ckpt / "trainer.pt", map_location=par.device, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state, par)
    routing.load_state_dict(state.get("routing"), step)
    return step


def _save(run_dir: Path, done: int, model: Transformer, optimizer: torch.optim.Optimizer, par: Parallel,
          cfg: TrainConfig, config_json: str, keep: set[int], routing: RoutingMonitor) -> None:
    if par.sharded:
        save_distributed(run_dir / "dcp" / f"step_{done:07d}", model, optimizer, par, {"step": done},
                         {**_rng_state(par), "routing": routing.state_dict()})
        if par.rank == 0:
            prune_distributed(run_dir, cfg.keep_checkpoints, keep)
    elif par.rank == 0:
        save_checkpoint(run_dir, done, model, {"optimizer": optimizer.state_dict(), **_rng_state(par), "step": done,
                                               "routing": routing.state_dict()}, config_json)
        prune(run_dir, cfg.keep_checkpoints, keep)


def _last_good(run_dir: Path, par: Parallel) -> int:
    if par.sharded:
        found = list_distributed_checkpoints(run_dir)
        return found[-1][0] if found else 0
    good = latest_good_checkpoint(run_dir)
    return good[0] if good else 0


def _consolidate_newest(run_dir: Path) -> None:
    """The newest distributed checkpoint as a native one, for `mhmoe eval` / `mhmoe export` (once)."""
    found = list_distributed_checkpoints(run_dir)
    if found and (not step_dir(run_dir, found[-1][0]).is_dir() or verify(step_dir(run_dir, found[-1][0]))):
        consolidate(run_dir, found[-1][0])


# ----------------------------------------------------------------------------------------------------------
# Periodic evaluation


def _periodic_eval(model: torch.nn.Module, cfg: TrainConfig, step: int, corpora: dict[str, TokenizedCorpus],
                   par: Parallel, run_dir: Path, writer: SummaryWriter | None) -> None:
    """Validation loss of every eval domain on `cfg.eval_tokens` tokens; rank 0 logs it. Sharded models are
    evaluated by every rank on the same windows (each forward needs all of them), replicated ones by rank 0."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    rec: dict[str, Any] = {"step": step, "tokens": step * cfg.tokens_per_step}
    for name, corpus in corpora.items():
        rec[name] = evaluate_corpus(model, corpus, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, par.device,
                                    dtype)["loss"]
    if par.rank == 0:
        for name in corpora:
            writer.add_scalar(f"val/{name}", rec[name], step)
        with open(run_dir / "evals.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
