"""Atomic, verified checkpoints in a run directory.

RUN_DIR/checkpoints/step_000100/ holds model.safetensors, trainer.pt (optimizer, scheduler, RNG, step) and
manifest.json (sha256 of each file). A checkpoint is written into a temporary directory and renamed into place,
so a crash (even SIGKILL) leaves either the old set or the new one; a checkpoint whose files do not match its
manifest is skipped with a warning and the previous good one is used.

RUN_DIR/.lock is held (flock) by the one process that trains or evaluates the run, so two `mhmoe train` or
`mhmoe reproduce` processes pointed at the same directory cannot interleave their checkpoints and logs; the OS
releases it when the process dies, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a run directory is then the user's to keep single-writer
    fcntl = None

import torch
from safetensors.torch import load_model, save_model

from mhmoe.errors import CheckpointError
from mhmoe.fileio import sha256_file


class RunBusy(RuntimeError):
    """The run directory is locked by another live process (pid: the holder's, as it wrote it)."""

    def __init__(self, run_dir: Path, pid: str) -> None:
        self.run_dir, self.pid = run_dir, pid
        super().__init__(f"{run_dir} is in use by another process (pid {pid}); wait for it to finish or use "
                         f"another directory")


# Locks this process holds, by resolved run directory: a run locked by `mhmoe reproduce` is then trained by
# `train()` in the same process without deadlocking on its own flock.
_HELD: dict[Path, int] = {}


@contextmanager
def run_lock(run_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold RUN_DIR/.lock for the block; re-entrant within a process.

    Raises RunBusy (naming the holder's pid) when another process holds it, unless `wait`, which blocks.
    """
    key = Path(run_dir).resolve()
    if key in _HELD or fcntl is None:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunBusy(key, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    config_json: str) -> Path:
    """Write checkpoint `step` atomically and return its directory."""
    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embedding / LM-head weights
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "config.json").write_text(config_json, encoding="utf-8")
    files = {name: sha256_file(tmp / name) for name in ("model.safetensors", "trainer.pt", "config.json")}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "sha256": files}, indent=2), encoding="utf-8")
    for name in list(files) + ["manifest.json"]:
        fd = os.open(tmp / name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    if final.exists():  # a re-save of the same step (e.g. after resuming at it): replace as a whole
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint's files match its manifest, else the reason it is unusable."""
    manifest = ckpt / "manifest.json"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        for name, digest in info["sha256"].items():
            if not (ckpt / name).is_file():
                return f"{name} is missing"
            if sha256_file(ckpt / name) != digest:
                return f"{name} does not match its sha256 in manifest.json (truncated or corrupted)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"manifest.json unreadable ({e.__class__.__name__})"
    return None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint directory, oldest first (unverified)."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit():
                out.append((int(d.name[5:]), d))
    return sorted(out)


def latest_good_checkpoint(run_dir: Path, max_step: int | None = None) -> tuple[int, Path] | None:
    """The newest checkpoint (at most max_step) that verifies; corrupted ones are skipped with a warning."""
    for step, d in reversed(list_checkpoints(run_dir)):
        if max_step is not None and step > max_step:
            continue
        problem = verify(d)
        if problem is None:
            return step, d
        warnings.warn(f"checkpoint {d} is unusable ({problem}); falling back to the previous one", stacklevel=2)
    return None


def find_checkpoint(run_dir: Path, step: int | None = None) -> tuple[int, Path]:
    """(step, dir) of checkpoint `step`, or of the newest good one; CheckpointError (one line) otherwise."""
    if step is None:
        found = latest_good_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"RUN_DIR: {run_dir} has no usable checkpoint yet; train it first")
        return found
    ckpts = dict(list_checkpoints(run_dir))
    if step not in ckpts:
        raise CheckpointError(f"--step: no checkpoint at step {step} in {run_dir}; available: {sorted(ckpts)}")
    problem = verify(ckpts[step])
    if problem:
        raise CheckpointError(f"--step: checkpoint {ckpts[step]} is unusable ({problem})")
    return step, ckpts[step]


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: cannot be read ({e}); delete that checkpoint") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'}: does not fit the model in config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def prune(run_dir: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete old checkpoints except the newest `keep_last` and any step in `keep_steps`."""
    ckpts = list_checkpoints(run_dir)
    for step, d in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if step not in keep_steps:
            shutil.rmtree(d, ignore_errors=True)
