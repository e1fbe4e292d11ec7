"""Training: AdamW, warmup + cosine/linear decay, clipping, accumulation, autocast, checkpoints, exact resume.

A run directory holds everything: config.json (resolved config), tokenizer/, metrics.jsonl (one line per step),
evals.jsonl (periodic validation loss), tb/ (TensorBoard), checkpoints/step_N/. Running the same command again
resumes from the newest good checkpoint and, on CPU, reproduces the uninterrupted run's losses bit for bit:
the batch of step s is a pure function of (seed, s), and model, optimizer, scheduler and RNG state are restored.
Under torchrun every rank draws the same global batch and takes its own rows (DDP averages the gradients).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from mhmoe.checkpoint import (
    RunBusy, find_checkpoint, latest_good_checkpoint, load_model_weights, prune, run_lock, save_checkpoint,
)
from mhmoe.configbase import Config, ConfigError
from mhmoe.data import DataConfig, Tokenizer, build_tokenizer, resolve_data_root, tokenize_corpus
from mhmoe.errors import MhmoeError, UserError
from mhmoe.fileio import atomic_write_text
from mhmoe.model import ModelConfig, Transformer


class TrainingError(MhmoeError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the run directory keeps its last good checkpoint."""


@dataclass(frozen=True)
class OptimConfig(Config):
    """AdamW with decoupled weight decay and a warmup + decay schedule."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant", "two_stage"] = "cosine"
    grad_clip: float = 1.0
    # BitNet b1.58 recipe (two_stage): the cosine until mid-training, then a drop to stage2_lr_ratio * lr and a
    # second cosine down to min_lr; wd_off_at > 0 sets the weight decay to 0 from that fraction of the steps on.
    stage2_lr_ratio: float = 0.33
    wd_off_at: float = 0.0

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"OptimConfig.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"OptimConfig.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("OptimConfig.warmup_steps/weight_decay/grad_clip: must be >= 0 (grad_clip 0 = off)")
        if self.schedule == "two_stage" and not self.min_lr_ratio <= self.stage2_lr_ratio <= 1:
            raise ConfigError(f"OptimConfig.stage2_lr_ratio: must be in [min_lr_ratio, 1], got {self.stage2_lr_ratio}")
        if not 0 <= self.wd_off_at <= 1:
            raise ConfigError(f"OptimConfig.wd_off_at: must be in [0, 1] (0 = never), got {self.wd_off_at}")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Everything a run needs; saved as RUN_DIR/config.json."""

    preset: str = "custom"
    variant: str = "smoe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch per process
    seq_len: int = 256
    tokens_per_step: int = 4096  # global batch; accumulation = tokens_per_step / (batch_size * seq_len * world)
    seed: int = 1337
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compile: bool = False
    eval_every: int = 0  # steps between validation-loss points in evals.jsonl (0 = only at the end)
    eval_tokens: int = 16_384  # tokens per domain for those points
    ckpt_every: int = 100
    keep_checkpoints: int = 2  # newest ones kept, besides the 50% and 100% milestones
    threads: int = 0  # torch.set_num_threads (0 = torch's default)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "tokens_per_step", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"TrainConfig.seq_len: {self.seq_len} exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.tokens_per_step % (self.batch_size * self.seq_len):
            raise ConfigError(
                f"TrainConfig.tokens_per_step: {self.tokens_per_step} must be a multiple of batch_size * seq_len "
                f"({self.batch_size * self.seq_len})"
            )
        if self.eval_every < 0 or self.eval_tokens < 0 or self.threads < 0 or self.keep_checkpoints < 0:
            raise ConfigError("TrainConfig.eval_every/eval_tokens/threads/keep_checkpoints: must be >= 0")

    @property
    def milestones(self) -> tuple[int, int]:
        """Steps evaluated by `mhmoe reproduce`: 50% and 100% (the paper's 50k / 100k columns)."""
        return (max(1, self.steps // 2), self.steps)


# ----------------------------------------------------------------------------------------------------------
# Pieces


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    mid = cfg.steps // 2
    if o.schedule == "two_stage" and step >= mid:  # stage 2: a lower peak, cosine down to min_lr
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - mid) / max(1, cfg.steps - mid))))
        return o.lr * (o.min_lr_ratio + (o.stage2_lr_ratio - o.min_lr_ratio) * decay)
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule != "linear" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * decay)


