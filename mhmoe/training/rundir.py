"""A run directory: its config, tokenizer, wall clock, and loading a finished run for evaluation or export.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mhmoe.bitnet.ternary import WEIGHTS_FILE, integer_model, is_export_dir, read_ternary
from mhmoe.data.corpora import corpus_files, resolve_data_root
from mhmoe.data.pack import Pack, is_pack, load_corpus
from mhmoe.data.tokenizer import Tokenizer, build_tokenizer
from mhmoe.errors import CheckpointError, ConfigError, UserError
from mhmoe.fileio import atomic_write_text, sha256_file
from mhmoe.model import Transformer
from mhmoe.training.checkpoint import (
    find_checkpoint,
    load_model_weights,
)
from mhmoe.training.config import TrainConfig
from mhmoe.training.device import resolve_device
from mhmoe.training.presets import preset


def default_cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Token caches and trained tokenizers: --cache-dir, $MHMOE_CACHE_DIR, or ~/.cache/mhmoe."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("MHMOE_CACHE_DIR") or Path.home() / ".cache" / "mhmoe")


def prepare_tokenizer(cfg: TrainConfig, run_dir: Path, root: Path, cache_dir: Path) -> Tokenizer:
    """The run's tokenizer: RUN_DIR/tokenizer if present, else trained once per settings (cached) and saved there."""
    run_tok = run_dir / "tokenizer"
    if (run_tok / "tokenizer.json").is_file():
        return Tokenizer.load(run_tok)
    if is_pack(root):  # the pack's own tokenizer, once the pack is known to hold what this config reads
        pack = Pack(root)
        pack.check(cfg.data)
        run_tok.mkdir(parents=True, exist_ok=True)
        pack.tokenizer.save(run_tok)
        return pack.tokenizer
    d = cfg.data
    files = corpus_files(d.train_corpus, root)
    key_src = json.dumps([d.tokenizer, d.vocab_size, d.tokenizer_train_bytes, d.train_corpus,
                          [(str(p.relative_to(root)), sha256_file(p)) for p in files]])
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


RUNTIME_FIELDS = ("threads", "compile", "keep_checkpoints", "dead_expert_window")


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
        return load_corpus(name, self.tokenizer, self.root, self.cache, eval_bytes(self.cfg, max_tokens), max_tokens)


def load_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"RUN_DIR: {run_dir} has no config.json; pass the --out of a `mhmoe train` run")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def load_checkpoint_model(run_dir: Path, step: int | None = None) -> tuple[int, Path, Transformer]:
    """(step, checkpoint folder, model with its weights) of the run's checkpoint at `step` (default: its newest
    good one), on the CPU; building the model does not move the caller's RNG."""
    cfg = load_config(run_dir)
    step, ckpt = find_checkpoint(run_dir, step)
    with torch.random.fork_rng(devices=[]):
        model = Transformer(cfg.model)
    load_model_weights(model, ckpt)
    return step, ckpt, model


def load_run(run_dir: Path, step: int | None = None, data_root: str | None = None, cache_dir: str | None = None,
             need_data: bool = True) -> LoadedRun:
    """The run's model at `step` (or its newest good checkpoint), on the run's device, in eval mode; for a
    `mhmoe export` directory, its integer ternary model on the CPU (float32 around the int8 matmuls).

    need_data=False (`eval --text` alone, `generate`): nothing will be read from the data root, so a missing one
    is not an error (the run folder stands in for it; LoadedRun.root is then never read)."""
    run_dir = Path(run_dir)
    if not need_data and data_root is None:
        data_root = str(run_dir)
    cfg = load_config(run_dir)
    if is_export_dir(run_dir):
        tensors, meta = read_ternary(run_dir / WEIGHTS_FILE)
        exported = int(meta.get("step", -1))
        if step is not None and step != exported:
            raise CheckpointError(f"--step: {run_dir} is an export of step {exported}; export step {step} to use it")
        model, step, device, dtype = integer_model(cfg.model, tensors, meta), exported, torch.device("cpu"), torch.float32
        root = resolve_data_root(data_root)
    else:
        step, _, model = load_checkpoint_model(run_dir, step)
        device = resolve_device(cfg)
        model.to(device).eval()
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        root = resolve_data_root(data_root, cfg.preset)
    tok = Tokenizer.load(run_dir / "tokenizer")
    return LoadedRun(cfg, model, step, device, dtype, tok, root, default_cache_dir(cache_dir))


# ----------------------------------------------------------------------------------------------------------
# CLI


def resolve_config(preset_name: str | None, variant: str | None, overrides: list[str],
                   run_dir: Path | None = None) -> TrainConfig:
    """Preset + variant + `--set a.b=value` overrides; with neither preset nor model, the run's stored config."""
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
