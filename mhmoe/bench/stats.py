"""Shuffled timing rounds and the statistics of per-round comparisons."""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable


def timed_rounds(calls: dict, rounds: int, seed: int, log: Callable[[str], None] | None = None,
                 label: str = "") -> dict:
    """Run every callable once per round, in a fresh random order each round; {key: [seconds per round]}.

    Shuffled rounds in one process spread the other tenants' load over every implementation alike.
    """
    times: dict = {key: [] for key in calls}
    rng = random.Random(seed)
    for r in range(rounds):
        t_round = time.perf_counter()
        order = list(calls)
        rng.shuffle(order)
        for key in order:
            t = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - t)
        if log is not None:
            log(f"[{label}] round {r + 1}/{rounds}: {time.perf_counter() - t_round:.1f} s")
    return times


def _median_ratio(ts: list[float], base: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(ts, base))


def paired_frac_of_gemm(flops: float, ts: list[float], gemm_flops: float, gemm_ts: list[float]) -> float:
    """Median over rounds of (flops / ts[r]) / (gemm_flops / gemm_ts[r]): each round's rate against the GEMM's
    rate in the same round, so a slow stretch of a shared machine slows the numerator and denominator alike."""
    return statistics.median((flops / t) / (gemm_flops / gt) for t, gt in zip(ts, gemm_ts))
