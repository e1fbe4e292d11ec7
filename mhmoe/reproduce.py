"""`mhmoe reproduce`: the matrix of runs behind the paper's Tables 1-5, their evaluation, report and verdicts.

Every (variant, BitNet, seed) is one run directory DIR/runs/<run_id>; a run shared by several tables (the SMoE of
Tables 1 and 4, the MH-MoE h=2 of Tables 1, 4 and 5, ...) is trained once. Each run is evaluated at 50% and
100% of its steps (the paper's 50k / 100k columns) on every domain, results cached next to the run, so the
command can be stopped and re-run at any time: finished work is skipped and interrupted runs resume.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mhmoe.checkpoint import atomic_write_text
from mhmoe.complexity import model_flops_per_token, model_param_count
from mhmoe.train import TrainConfig, train

DOMAINS = ("redpajama", "wikipedia", "c4")
DOMAIN_TITLES = {"redpajama": "RedPajama", "wikipedia": "Wiki", "c4": "C4"}
SEED_BASE = 1337
# Ternary weights move only when an update crosses a rounding threshold, so the b1.58 recipe trains them at a
# higher peak LR than their full-precision twins; a modest factor, as our presets' LRs are already high.
BITNET_LR_SCALE = 1.5


@dataclass(frozen=True)
class Row:
    label: str  # as printed in the paper
    variant: str  # mhmoe.presets variant name
    bitnet: bool = False


# The paper's rows (Tables 1-5) and its numbers: {label: {"50%": (RP, Wiki, C4), "100%": (...)}}.
TABLES: dict[int, tuple[str, list[Row]]] = {
    1: ("Validation perplexity; all models matched in parameters and computation.", [
        Row("Dense", "dense"), Row("SMoE", "smoe"), Row("Fine-grained SMoE", "fine-grained"),
        Row("MH-MoE (head=2)", "mhmoe-h2"), Row("MH-MoE (head=3)", "mhmoe-h3")]),
    2: ("All MoE models with a shared expert of the same size (hidden F).", [
        Row("SMoE", "smoe-shared"), Row("Fine-grained SMoE", "fine-grained-shared"),
        Row("MH-MoE (head=2)", "mhmoe-h2-shared"), Row("MH-MoE (head=3)", "mhmoe-h3-shared")]),
    3: ("All models quantised and trained with BitNet b1.58.", [
        Row("Dense", "dense", True), Row("SMoE", "smoe", True), Row("Fine-grained SMoE", "fine-grained", True),
        Row("MH-MoE (head=2)", "mhmoe-h2", True), Row("MH-MoE (head=3)", "mhmoe-h3", True)]),
    # Table 4 as the paper states it: the rows without head & merge have equal FLOPs, and so do the rows with
    # them (+2 D^2 each). MH-MoE's "with" row is the re-matched model without the layers, with them added back;
    # its 11.46 (not Table 1's 11.60) confirms that reading.
    4: ("With (+ head & merge, 2 D^2 more FLOPs) and without head & merge layers; rows without them have equal "
        "FLOPs, and so do rows with them.", [
        Row("SMoE", "smoe"), Row("SMoE + head & merge", "smoe-hm"),
        Row("Fine-grained SMoE", "fine-grained"), Row("Fine-grained SMoE + head & merge", "fine-grained-hm"),
        Row("MH-MoE (head=2) w/o head & merge", "mhmoe-h2-nohm"),
        Row("MH-MoE (head=2) + head & merge", "mhmoe-h2-nohm-hm")]),
    # Table 5: Table 1's MH-MoE h=2 with layers taken out and the experts left as they are (its full row equals
    # Table 1's h=2, and its no-layer row, 11.97, is worse than Table 4's re-matched 11.71).
    5: ("MH-MoE (head=2) of Table 1 with the head and/or merge layer removed, experts not re-sized.", [
        Row("w/o head, w/o merge", "mhmoe-h2-drophm"), Row("w/ head, w/o merge", "mhmoe-h2-dropmerge"),
        Row("w/o head, w/ merge", "mhmoe-h2-drophead"), Row("w/ head, w/ merge", "mhmoe-h2")]),
}

PAPER: dict[int, dict[str, dict[str, tuple[float, float, float]]]] = {
    1: {"Dense": {"50%": (13.01, 12.95, 17.41), "100%": (12.13, 11.58, 16.21)},
        "SMoE": {"50%": (11.87, 10.51, 15.63), "100%": (10.90, 9.68, 14.35)},
        "Fine-grained SMoE": {"50%": (11.68, 10.18, 15.21), "100%": (10.74, 9.38, 13.97)},
        "MH-MoE (head=2)": {"50%": (11.60, 10.11, 15.11), "100%": (10.70, 9.26, 13.80)},
        "MH-MoE (head=3)": {"50%": (11.45, 10.00, 14.90), "100%": (10.51, 9.18, 13.63)}},
    2: {"SMoE": {"50%": (11.76, 10.33, 15.19), "100%": (10.41, 9.44, 14.30)},
        "Fine-grained SMoE": {"50%": (11.51, 10.06, 15.01), "100%": (10.66, 9.15, 13.78)},
        "MH-MoE (head=2)": {"50%": (11.48, 9.91, 14.87), "100%": (10.36, 8.79, 13.66)},
        "MH-MoE (head=3)": {"50%": (11.26, 9.74, 14.82), "100%": (10.28, 8.72, 13.49)}},
    3: {"Dense": {"50%": (32.17, 27.56, 35.85), "100%": (30.04, 24.75, 33.55)},
        "SMoE": {"50%": (29.18, 24.70, 32.34), "100%": (26.78, 21.54, 29.73)},
        "Fine-grained SMoE": {"50%": (29.04, 24.51, 32.03), "100%": (26.68, 21.42, 29.50)},
        "MH-MoE (head=2)": {"50%": (28.84, 24.27, 31.86), "100%": (26.59, 21.11, 29.27)},
        "MH-MoE (head=3)": {"50%": (28.77, 24.13, 31.81), "100%": (26.47, 21.06, 29.14)}},
    # Tables 4 and 5 report a single column (the 50k-step models of Table 1 match their full rows).
    4: {"SMoE": {"50%": (11.87, 10.51, 15.63)}, "SMoE + head & merge": {"50%": (11.84, 10.48, 15.61)},
        "Fine-grained SMoE": {"50%": (11.68, 10.18, 15.21)},
        "Fine-grained SMoE + head & merge": {"50%": (11.67, 10.18, 15.19)},
        "MH-MoE (head=2) w/o head & merge": {"50%": (11.71, 10.16, 15.23)},
        "MH-MoE (head=2) + head & merge": {"50%": (11.46, 9.98, 14.89)}},
    5: {"w/o head, w/o merge": {"50%": (11.97, 10.40, 15.52)}, "w/ head, w/o merge": {"50%": (11.74, 10.18, 15.17)},
        "w/o head, w/ merge": {"50%": (11.84, 10.27, 15.36)}, "w/ head, w/ merge": {"50%": (11.60, 10.11, 15.11)}},
}


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-seed paired differences and its Student-t interval with n-1 degrees of freedom.

    Returns (mean, lo, hi); with fewer than 2 differences lo = hi = nan (no spread, no interval).
    """
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t as student_t

    half = student_t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, float(mean - half), float(mean + half)


