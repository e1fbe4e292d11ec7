"""Shuffled timing rounds, per-round comparisons, their median's interval, and sampling until it is narrow.

A comparison (x SMoE, x sorted, fraction of the GEMM) is formed inside each round from the two timings of that
round, then summarised over rounds by its median and a 95% interval for that median.

The interval is distribution-free: with the n per-round values sorted, x(1) <= ... <= x(n), and B ~ Binomial(n,
1/2) the number of values below the true median m, P(x(l) <= m <= x(n+1-l)) >= 1 - 2 P(B <= l-1). We take the
largest l with 2 P(B <= l-1) <= 1 - level, so the coverage is at least `level` and is reported exactly. It assumes
only that rounds are independent draws of the same continuous distribution, no normality: per-round timing
ratios of a shared machine are skewed and heavy-tailed (a neighbour's burst slows one side of one round), which a
normal approximation would misstate. Below n = 6 no pair of order statistics covers 95%; the interval is then
[min, max] with its lower coverage, and never counts as narrow.

Sampling: after the minimum number of rounds, more rounds are run in batches until every comparison's interval
lies within +-target of its median, or the time cap is reached. Stopping on a look at the data makes the
nominal coverage approximate; looking only every `batch` rounds keeps the number of looks small.
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np

LEVEL = 0.95
BATCH = 4  # rounds between looks at the intervals, past the minimum


@dataclass(frozen=True)
class MedianCI:
    """The median of per-round values and a distribution-free interval for it (0-based order statistics)."""

    median: float
    lo: float
    hi: float
    n: int
    lo_index: int  # lo = sorted(values)[lo_index]
    hi_index: int
    coverage: float  # exact P(lo <= true median <= hi) for continuous values

    def halfwidth(self) -> float:
        """The wider side of the interval as a fraction of the median."""
        if self.median == 0:
            return float("inf")
        return max(self.hi - self.median, self.median - self.lo) / abs(self.median)

    def narrow(self, target: float, level: float = LEVEL) -> bool:
        return self.coverage >= level and self.halfwidth() <= target


@functools.lru_cache(maxsize=None)  # every comparison of a run asks for the same n at each look
def order_statistic_indices(n: int, level: float = LEVEL) -> tuple[int, int, float]:
    """(lo, hi, coverage): 0-based indices into the sorted values bounding the median with coverage >= level;
    (0, n-1, coverage below level) when n is too small for any pair to reach it."""
    if n < 1:
        raise ValueError("order_statistic_indices: n must be >= 1")
    # Imported here: scipy.stats costs ~0.75 s of start-up, paid by every `mhmoe` command that imports the CLI.
    from scipy.stats import binom

    cdf = binom.cdf(np.arange(n + 1), n, 0.5)
    # x(l) misses the median from below when B <= l-1; with lo = l-1 (0-based) that is P(B <= lo) = cdf[lo]. The
    # largest lo with cdf[lo] <= (1-level)/2 gives the narrowest interval that still covers.
    ks = np.flatnonzero(cdf <= (1 - level) / 2)
    lo = int(ks[-1]) if ks.size else 0
    return lo, n - 1 - lo, float(1 - 2 * cdf[lo])


def median_ci(values: list[float], level: float = LEVEL) -> MedianCI:
    """The median of `values` and its distribution-free interval (module docstring)."""
    xs = sorted(values)
    lo, hi, cov = order_statistic_indices(len(xs), level)
    return MedianCI(statistics.median(xs), xs[lo], xs[hi], len(xs), lo, hi, cov)


@dataclass(frozen=True)
class Ratio:
    """A per-round comparison: scale * times[num][r] / times[den][r] for each round r.

    x SMoE is Ratio(impl, smoe); a fraction of the GEMM's rate is Ratio(gemm, impl, flops / gemm_flops), since
    (flops / t) / (gemm_flops / t_gemm) = (flops / gemm_flops) * t_gemm / t.
    """

    num: Hashable
    den: Hashable
    scale: float = 1.0

    def per_round(self, times: dict) -> list[float]:
        return [self.scale * a / b for a, b in zip(times[self.num], times[self.den])]


def _round(calls: dict, rng: random.Random, times: dict, clock: Callable[[], float],
           sync: Callable[[], None] | None) -> None:
    order = list(calls)
    rng.shuffle(order)
    for key in order:
        t = clock()
        calls[key]()
        if sync is not None:  # CUDA returns before the kernels finish
            sync()
        times[key].append(clock() - t)


def timed_rounds(calls: dict, rounds: int, seed: int, log: Callable[[str], None] | None = None,
                 label: str = "", sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> dict:
    """Run every callable once per round, in a fresh random order each round; {key: [seconds per round]}.

    Shuffled rounds in one process spread the other tenants' load over every implementation alike.
    """
    times: dict = {key: [] for key in calls}
    rng = random.Random(seed)
    for r in range(rounds):
        t_round = clock()
        _round(calls, rng, times, clock, sync)
        if log is not None:
            log(f"[{label}] round {r + 1}/{rounds}: {clock() - t_round:.1f} s")
    return times


@dataclass
class Sampled:
    """What `sample_rounds` did: the timings, and whether every interval met the target when it stopped."""

    times: dict
    rounds: int
    seconds: float
    target_reached: bool
    widest: float  # the largest interval half-width over the comparisons, as a fraction of its median

    def as_meta(self) -> dict:
        return {"rounds": self.rounds, "seconds": round(self.seconds, 1), "target_reached": self.target_reached,
                "widest_halfwidth": self.widest if self.widest != float("inf") else None}


def widest_halfwidth(times: dict, ratios: list[Ratio], level: float = LEVEL) -> float:
    """The worst comparison's half-width (inf while n is too small for the level)."""
    worst = 0.0
    for ratio in ratios:
        ci = median_ci(ratio.per_round(times), level)
        worst = max(worst, ci.halfwidth() if ci.coverage >= level else float("inf"))
    return worst


