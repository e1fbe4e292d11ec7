"""The device a run trains on, and whether this CPU computes bfloat16 natively.

The CPU's features come from /proc/cpuinfo, or from the file named by $MHMOE_CPUINFO (`CPUINFO_ENV`) when it is
set: the one seam through which tests (and machines whose cpuinfo misreports) give the CPU kind, in this process
and in the processes it starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mhmoe.errors import ConfigError
from mhmoe.training.config import TrainConfig


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TrainConfig.device: 'cuda' requested but no CUDA device is available; use device=cpu")
    return torch.device(cfg.device)


CPUINFO_ENV = "MHMOE_CPUINFO"


def cpuinfo_path() -> Path:
    """The file the CPU's features are read from: $MHMOE_CPUINFO if set, else /proc/cpuinfo."""
    return Path(os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo")


def cpu_bf16_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The native-bf16 flags this CPU reports (avx512_bf16, amx_bf16, Arm bf16); None when it cannot tell.
    cpuinfo: the text of a cpuinfo file (`cpuinfo_path()` is read when None)."""
    text = cpuinfo
    if text is None:
        try:
            text = cpuinfo_path().read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return flags & {"avx512_bf16", "amx_bf16", "bf16"} if flags else None


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16, AMX or Arm BF16); True when it cannot tell.

    Without it torch's CPU bf16 matmul takes a slow scalar fallback, two orders of magnitude below fp32 on an
    AVX2-only CPU (benchmarks/RESULTS.md), so bf16 there is a trap rather than a speed-up.
    cpuinfo: the text of /proc/cpuinfo (read when None).
    """
    flags = cpu_bf16_flags(cpuinfo)
    return True if flags is None else bool(flags)
