"""Process-wide runtime settings the entry points apply once: glibc malloc tuning.

`MALLOC_TUNED` records whether it was applied in this process (benchmarks write it into their records).
"""

from __future__ import annotations

import ctypes
import os
import sys

MALLOC_TUNED = False


def tune_glibc_malloc() -> bool:
    """Keep large tensors out of mmap: glibc hands every allocation over 32 MB to mmap and unmaps it on free,
    so each MoE step pays page faults re-mapping its whole-batch temporaries (the cost, and what this saves, are
    in benchmarks/RESULTS.md). Same effect as
    MALLOC_MMAP_MAX_=0 MALLOC_TOP_PAD_=1GiB MALLOC_TRIM_THRESHOLD_=2GiB; skipped if MHMOE_NO_MALLOPT=1 or the
    C library is not glibc. Returns whether it was applied."""
    if os.environ.get("MHMOE_NO_MALLOPT") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    ok = mallopt(M_MMAP_MAX, 0) and mallopt(M_TOP_PAD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    return bool(ok)


def apply() -> None:
    """Apply the process-wide settings (called by `mhmoe`'s main before parsing)."""
    global MALLOC_TUNED
    MALLOC_TUNED = tune_glibc_malloc()
