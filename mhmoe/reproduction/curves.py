"""Every claim of a record at every periodic evaluation: seed-paired differences against training tokens.

A run's periodic evaluations (`TrainConfig.eval_every`, `eval_tokens` tokens per domain) are the lines of its
evals.jsonl. At each step that every run of a contrast (`mhmoe.reproduction.contrasts`) evaluated, the contrast's
per-seed value of the mean loss over the three domains gives a mean and a 95% Student-t interval over the seeds
(`verdicts.paired_interval`, n-1 degrees of freedom), as the verdicts do at the milestones. A point before the end
sits on a schedule tuned for the whole run (the cosine has not decayed yet): only the last point is the recipe's
own result, and it equals the 100% column when `eval_tokens` equals the milestones' `data.max_eval_tokens`.

results.json holds the numbers under "curves"; plots/differences_vs_tokens.png draws them.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from mhmoe.reproduction.contrasts import Key, claim_contrasts
from mhmoe.reproduction.paper_tables import DOMAINS, Row
from mhmoe.reproduction.verdicts import paired_interval


def read_evals(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {"tokens": tokens seen, "loss": mean loss over the domains}} from RUN/evals.jsonl; steps that lack a
    domain are left out, and a step logged twice keeps its last line."""
    path = run_dir / "evals.jsonl"
    out: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if all(d in rec for d in DOMAINS):
            out[rec["step"]] = {"tokens": rec["tokens"], "loss": statistics.fmean(rec[d] for d in DOMAINS)}
    return out


def paired_curves(results: dict[str, dict[str, Any]], out: Path, tables: list[int]) -> list[dict[str, Any]]:
    """One entry per contrast of the record (`claim_contrasts` of its tables and extra models): at every step
    evaluated by all of its runs, the mean over seeds of the contrast and its 95% interval (None with one seed).

    results: `mhmoe.reproduction.reproduce.execute`'s {run_id: {"run": PlannedRun, ...}}; runs in out/runs/<run_id>.
    """
    evals: dict[Key, dict[int, dict[int, dict[str, float]]]] = {}  # model -> seed -> step -> point
    eval_tokens: dict[Key, int] = {}
    extra: list[Row] = []
    for rid, info in results.items():
        r = info["run"]
        key = (r.row.variant, r.row.bitnet)
        evals.setdefault(key, {})[r.cfg.seed] = read_evals(out / "runs" / rid)
        eval_tokens[key] = r.cfg.eval_tokens
        if not r.tables and r.row not in extra:
            extra.append(r.row)
    curves = []
    for c in claim_contrasts(tables, set(evals), extra):
        seeds = sorted(set.intersection(*(set(evals[k]) for k in c.keys)))
        runs = [evals[k][s] for k in c.keys for s in seeds]
        steps = sorted(set.intersection(*(set(run) for run in runs))) if runs else []
        if not steps:
            continue
        entry: dict[str, Any] = {**c.describe(), "steps": steps, "tokens": [], "mean_diff_nats": [], "ci95": [],
                                 "n_seeds": len(seeds), "seeds": seeds, "per_seed": [[] for _ in seeds],
                                 "eval_tokens": max(eval_tokens[k] for k in c.keys)}
        for step in steps:
            value = c.per_seed({k: {s: evals[k][s][step]["loss"] for s in seeds} for k in c.keys})
            mean, lo, hi = paired_interval([value[s] for s in seeds])
            entry["tokens"].append(evals[c.keys[0]][seeds[0]][step]["tokens"])
            entry["mean_diff_nats"].append(mean)
            entry["ci95"].append([lo, hi] if len(seeds) > 1 else None)
            for i, s in enumerate(seeds):
                entry["per_seed"][i].append(value[s])
        curves.append(entry)
    return curves


def plot_curves(plt: Any, curves: list[dict[str, Any]], path: Path) -> Path:
    """One panel per contrast: the mean over seeds (line), its 95% interval (band) and each seed (dots) against
    training tokens, with 0 marked; below 0 = the claim's direction."""
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows + 0.6), squeeze=False)
    for ax, c in zip(axes.flat, curves):
        x = [t / 1e6 for t in c["tokens"]]
        ax.plot(x, c["mean_diff_nats"], "o-", color="C0", ms=3, label=f"mean of {c['n_seeds']} seed(s)")
        if c["n_seeds"] > 1:
            ax.fill_between(x, [ci[0] for ci in c["ci95"]], [ci[1] for ci in c["ci95"]], color="C0", alpha=0.2,
                            label="95% interval")
        for i, (seed, ys) in enumerate(zip(c["seeds"], c["per_seed"])):
            ax.plot(x, ys, ".", color=f"C{i + 1}", ms=4, label=f"seed {seed}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(c["comparison"], fontsize=8)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("Δ mean eval loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.suptitle("Seed-paired differences at every periodic evaluation (mean of 3 domains; < 0 = the first model "
                 "is better)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.4 * rows + 0.6)))  # room for the title above the panels
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
