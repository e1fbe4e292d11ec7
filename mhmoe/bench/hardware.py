"""What a benchmark ran on and how it was started: CPU/GPU, software, the command and the load."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys

import torch

MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_",
              "MALLOC_ARENA_MAX")


def hardware() -> dict[str, str]:
    """CPU model, core layout and the matmul ISA extensions (lscpu); the GPU's name when CUDA is available."""
    model, cores = platform.processor() or "?", str(os.cpu_count())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
        model = fields.get("Model name", model)
        cores = (f"{fields.get('CPU(s)', cores)} CPUs ({fields.get('Core(s) per socket', '?')} cores/socket x "
                 f"{fields.get('Socket(s)', '?')} sockets, {fields.get('Thread(s) per core', '?')} threads/core)")
        flags = fields.get("Flags", "").split()
        isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
               if f in flags]
        cores += f", {' '.join(isa) or 'no avx2'}"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    info = {"cpu": model, "cores": cores}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info


def _meta(args: argparse.Namespace) -> dict:
    from mhmoe import runtime

    env = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ)
    # The command as typed: the console script, or `python benchmarks/layers.py` (which adds the subcommand).
    prog = f"python {sys.argv[0]}" if sys.argv and sys.argv[0].endswith(".py") else "mhmoe"
    cmd = " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])
    return {
        **hardware(), "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": f"{env} {cmd}".strip(), "threads": torch.get_num_threads(), "malloc_tuned": runtime.MALLOC_TUNED,
        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
