"""Where a benchmark runs (CPU or one CUDA GPU): choosing it, waiting for it, and its memory."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from mhmoe.errors import UserError

DEVICES = ("cpu", "cuda")


def bench_device(name: str) -> torch.device:
    """The device of `--device`; UserError when it is not one we time on or CUDA is absent."""
    if name not in DEVICES:
        raise UserError(f"--device: expected cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def synchronizer(device: torch.device) -> Callable[[], None] | None:
    """What a timer calls before reading the clock: CUDA kernels run asynchronously, CPU ops do not."""
    return torch.cuda.synchronize if device.type == "cuda" else None


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has (2**63 when unknown, so nothing is skipped for want of a number)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


def peak_memory_mb(module: nn.Module, run: Callable[[], object]) -> float:
    """Peak live tensor memory (MiB, the module's parameters included) while `run()` executes.

    CPU: torch's MemTracker. CUDA: the caching allocator's own peak counter, less what was live before (other
    implementations' weights share the device), plus the module's parameters back.
    """
    params = next(module.parameters(), None)
    if params is not None and params.device.type == "cuda":
        dev = params.device
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        run()
        torch.cuda.synchronize(dev)
        own = sum(p.numel() * p.element_size() for p in module.parameters())
        return (torch.cuda.max_memory_allocated(dev) - before + own) / 2**20
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module)
    with tracker:
        run()
    peak = tracker.get_tracker_snapshot("peak")
    return max((snap["Total"] for snap in peak.values()), default=0) / 2**20