def sample_rounds(calls: dict, ratios: list[Ratio], *, min_rounds: int, target: float, max_seconds: float,
                  seed: int, batch: int = BATCH, log: Callable[[str], None] | None = None, label: str = "",
                  sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                  level: float = LEVEL, on_look: Callable[[Sampled], None] | None = None) -> Sampled:
    """Shuffled rounds of every callable until each ratio's interval is within +-target of its median.

    At least `min_rounds` rounds run whatever the clock says; after them the intervals are looked at every
    `batch` rounds, and sampling stops at the first round that ends `max_seconds` or more after the start
    (so it overruns the cap by at most one round). max_seconds=0: exactly min_rounds rounds. on_look: called
    with what was sampled so far at each look that does not stop the sampling (so that a caller can save the
    figures of the rounds so far before the next batch: a run cut short keeps them).
    """
    times: dict = {key: [] for key in calls}
    rng = random.Random(seed)
    start = clock()
    n = 0
    widest = float("inf")
    while True:
        _round(calls, rng, times, clock, sync)
        n += 1
        elapsed = clock() - start
        if n < min_rounds:
            continue
        looked = (n - min_rounds) % batch == 0
        if looked or elapsed >= max_seconds:
            widest = widest_halfwidth(times, ratios, level)
            if log is not None:
                log(f"[{label}] {n} rounds, {elapsed:.1f} s: widest interval +-{100 * widest:.1f}% "
                    f"(target +-{100 * target:.1f}%)")
            if widest <= target or elapsed >= max_seconds:
                return Sampled(times, n, elapsed, widest <= target, widest)
            if on_look is not None:
                on_look(Sampled(times, n, elapsed, False, widest))


def summarise(times: dict, ratios: dict[str, Ratio], target: float) -> dict:
    """A record's comparisons: each median with its interval (`ratio_to_smoe` and `ratio_ci`; `<name>` and
    `<name>_ci` for the others), the intervals' exact coverage, and whether all met the target."""
    out: dict = {}
    reached = True
    for name, ratio in ratios.items():
        ci = median_ci(ratio.per_round(times))
        out[name] = ci.median
        out["ratio_ci" if name == "ratio_to_smoe" else f"{name}_ci"] = [ci.lo, ci.hi]
        out["ci_coverage"] = ci.coverage
        # SMoE against itself is 1 in every round: nothing to sample for.
        reached = reached and (ratio.num == ratio.den or ci.narrow(target))
    out["target_reached"] = reached
    return out


def paired_frac_of_gemm(flops: float, ts: list[float], gemm_flops: float, gemm_ts: list[float]) -> float:
    """Median over rounds of (flops / ts[r]) / (gemm_flops / gemm_ts[r]): each round's rate against the GEMM's
    rate in the same round, so a slow stretch of a shared machine slows the numerator and denominator alike."""
    return statistics.median(Ratio("gemm", "x", flops / gemm_flops).per_round({"x": ts, "gemm": gemm_ts}))