def weight_decay_at(step: int, cfg: TrainConfig) -> float:
    """Weight decay of the decayed parameter group at `step`: optim.weight_decay, 0 from wd_off_at * steps on."""
    o = cfg.optim
    return 0.0 if o.wd_off_at > 0 and step >= o.wd_off_at * cfg.steps else o.weight_decay


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and embeddings (and the tied LM head)."""
    decay, no_decay = [], []
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embed_ids or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TrainConfig.device: 'cuda' requested but no CUDA device is available; use device=cpu")
    return torch.device(cfg.device)


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16, AMX or Arm BF16); True when it cannot tell.

    Without it torch's CPU bf16 matmul takes a slow fallback: 0.4 GFLOP/s against 56 in fp32 on the project's
    AVX2 machine (benchmarks/RESULTS.md), so bf16 there is a trap rather than a speed-up.
    cpuinfo: the text of /proc/cpuinfo (read when None).
    """
    text = cpuinfo
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return True
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    if not flags:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Token caches and trained tokenizers: --cache-dir, $MHMOE_CACHE_DIR, or ~/.cache/mhmoe."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("MHMOE_CACHE_DIR") or Path.home() / ".cache" / "mhmoe")


def prepare_tokenizer(cfg: TrainConfig, run_dir: Path, root: Path, cache_dir: Path) -> Tokenizer:
    """The run's tokenizer: RUN_DIR/tokenizer if present, else trained once per settings (cached) and saved there."""
    import hashlib

    from mhmoe.data import corpus_files

    run_tok = run_dir / "tokenizer"
    if (run_tok / "tokenizer.json").is_file():
        return Tokenizer.load(run_tok)
    d = cfg.data
    files = corpus_files(d.train_corpus, root)
    key_src = json.dumps([d.tokenizer, d.vocab_size, d.tokenizer_train_bytes, d.train_corpus,
                          [(str(p.relative_to(root)), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cached = cache_dir / "tokenizers" / f"{d.tokenizer}-{key}"
    if (cached / "tokenizer.json").is_file():
        tok = Tokenizer.load(cached)
    else:
        tok = build_tokenizer(d, root)
        cached.mkdir(parents=True, exist_ok=True)
        tok.save(cached)
    run_tok.mkdir(parents=True, exist_ok=True)
    tok.save(run_tok)
    return tok


def eval_bytes(cfg: TrainConfig, max_tokens: int) -> int:
    """Raw text to tokenise for an eval of `max_tokens` tokens (0 = all): ~8 bytes per token, twice what BPE
    needs, so the first max_tokens tokens equal those of the whole domain."""
    return 8 * (max_tokens + cfg.seq_len + 1) if max_tokens else 0


def _check_vocab(cfg: TrainConfig, tok: Tokenizer) -> None:
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({tok.vocab_size}); "
            f"set model.vocab_size >= {tok.vocab_size}"
        )


def _read_jsonl(path: Path, max_step: int) -> list[str]:
    """Lines of a metrics file with step <= max_step (a torn last line from a crash is dropped)."""
    keep = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= max_step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    return keep


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

    from mhmoe.data import TrainSampler

    sampler = TrainSampler(train_corpus, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every resume
    model = Transformer(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim)

    start = 0
    found = latest_good_checkpoint(run_dir)
    if found is not None:
        start, ckpt = found
        load_model_weights(model, ckpt)
        state = torch.load(ckpt / "trainer.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
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
            loads: list[torch.Tensor] = []
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
                if not loads:
                    loads = [a.tokens_per_expert.detach().clone() for a in out.aux]
                else:
                    loads = [l + a.tokens_per_expert for l, a in zip(loads, out.aux)]
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
            last_loss = sums["loss"]
            dt = time.time() - t0
            if rank == 0:
                rec = {"step": done, "tokens": done * cfg.tokens_per_step, "loss": sums["loss"], "ce": sums["ce"],
                       "aux": sums["aux"], "lb": sums["lb"], "z": sums["z"], "router_entropy": sums["entropy"],
                       "dropped": sums["dropped"], "lr": lr, "grad_norm": grad_norm,
                       "tok_per_s": cfg.tokens_per_step / max(dt, 1e-9),
                       "expert_load_max_over_mean": [float(l.max() / l.float().mean()) for l in loads],
                       "tokens_per_expert": [l.tolist() for l in loads]}
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                for k in ("loss", "ce", "aux", "lb", "z", "router_entropy", "lr", "grad_norm", "tok_per_s"):
                    writer.add_scalar(f"train/{k}", rec[k], done)
                pbar.update(1)
                pbar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{rec['tok_per_s']:,.0f}", refresh=False)
                if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                    _periodic_eval(model, cfg, done, run_dir, tok, root, cache, eval_corpora, device, writer)
            if done % cfg.ckpt_every == 0 or done in keep:
                if rank == 0:
                    state = {"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                             "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                             "step": done}
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
    from mhmoe.evaluate import evaluate_corpus

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


def _read_wall(path: Path) -> float:
    """Wall seconds recorded by the earlier invocations of a run (0 for a new run)."""
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _write_wall(path: Path, seconds: float) -> None:
    """Record the run's training wall time so far: written at every checkpoint as well as at the end, because a
    SIGTERM/SIGKILL skips `finally` and would otherwise lose a killed invocation's time."""
    atomic_write_text(path, json.dumps({"wall_s": seconds}))


RUNTIME_FIELDS = ("threads", "compile", "keep_checkpoints")


def _check_same_config(stored: Path, cfg: TrainConfig) -> None:
    try:
        # Through TrainConfig, so that fields added since the run started compare at their defaults.
        old = json.loads(TrainConfig.from_dict(json.loads(stored.read_text(encoding="utf-8"))).to_json())
    except ValueError as e:
        raise UserError(f"{stored}: unreadable run config ({e}); restore it or use a new --out") from None
    new = json.loads(cfg.to_json())
    for key in RUNTIME_FIELDS:  # how to run, not what is trained: may change between invocations
        old.pop(key, None)
        new.pop(key, None)

    def diff(a: Any, b: Any, path: str = "") -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                d = diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
                if d:
                    return d
            return None
        return None if a == b else f"{path}: {a!r} in the run, {b!r} now"

    d = diff(old, new)
    if d:
        raise UserError(
            f"--out: {stored.parent} holds a run with a different config ({d}); use a new --out or the same flags"
        )


# ----------------------------------------------------------------------------------------------------------
# Loading a run for evaluation / export


@dataclass
class LoadedRun:
    cfg: TrainConfig
    model: Transformer
    step: int
    device: torch.device
    dtype: torch.dtype
    tokenizer: Tokenizer
    root: Path
    cache: Path

    def corpus(self, name: str, max_tokens: int = 0):  # noqa: ANN201
        return tokenize_corpus(name, self.tokenizer, self.root, self.cache, eval_bytes(self.cfg, max_tokens))


def load_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"RUN_DIR: {run_dir} has no config.json; pass the --out of a `mhmoe train` run")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def load_run_for_eval(run_dir: Path, step: int | None = None, data_root: str | None = None,
                      cache_dir: str | None = None) -> LoadedRun:
    """The run's model at `step` (or its newest good checkpoint), on the run's device, in eval mode; for a
    `mhmoe export` directory, its integer ternary model on the CPU."""
    from mhmoe.export import is_export_dir, load_exported_run

    if is_export_dir(run_dir):  # `mhmoe export` output: the packed ternary model on the integer CPU path
        return load_exported_run(Path(run_dir), step, data_root, cache_dir)
    cfg = load_config(run_dir)
    step, ckpt = find_checkpoint(run_dir, step)
    device = resolve_device(cfg)
    model = Transformer(cfg.model)
    load_model_weights(model, ckpt)
    model.to(device).eval()
    tok = Tokenizer.load(Path(run_dir) / "tokenizer")
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    return LoadedRun(cfg, model, step, device, dtype, tok, resolve_data_root(data_root, cfg.preset),
                     default_cache_dir(cache_dir))


# ----------------------------------------------------------------------------------------------------------
# CLI


def resolve_config(preset_name: str | None, variant: str | None, overrides: list[str],
                   run_dir: Path | None = None) -> TrainConfig:
    """Preset + variant + `--set a.b=value` overrides; with neither preset nor model, the run's stored config."""
    from mhmoe.presets import preset

    if preset_name is None and variant is None:
        if run_dir is not None and (run_dir / "config.json").is_file():
            cfg = load_config(run_dir)
        else:
            raise UserError("--preset and --model are required for a new run (e.g. --preset demo --model mhmoe-h3)")
    else:
        cfg = preset(preset_name or "demo", variant or "smoe")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set: expected key=value (e.g. optim.lr=1e-3), got {item!r}")
        if key in ("variant", "preset"):
            raise UserError(f"--set {key}: use --{'model' if key == 'variant' else 'preset'} instead")
        cfg = cfg.override(key.strip(), value.strip())
    return cfg


def _cli(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.preset, args.model, args.set or [], Path(args.out))
    state = train(cfg, args.out, args.data_root, args.cache_dir, progress=not args.no_progress)
    msg = "finished" if state.finished else "stopped"
    print(f"{msg} at step {state.step}/{cfg.steps} in {state.wall_s:.1f}s; run directory: {args.out}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a language model run")
    p.add_argument("--preset", default=None, help="smoke, demo, tiny, gpu or paper")
    p.add_argument("--model", default=None,
                   help="dense, smoe, fine-grained, mhmoe-h2, mhmoe-h3 (suffix -shared for a shared expert)")
    p.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. optim.lr=1e-3")
    p.add_argument("--data-root", default=None,
                   help="corpora folder (default: $MHMOE_DATA_ROOT, else the embedded sample: smoke and demo)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: $MHMOE_CACHE_DIR or ~/.cache/mhmoe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