def bitnet_available() -> bool:
    from mhmoe.model import ModelConfig

    return "bitnet" in ModelConfig.__dataclass_fields__


def run_id(row: Row, seed: int) -> str:
    return f"{row.variant}{'-bitnet' if row.bitnet else ''}-s{seed}"


@dataclass
class PlannedRun:
    run_id: str
    row: Row
    seed: int
    cfg: TrainConfig
    tables: list[int]


def plan(preset_name: str, tables: list[int], seeds: int, overrides: list[str] | None = None) -> list[PlannedRun]:
    """The unique runs the chosen tables need, identical configurations planned once: every run of seed 0 in
    table order, then every run of seed 1, ..., so that a matrix stopped early already has whole tables."""
    from mhmoe.train import resolve_config

    runs: dict[str, PlannedRun] = {}
    for t in tables:
        for row in TABLES[t][1]:
            if row.bitnet and not bitnet_available():
                continue
            for s in range(seeds):
                rid = run_id(row, s)
                if rid in runs:
                    runs[rid].tables.append(t)
                    continue
                cfg = resolve_config(preset_name, row.variant, list(overrides or [])).replace(seed=SEED_BASE + s)
                if row.bitnet:  # the b1.58 recipe: higher peak LR, two-stage LR, weight decay off at mid-training
                    cfg = (cfg.override("model.bitnet", True).override("optim.schedule", "two_stage")
                           .override("optim.wd_off_at", 0.5)
                           .override("optim.lr", cfg.optim.lr * BITNET_LR_SCALE))
                runs[rid] = PlannedRun(rid, row, s, cfg, [t])
    return sorted(runs.values(), key=lambda r: r.seed)  # stable: table order within a seed


