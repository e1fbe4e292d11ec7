"""Model FLOP utilisation: achieved FLOP/s over the device's peak, for bench records and `mhmoe train` runs.

The achieved FLOP/s are the analytic matmul FLOPs of `mhmoe.complexity` (x3 for a training step), so MFU counts
useful work only: routing, dispatch and elementwise ops cost time but add no FLOPs. The peak is the user's to
give (`--peak-tflops` or $MHMOE_PEAK_TFLOPS): it depends on the exact part and the dtype (an H100/H200 SXM
is sold as 989 dense bf16 TFLOP/s), and a guessed peak would make every MFU a guess. It is recorded with the
figures.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from mhmoe.errors import UserError

PEAK_ENV = "MHMOE_PEAK_TFLOPS"


def peak_tflops(flag: float | None) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, where it came from): the flag, else $MHMOE_PEAK_TFLOPS, else (None, None): no MFU."""
    if flag is not None:
        if not flag > 0:
            raise UserError(f"--peak-tflops: must be > 0 (the device's peak, e.g. 989 for H100 bf16), got {flag}")
        return float(flag), "--peak-tflops"
    text = os.environ.get(PEAK_ENV, "").strip()
    if not text:
        return None, None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise UserError(f"{PEAK_ENV}: expected a positive number of TFLOP/s (e.g. 989), got {text!r}; "
                        "fix or unset it")
    return value, PEAK_ENV


def mfu(gflops: float, peak: float | None) -> float | None:
    """Achieved GFLOP/s as a fraction of a peak in TFLOP/s; None without a peak."""
    return None if peak is None else gflops / (peak * 1e3)


def run_throughput(run_dir: str | os.PathLike, peak: float | None = None, skip: float = 0.1) -> dict:
    """Tokens/s and MFU of a `mhmoe train` run from its metrics.jsonl, which may end early (a stopped run).

    The first `skip` of the logged steps (at least one) are left out: they hold the allocator's and cuBLAS's
    warm-up. The per-step rate of the rest is summarised by its median, robust to the slow steps that carry a
    checkpoint or an evaluation.
    """
    from mhmoe.complexity import model_flops_per_token
    from mhmoe.training.rundir import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    rates = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rates.append(float(json.loads(line)["tok_per_s"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the stop
    kept = rates[max(1, int(len(rates) * skip)):]
    flops_per_token = 3 * model_flops_per_token(cfg.model, seq_len=cfg.seq_len)
    tok_s = statistics.median(kept) if kept else None
    gflops = None if tok_s is None else tok_s * flops_per_token / 1e9
    return {
        "variant": cfg.variant, "preset": cfg.preset, "dtype": cfg.dtype, "steps_logged": len(rates),
        "steps_used": len(kept), "tok_per_s": tok_s, "train_flops_per_token": flops_per_token, "gflops": gflops,
        "mfu": None if gflops is None else mfu(gflops, peak), "peak_tflops": peak,
    }