# ----------------------------------------------------------------------------------------------------------
# Running the matrix


def _eval_cached(run_dir: Path, step: int, cfg: TrainConfig, data_root, cache_dir) -> dict[str, Any]:  # noqa: ANN001
    from mhmoe.evaluate import evaluate_run

    path = run_dir / f"eval_step{step:07d}.json"
    if path.is_file():
        res = json.loads(path.read_text(encoding="utf-8"))
        if res.get("max_tokens") == cfg.data.max_eval_tokens:
            return res
    res = evaluate_run(run_dir, step, list(cfg.data.eval_domains), cfg.data.max_eval_tokens, data_root, cache_dir)
    res["max_tokens"] = cfg.data.max_eval_tokens
    atomic_write_text(path, json.dumps(res, indent=2))
    return res


def execute(runs: list[PlannedRun], out: Path, data_root, cache_dir, progress: bool = True,  # noqa: ANN001
            log: Callable[[str], None] = print, report_only: bool = False,
            workers: int = 1) -> dict[str, dict[str, Any]]:
    """Train and evaluate every planned run (skipping finished work); returns {run_id: info}.

    Several processes may share one `out` (e.g. one per core): each run is locked while a process trains and
    evaluates it, a process skips runs locked by another and, after its own pass, waits for them to finish so
    that every process reports the whole matrix.

    report_only: train nothing; evaluate and report the runs that have reached their last step.
    workers: how many processes share the matrix (for the ETA only).
    """
    from mhmoe.checkpoint import RunBusy, latest_good_checkpoint, run_lock

    results: dict[str, dict[str, Any]] = {}
    durations: list[float] = []
    deferred: list[tuple[int, PlannedRun]] = []

    def run_one(i: int, r: PlannedRun, run_dir: Path) -> None:
        found = latest_good_checkpoint(run_dir) if run_dir.is_dir() else None
        finished = found is not None and found[0] >= r.cfg.steps
        if report_only and not finished:
            log(f"[{i + 1}/{len(runs)}] {r.run_id}: not finished, left out of the report")
            return
        remaining = len(runs) - i
        eta = (f", matrix ETA ~{statistics.mean(durations) * remaining / workers / 60:.1f} min" if durations
               else "")
        log(f"[{i + 1}/{len(runs)}] {r.run_id}: " + ("trained already" if finished else
                                                   f"{r.cfg.steps} steps of {r.cfg.tokens_per_step:,} tokens{eta}"))
        t0 = time.time()
        state = train(r.cfg, run_dir, data_root, cache_dir, progress=progress)
        evals = {f"{int(100 * m / r.cfg.steps)}%": _eval_cached(run_dir, m, r.cfg, data_root, cache_dir)
                 for m in r.cfg.milestones}
        spent = time.time() - t0
        if state.wall_s > 5 and state.step > 0:
            durations.append(spent)
        results[r.run_id] = {"run": r, "evals": evals, "wall_s": train_wall(run_dir)}

    for i, r in enumerate(runs):
        run_dir = out / "runs" / r.run_id
        if report_only and not run_dir.is_dir():  # no lock: it would create the directory of a run never started
            log(f"[{i + 1}/{len(runs)}] {r.run_id}: not started, left out of the report")
            continue
        try:
            with run_lock(run_dir):
                run_one(i, r, run_dir)
        except RunBusy as e:
            log(f"[{i + 1}/{len(runs)}] {r.run_id}: in use by another process (pid {e.pid}); back to it at the end")
            deferred.append((i, r))
    for i, r in deferred:
        run_dir = out / "runs" / r.run_id
        log(f"[{i + 1}/{len(runs)}] {r.run_id}: waiting for the other process")
        with run_lock(run_dir, wait=True):
            run_one(i, r, run_dir)
    return results


def train_wall(run_dir: Path) -> float:
    """Seconds spent training a run (all invocations); for runs without a record, the sum of step times."""
    path = run_dir / "train_wall.json"
    if path.is_file():
        return float(json.loads(path.read_text(encoding="utf-8"))["wall_s"])
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return sum(r["tokens"] / r["step"] / r["tok_per_s"] for r in recs if r.get("tok_per_s"))


# ----------------------------------------------------------------------------------------------------------
# Numbers, verdicts, report


def collect(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (run, milestone, domain): the content of results.json."""
    recs = []
    for rid, info in results.items():
        r: PlannedRun = info["run"]
        counts = model_param_count(r.cfg.model)
        for col, ev in info["evals"].items():
            for dom, m in ev["domains"].items():
                recs.append({
                    "run_id": rid, "variant": r.row.variant, "bitnet": r.row.bitnet, "tables": r.tables,
                    "seed": r.seed, "step": ev["step"], "column": col, "tokens_seen": ev["tokens_seen"],
                    "domain": dom, "loss": m["loss"], "ppl": m["ppl"], "eval_tokens": m["tokens"],
                    "eval_docs": m["docs"], "params": counts["total"], "active_params": counts["active"],
                    "flops_per_token": model_flops_per_token(r.cfg.model), "wall_s": info["wall_s"],
                })
    return recs


def _ppl(recs: list[dict], variant: str, bitnet: bool, column: str, domain: str) -> list[float]:
    """Per-seed perplexities of one cell, ordered by seed."""
    cell = [x for x in recs if x["variant"] == variant and x["bitnet"] == bitnet and x["column"] == column
            and x["domain"] == domain]
    return [x["ppl"] for x in sorted(cell, key=lambda x: x["seed"])]


@dataclass
class Comparison:
    worse: str
    better: str
    rel_gap: float  # mean over seeds of mean over domains of (ppl_worse - ppl_better) / ppl_better
    threshold: float  # the noise level it is compared against
    status: str  # "holds", "reversed", "within noise"


SINGLE_SEED_FLOOR = 0.005  # with one seed there is no spread: gaps under 0.5% count as noise
MULTI_SEED_FLOOR = 0.002


def compare(worse: dict[str, list[float]], better: dict[str, list[float]], names: tuple[str, str]) -> Comparison:
    """Is `worse` really worse (higher perplexity)? worse/better: {domain: per-seed ppl}.

    The gap per seed is averaged over domains; with several seeds the threshold is two standard errors of the
    per-seed gaps (at least 0.2%), with one seed a fixed 0.5% floor.
    """
    n = min(len(v) for v in list(worse.values()) + list(better.values()))
    gaps = [statistics.mean((worse[d][s] - better[d][s]) / better[d][s] for d in worse) for s in range(n)]
    mean = statistics.mean(gaps)
    if n > 1:
        threshold = max(2 * statistics.stdev(gaps) / math.sqrt(n), MULTI_SEED_FLOOR)
    else:
        threshold = SINGLE_SEED_FLOOR
    status = "holds" if mean > threshold else "reversed" if mean < -threshold else "within noise"
    return Comparison(names[0], names[1], mean, threshold, status)


def _cells(recs: list[dict], variant: str, bitnet: bool, column: str = "100%") -> dict[str, list[float]]:
    return {d: _ppl(recs, variant, bitnet, column, d) for d in DOMAINS}


def _chain_verdict(claim: str, recs: list[dict], rows: list[Row]) -> dict[str, Any]:
    """Claim that perplexity strictly decreases along `rows`."""
    comps = [compare(_cells(recs, a.variant, a.bitnet), _cells(recs, b.variant, b.bitnet), (a.label, b.label))
             for a, b in zip(rows, rows[1:])]
    return _summarise(claim, comps)


def _summarise(claim: str, comps: list[Comparison]) -> dict[str, Any]:
    if any(c.status == "reversed" for c in comps):
        verdict = "does not hold"
    elif all(c.status == "holds" for c in comps):
        verdict = "holds"
    else:
        verdict = "within noise"
    detail = "; ".join(
        f"{c.better} vs {c.worse}: {100 * c.rel_gap:+.2f}% ({c.status}, noise {100 * c.threshold:.2f}%)" for c in comps
    )
    return {"claim": claim, "verdict": verdict, "detail": detail,
            "comparisons": [c.__dict__ for c in comps]}


def verdicts(recs: list[dict], tables: list[int]) -> dict[int, dict[str, Any]]:
    """One verdict per paper claim (T1-T5) computed from the final-step numbers."""
    out: dict[int, dict[str, Any]] = {}
    have = {(x["variant"], x["bitnet"]) for x in recs}

    def ready(rows: list[Row]) -> bool:
        return all((r.variant, r.bitnet) in have for r in rows)

    chain_claims = {1: "Dense > SMoE > Fine-grained > MH h=2 > MH h=3 in perplexity",
                    2: "with a shared expert: SMoE > Fine-grained > MH h=2 > MH h=3",
                    3: "under BitNet: Dense > SMoE > Fine-grained > MH h=2 > MH h=3"}
    for t in (1, 2, 3):
        if t not in tables:
            continue
        rows = TABLES[t][1]
        if t == 3 and not bitnet_available():
            out[t] = {"claim": chain_claims[t], "verdict": "not run", "detail": "BitNet is not available yet"}
        elif ready(rows):
            out[t] = _chain_verdict(chain_claims[t], recs, rows)
    if 4 in tables and ready(TABLES[4][1]):
        # Gain of adding head & merge, relative, per family; MH-MoE's must exceed both baselines' gains.
        def gain(without: str, with_: str) -> list[float]:
            a, b = _cells(recs, without, False), _cells(recs, with_, False)
            n = min(len(v) for v in list(a.values()) + list(b.values()))
            return [statistics.mean((a[d][s] - b[d][s]) / b[d][s] for d in DOMAINS) for s in range(n)]

        mh = gain("mhmoe-h2-nohm", "mhmoe-h2")
        comps = []
        for name, (wo, w) in {"SMoE": ("smoe", "smoe-hm"), "Fine-grained": ("fine-grained", "fine-grained-hm")}.items():
            base = gain(wo, w)
            diff = [m - b for m, b in zip(mh, base)]
            n = len(diff)
            thr = max(2 * statistics.stdev(diff) / math.sqrt(n), MULTI_SEED_FLOOR) if n > 1 else SINGLE_SEED_FLOOR
            mean = statistics.mean(diff)
            status = "holds" if mean > thr else "reversed" if mean < -thr else "within noise"
            comps.append(Comparison(f"{name} gain {100 * statistics.mean(base):+.2f}%",
                                    f"MH h=2 gain {100 * statistics.mean(mh):+.2f}%", mean, thr, status))
        out[4] = _summarise("head & merge layers help MH-MoE much more than SMoE / fine-grained SMoE", comps)
    if 5 in tables and ready(TABLES[5][1]):
        rows = {r.variant: r for r in TABLES[5][1]}
        head_only, merge_only = rows["mhmoe-h2-nomerge"], rows["mhmoe-h2-nohead"]
        main = compare(_cells(recs, merge_only.variant, False), _cells(recs, head_only.variant, False),
                       (merge_only.label, head_only.label))
        out[5] = _summarise("the head layer contributes more than the merge layer", [main])
    return out


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def _fmt_cell(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def render_tables(recs: list[dict], tables: list[int], preset: str, verdict: dict[int, dict]) -> str:
    """tables.md: one markdown table per paper table in the paper's layout, ours beside the paper's."""
    lines = [f"# MH-MoE reproduction, preset `{preset}`", "",
             "Validation perplexity (lower is better); **bold** = best of our rows in that column and step. "
             "`paper` = the published number (12 layers, d=768, 100k steps of 0.5M tokens). "
             "Columns 50% / 100% are the paper's 50k / 100k steps scaled to this preset's budget.", ""]
    for t in tables:
        caption, rows = TABLES[t]
        lines += [f"## Table {t}", "", caption, ""]
        if t == 3 and not bitnet_available():
            lines += ["_Not run: BitNet training is not available in this build yet._", ""]
            continue
        lines.append("| Model | Step | " + " | ".join(f"{DOMAIN_TITLES[d]} (paper)" for d in DOMAINS)
                     + " | Params | Active | FLOPs/token |")
        lines.append("|---|---|" + "---|" * len(DOMAINS) + "---|---|---|")
        for col in ("50%", "100%"):
            best = {}
            for d in DOMAINS:
                means = [statistics.mean(v) for v in (_ppl(recs, r.variant, r.bitnet, col, d) for r in rows) if v]
                best[d] = min(means) if means else None
            for r in rows:
                cells = []
                for i, d in enumerate(DOMAINS):
                    vals = _ppl(recs, r.variant, r.bitnet, col, d)
                    txt = _fmt_cell(vals)
                    if vals and best[d] is not None and math.isclose(statistics.mean(vals), best[d]):
                        txt = f"**{txt}**"
                    paper = PAPER.get(t, {}).get(r.label, {}).get(col)
                    cells.append(f"{txt} ({paper[i]:.2f})" if paper else txt)
                meta = next((x for x in recs if x["variant"] == r.variant and x["bitnet"] == r.bitnet), None)
                counts = (f"{_si(meta['params'])} | {_si(meta['active_params'])} | "
                          f"{_si(meta['flops_per_token'])}") if meta else "- | - | -"
                step = next((x["step"] for x in recs if x["variant"] == r.variant and x["bitnet"] == r.bitnet
                             and x["column"] == col), "-")
                lines.append(f"| {r.label} | {col} ({step}) | " + " | ".join(cells) + f" | {counts} |")
        lines.append("")
        if t in verdict:
            v = verdict[t]
            lines += [f"**Claim T{t}: {v['claim']} — {v['verdict'].upper()}.** {v['detail']}", ""]
    return "\n".join(lines)


def plots(results: dict[str, dict[str, Any]], recs: list[dict], out: Path, tables: list[int]) -> list[Path]:
    """Validation-loss curves per variant, perplexity bars per domain, expert-load histograms per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for t in tables:
        rows = [r for r in TABLES[t][1] if any(x["variant"] == r.variant and x["bitnet"] == r.bitnet for x in recs)]
        if not rows:
            continue
        # Curves (seed 0) from evals.jsonl.
        fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5 * len(DOMAINS), 3.6), squeeze=False)
        for r in rows:
            info = results.get(run_id(r, 0))
            if not info:
                continue
            path = out / "runs" / run_id(r, 0) / "evals.jsonl"
            pts = [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []
            for ax, d in zip(axes[0], DOMAINS):
                ax.plot([p["tokens"] / 1e6 for p in pts if d in p], [p[d] for p in pts if d in p], marker="o",
                        ms=3, label=r.label)
        for ax, d in zip(axes[0], DOMAINS):
            ax.set_title(f"Table {t}: {DOMAIN_TITLES[d]}")
            ax.set_xlabel("training tokens (M)")
            ax.set_ylabel("validation loss (nats)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        made.append(plot_dir / f"table{t}_val_loss.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
        # Perplexity bars at 100%.
        fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5 * len(DOMAINS), 3.6), squeeze=False)
        for ax, d in zip(axes[0], DOMAINS):
            vals = [_ppl(recs, r.variant, r.bitnet, "100%", d) for r in rows]
            means = [statistics.mean(v) if v else float("nan") for v in vals]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.bar(range(len(rows)), means, yerr=errs, color=[f"C{i}" for i in range(len(rows))])
            ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right", fontsize=7)
            # Zoomed to the bars and their error bars (the seed std), so that the spread stays visible.
            lo = min(m - e for m, e in zip(means, errs) if m == m)
            hi = max(m + e for m, e in zip(means, errs) if m == m)
            ax.set_ylim(lo - 0.03 * (hi - lo) - 0.01 * lo, hi + 0.03 * (hi - lo) + 0.005 * hi)
            ax.set_title(f"Table {t}: {DOMAIN_TITLES[d]} perplexity (100%)")
        fig.tight_layout()
        made.append(plot_dir / f"table{t}_ppl.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    # Expert load of the final step, one figure per MoE run (seed 0).
    for rid, info in results.items():
        if info["run"].seed != 0 or info["run"].cfg.model.moe_ffn.kind != "moe":
            continue
        path = out / "runs" / rid / "metrics.jsonl"
        if not path.is_file():
            continue
        last = json.loads(path.read_text().splitlines()[-1])
        loads = last.get("tokens_per_expert") or []
        if not loads:
            continue
        fig, axes = plt.subplots(1, len(loads), figsize=(4 * len(loads), 3), squeeze=False)
        for i, (ax, load) in enumerate(zip(axes[0], loads)):
            mean = sum(load) / len(load)
            ax.bar(range(len(load)), [x / mean for x in load], width=1.0)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(f"{rid}: MoE layer {i}", fontsize=8)
            ax.set_xlabel("expert")
            ax.set_ylabel("load / mean")
        fig.tight_layout()
        made.append(plot_dir / f"load_{rid}.png")
        fig.savefig(made[-1], dpi=90)
        plt.close(fig)
    return made


def report(results: dict[str, dict[str, Any]], out: Path, tables: list[int], preset: str) -> str:
    recs = collect(results)
    verdict = verdicts(recs, tables)
    md = render_tables(recs, tables, preset, verdict)
    walls = "\n".join(f"| {rid} | {info['wall_s']:.0f} |" for rid, info in results.items())
    md += "\n## Training wall time per run (seconds)\n\n| run | wall s |\n|---|---|\n" + walls + "\n"
    atomic_write_text(out / "tables.md", md)
    atomic_write_text(out / "results.json", json.dumps(
        {"preset": preset, "tables": tables, "records": recs,
         "verdicts": {f"T{t}": v for t, v in verdict.items()}}, indent=2))
    plots(results, recs, out, tables)
    return md


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_tables(text: str) -> list[int]:
    from mhmoe.cli import UserError

    try:
        tables = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--tables: expected a comma-separated list of 1-5, got {text!r}") from None
    if not tables or any(t not in TABLES for t in tables):
        raise UserError(f"--tables: tables are 1, 2, 3, 4, 5; got {text!r}")
    return tables


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _start_workers(args: argparse.Namespace, out: Path, overrides: list[str]) -> list[subprocess.Popen]:
    """Start args.workers - 1 more processes of this command on the same `out`; the run locks share the matrix."""
    argv = [sys.executable, "-m", "mhmoe.cli", "reproduce", "--preset", args.preset, "--tables", args.tables,
            "--seeds", str(args.seeds), "--out", str(out), "--workers", str(args.workers), "--worker", "--no-progress"]
    for kv in overrides:
        argv += ["--set", kv]
    for flag, value in (("--data-root", args.data_root), ("--cache-dir", args.cache_dir)):
        if value:
            argv += [flag, value]
    procs = []
    for k in range(2, args.workers + 1):
        log = open(out / f"worker-{k}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _cli(args: argparse.Namespace) -> int:
    from mhmoe.cli import UserError

    tables = parse_tables(args.tables)
    if args.seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {args.seeds}")
    if args.workers < 1:
        raise UserError(f"--workers: must be >= 1, got {args.workers}")
    out = Path(args.out)
    overrides = list(args.set or [])
    if args.workers > 1 and not any(kv.split("=", 1)[0].strip() == "threads" for kv in overrides):
        # One process per core beats one process over all cores for these small models (measured; README).
        overrides.append(f"threads={max(1, _available_cores() // args.workers)}")
    runs = plan(args.preset, tables, args.seeds, overrides)
    print(f"mhmoe reproduce: preset {args.preset}, tables {','.join(map(str, tables))}, {args.seeds} seed(s): "
          f"{len(runs)} runs in {out}" + (f", {args.workers} worker processes" if args.workers > 1 else ""),
          flush=True)
    if args.dry_run:
        for r in runs:
            print(f"  {r.run_id:<28} tables {r.tables}  steps {r.cfg.steps}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or str(out / "cache")
    started = args.workers > 1 and not (args.report_only or args.worker)
    workers = _start_workers(args, out, overrides) if started else []
    try:
        results = execute(runs, out, args.data_root, cache, progress=not args.no_progress,
                          log=lambda m: print(m, flush=True), report_only=args.report_only, workers=args.workers)
    except BaseException:
        for w in workers:
            w.terminate()
        raise
    finally:
        for w in workers:  # normally finished already: execute() waited for every run they held
            w.wait()
    failed = [k for k, w in enumerate(workers, start=2) if w.returncode]
    for k in failed:  # their runs were finished by this process after their locks were released
        print(f"worker {k} exited with {workers[k - 2].returncode}; its log: {out / f'worker-{k}.log'}", flush=True)
    if args.worker:
        return 0
    md = report(results, out, tables, args.preset)
    print(md)
    print(f"wrote {out / 'tables.md'}, {out / 'results.json'} and {out / 'plots'}/")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="train, evaluate and report the paper's Tables 1-5")
    p.add_argument("--preset", default="demo", help="smoke, demo, tiny, gpu or paper (default demo)")
    p.add_argument("--tables", default="1,2,3,4,5", help="comma-separated tables (default 1,2,3,4,5)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per model (mean ± std when > 1)")
    p.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field in every run")
    p.add_argument("--data-root", default=None, help="corpora folder (default: $MHMOE_DATA_ROOT)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: OUT/cache)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: evaluate and report the runs that are finished (partial tables)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the matrix, each with cores/workers threads (default 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a started worker: no report
    p.set_defaults(func=_cli)
