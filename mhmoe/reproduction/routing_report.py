"""Routing health of finished (or running) runs, read from metrics.jsonl: `mhmoe inspect RUN`, the routing section
of `mhmoe reproduce`'s tables.md, and the load heatmaps.

Per step and MoE layer, metrics.jsonl holds (mhmoe.training.routing_health; docs/ROUTING.md) load_cv,
load_max_mean, dead_experts, expert_activation, subtoken_distinct (MH-MoE), router_entropy_per_layer, bias_norm
(aux-loss-free runs) and tokens_per_expert. Runs written before those keys existed still give load CV and max/mean
(computed here from tokens_per_expert) and the mean entropy; the rest reads "not measured".

Collapse. A layer has collapsed at step s when one expert receives at least half of the (sub-)tokens, i.e.
load_max_mean >= COLLAPSE_SHARE * E / K (max/mean is E/K when one expert is in every (sub-)token's top-k), at s
and at each of the next COLLAPSE_PERSIST - 1 recorded steps (fewer at the end of the run): a persistent takeover,
not a one-step spike.

Milestones (`mhmoe reproduce`): a value at the 50% or 100% milestone m is the mean over the recorded steps within
m +- max(1, round(MILESTONE_WINDOW * steps)), the layers averaged (dead experts: summed over the layers).

Shape legend: L MoE layers, E experts, K top-k, S recorded steps.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from mhmoe.errors import UserError
from mhmoe.reproduction.verdicts import COLUMNS, paired, summarise

COLLAPSE_SHARE = 0.5  # one expert takes at least this share of the (sub-)tokens ...
COLLAPSE_PERSIST = 10  # ... at this many consecutive recorded steps
MILESTONE_WINDOW = 0.05  # half-width of the averaging window around a milestone, as a fraction of the steps
HEALTH_KEYS = ("expert_activation", "load_cv", "load_max_mean", "dead_experts", "subtoken_distinct", "bias_norm")
ACTIVATION_CLAIM = "MH-MoE activates more experts than SMoE at equal FLOPs (MH-MoE v1, arXiv 2404.15045)"


# ----------------------------------------------------------------------------------------------------------
# Reading a run


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The step records of RUN_DIR/metrics.jsonl (a torn last line skipped); UserError (one line) otherwise."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"RUN: {run_dir} is not a directory; pass the --out of a `mhmoe train` run")
    if not path.is_file():
        raise UserError(f"RUN: {run_dir} has no metrics.jsonl; pass the --out of a `mhmoe train` run that has "
                        "trained at least one step")
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            recs.append(rec)
    if not recs:
        raise UserError(f"RUN: {path} holds no step records yet; train the run first")
    return recs


def _cv(load: list[float]) -> float:
    mean = statistics.fmean(load)
    return statistics.pstdev(load) / mean if mean else math.nan


def layer_values(rec: dict[str, Any], key: str) -> list[float] | None:
    """Per-layer values of `key` in one record; CV and max/mean from tokens_per_expert for older runs; None
    when the record does not measure it."""
    got = rec.get(key)
    if isinstance(got, list):
        return [math.nan if v is None else float(v) for v in got]
    loads = rec.get("tokens_per_expert")
    if key == "load_cv" and loads:
        return [_cv(l) for l in loads]
    if key == "load_max_mean" and loads:
        return [max(l) / statistics.fmean(l) if sum(l) else math.nan for l in loads]
    if key == "router_entropy_per_layer" and isinstance(rec.get("router_entropy"), (int, float)):
        return [float(rec["router_entropy"])] * len(loads or [0])  # older runs: the mean over layers only
    return None


def collapse_step(max_mean: list[float], steps: list[int], limit: float,
                  persist: int = COLLAPSE_PERSIST) -> int | None:
    """The first step from which max_mean stays >= limit for `persist` recorded steps (or to the end)."""
    for i in range(len(max_mean)):
        window = max_mean[i:i + persist]
        if all(v >= limit for v in window):
            return steps[i]
    return None


def recovery_step(max_mean: list[float], steps: list[int], limit: float, collapsed_at: int | None,
                  persist: int = COLLAPSE_PERSIST) -> int | None:
    """After a collapse at step `collapsed_at`, the first step from which max_mean stays < limit for `persist`
    recorded steps (or to the end); None when there was no collapse or the layer never recovered."""
    if collapsed_at is None:
        return None
    for i in range(steps.index(collapsed_at), len(max_mean)):
        if all(v < limit for v in max_mean[i:i + persist]):
            return steps[i]
    return None


def _ffn(cfg: dict[str, Any]) -> dict[str, Any]:
    return (cfg.get("model") or {}).get("moe_ffn") or {}


def _load_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"RUN: {path} is missing or unreadable ({e.__class__.__name__}); pass the --out of a "
                        "`mhmoe train` run") from None


def inspect_run(run_dir: str | Path) -> dict[str, Any]:
    """The routing health of one run: per MoE layer the metrics at the first, middle and last recorded step, the
    collapse step (or None), and the run's routing settings."""
    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    cfg = _load_config(run_dir)
    ffn = _ffn(cfg)
    if ffn.get("kind", "moe") != "moe":
        raise UserError(f"RUN: {run_dir} trains a dense model (no MoE layer); there is no routing to inspect")
    E, K, heads = int(ffn.get("num_experts", 8)), int(ffn.get("top_k", 1)), int(ffn.get("heads", 1))
    n_layers = len(recs[-1].get("tokens_per_expert") or [])
    points = {"start": recs[0], "middle": recs[(len(recs) - 1) // 2], "end": recs[-1]}
    steps = [r["step"] for r in recs]
    limit = COLLAPSE_SHARE * E / K
    layers = []
    for i in range(n_layers):
        layer: dict[str, Any] = {"index": i, "points": {}}
        for name, rec in points.items():
            vals: dict[str, Any] = {"step": rec["step"]}
            for key in HEALTH_KEYS:
                got = layer_values(rec, key)
                vals[key] = got[i] if got is not None and i < len(got) else None
            ent = layer_values(rec, "router_entropy_per_layer")
            vals["entropy_frac"] = ent[i] / math.log(E) if ent is not None and i < len(ent) and E > 1 else None
            layer["points"][name] = vals
        series = [layer_values(r, "load_max_mean") for r in recs]
        mm = [s[i] if s is not None and i < len(s) else math.nan for s in series]
        layer["collapse_step"] = collapse_step(mm, steps, limit)
        layer["recovery_step"] = recovery_step(mm, steps, limit, layer["collapse_step"])
        layers.append(layer)
    return {"run": str(run_dir), "variant": cfg.get("variant"), "preset": cfg.get("preset"),
            "steps_recorded": len(recs), "last_step": steps[-1], "steps": cfg.get("steps"),
            "num_experts": E, "top_k": K, "heads": heads, "scoring": ffn.get("scoring", "softmax"),
            "balancing": ffn.get("balancing", "aux_loss"), "collapse_max_mean": limit, "layers": layers}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, float) and v.is_integer() and digits == 0:
        return str(int(v))
    return f"{v:.{digits}f}"


def format_inspect(info: dict[str, Any]) -> str:
    """`mhmoe inspect`'s text."""
    lines = [f"run {info['run']}: {info['variant']} (preset {info['preset']}), {info['steps_recorded']} steps "
             f"recorded (last {info['last_step']} of {info['steps']}); E={info['num_experts']}, "
             f"K={info['top_k']}, heads={info['heads']}, scoring={info['scoring']}, balancing={info['balancing']}"]
    rows = [("expert activation", "expert_activation", 3), ("load CV", "load_cv", 3),
            ("load max/mean", "load_max_mean", 2), ("dead experts", "dead_experts", 0),
            ("entropy / ln E", "entropy_frac", 3)]
    if info["heads"] > 1:
        rows.append(("sub-tokens distinct", "subtoken_distinct", 3))
    if info["balancing"] != "aux_loss":
        rows.append(("bias norm", "bias_norm", 4))
    for layer in info["layers"]:
        pts = layer["points"]
        head = f"MoE layer {layer['index']}"
        lines += ["", f"{head:<22}" + "".join(f"{name + ' (' + str(p['step']) + ')':>18}" for name, p in pts.items())]
        for label, key, digits in rows:
            lines.append(f"  {label:<20}" + "".join(f"{_fmt(p[key], digits):>18}" for p in pts.values()))
        c, r = layer["collapse_step"], layer.get("recovery_step")
        what = "none" if c is None else f"at step {c}, " + (f"recovered at step {r}" if r is not None
                                                             else "not recovered by the last step")
        lines.append(f"  collapse: {what} (load max/mean >= "
                     f"{info['collapse_max_mean']:.3g} = {COLLAPSE_SHARE:g} * E/K for {COLLAPSE_PERSIST} steps)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Milestones and the activation claim (`mhmoe reproduce`)


def milestone_health(recs: list[dict[str, Any]], step: int, total_steps: int) -> dict[str, float | None]:
    """expert_activation, load_cv (layer means), dead_experts (summed over layers) averaged over the records
    within step +- max(1, round(MILESTONE_WINDOW * total_steps)); None for a metric the run does not record."""
    half = max(1, round(MILESTONE_WINDOW * total_steps))
    window = [r for r in recs if abs(r["step"] - step) <= half]
    out: dict[str, float | None] = {}
    for key, agg in (("expert_activation", statistics.fmean), ("load_cv", statistics.fmean),
                     ("dead_experts", sum)):
        vals = [layer_values(r, key) for r in window]
        vals = [v for v in vals if v]
        out[key] = statistics.fmean(agg(v) for v in vals) if vals and len(vals) == len(window) else None
    out["window"] = [window[0]["step"], window[-1]["step"]] if window else None
    return out


def run_routing(run_dir: Path, milestones: tuple[int, int], total_steps: int) -> dict[str, Any]:
    """{"50%": milestone_health, "100%": ...} of a run directory; {} without metrics."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    try:
        recs = read_metrics(run_dir)
    except UserError:
        return {}
    return {col: milestone_health(recs, m, total_steps) for col, m in zip(COLUMNS, milestones)}


_MH = re.compile(r"^mhmoe-h[0-9]+((?:-(?:shared|sigmoid|alf))*)$")


def activation_pairs(variants: set[str]) -> list[tuple[str, str]]:
    """(MH-MoE variant, its FLOPs-equal SMoE) for every MH-MoE variant whose SMoE twin (same shared/routing
    suffixes) is present: mhmoe-h2 / smoe, mhmoe-h3-shared / smoe-shared, mhmoe-h3-alf / smoe-alf, ..."""
    out = []
    for v in sorted(variants):
        m = _MH.match(v)
        if m and f"smoe{m.group(1)}" in variants:
            out.append((v, f"smoe{m.group(1)}"))
    return out


def activation_claim(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The v1 claim on seed-paired expert activation: per column, per (MH-MoE, SMoE) pair, the mean of
    activation(MH-MoE) - activation(SMoE) over the paired seeds with its 95% Student-t interval (mhmoe.reproduction.verdicts),
    "holds" when the interval lies above 0.

    runs: {run_id: {"variant" (with "-bitnet" for BitNet twins), "seed", "routing": run_routing(...)}}.
    """
    by: dict[tuple[str, int], float] = {}
    for r in runs.values():
        act = (r.get("routing") or {})
        for col in COLUMNS:
            v = (act.get(col) or {}).get("expert_activation")
            if v is not None:
                by[(f"{r['variant']}@{col}", r["seed"])] = v
    variants = {r["variant"] for r in runs.values()}
    out: dict[str, Any] = {"claim": ACTIVATION_CLAIM, "columns": {}}
    for col in COLUMNS:
        comps, shown = [], []
        for mh, smoe in activation_pairs({v.removesuffix("-bitnet") for v in variants}):
            for suffix in ("", "-bitnet"):
                a, b = f"{mh}{suffix}@{col}", f"{smoe}{suffix}@{col}"
                seeds = sorted({s for (k, s) in by if k == a} & {s for (k, s) in by if k == b})
                if not seeds:
                    continue
                # Negated so that, as for every claim in mhmoe.reproduction.verdicts, a negative difference means "holds".
                c = paired({s: by[(b, s)] - by[(a, s)] for s in seeds}, mh + suffix, smoe + suffix, col)
                comps.append(c)
                shown.append({"mh": mh + suffix, "smoe": smoe + suffix, "column": col, "n_seeds": c.n_seeds,
                              "mean_diff": -c.mean_diff_nats,
                              "ci95": [-c.ci95[1], -c.ci95[0]] if c.ci95 else None, "verdict": c.verdict,
                              "seeds": c.seeds})
        if comps:
            out["columns"][col] = {"verdict": summarise(ACTIVATION_CLAIM, comps), "comparisons": shown}
    head = "100%" if "100%" in out["columns"] else next(iter(out["columns"]), None)
    out["verdict"] = out["columns"][head]["verdict"] if head else "not measured"
    out["column"] = head
    return out


def routing_section(runs: dict[str, dict[str, Any]], claim: dict[str, Any] | None = None) -> list[str]:
    """tables.md lines: activation, load CV and dead experts per variant at the milestones, and the claim
    (`activation_claim(runs)` unless given, e.g. labelled by the sanity check)."""
    lines = ["## Routing", "",
             "Per variant, mean over seeds (and over MoE layers; dead experts summed over layers) of the metrics.jsonl "
             f"values within ±{MILESTONE_WINDOW:.0%} of the steps around each milestone. Expert activation: the "
             "fraction of experts that receive at least one (sub-)token of a sequence, averaged over sequences "
             "(MH-MoE v1); load CV: std/mean of the tokens per expert; dead: experts without a token in the last "
             "TrainConfig.dead_expert_window steps (docs/ROUTING.md).", "",
             "| variant | activation 50% | activation 100% | load CV 50% | load CV 100% | dead 50% | dead 100% |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in runs.values():
        by_variant.setdefault(r["variant"], []).append(r)
    for v, rs in by_variant.items():
        cells = []
        for key, digits in (("expert_activation", 3), ("load_cv", 3), ("dead_experts", 1)):
            for col in COLUMNS:
                vals = [((r.get("routing") or {}).get(col) or {}).get(key) for r in rs]
                cells.append("not measured" if not vals or any(x is None for x in vals)
                             else f"{statistics.fmean(vals):.{digits}f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    claim = activation_claim(runs) if claim is None else claim
    measured = f" (measured: {claim['measured_verdict']})" if "measured_verdict" in claim else ""
    lines += ["", f"**Claim (v1): {claim['claim']} — {claim['verdict'].upper()}**{measured}"
              + (f" (at {claim['column']})." if claim["column"] else "."), ""]
    if not claim["columns"]:
        lines += ["No MH-MoE run with its FLOPs-equal SMoE and recorded expert activation: not measured.", ""]
        return lines
    lines += ["Δ = activation(MH-MoE) - activation(SMoE), seed-paired, with the 95% Student-t interval of "
              "mhmoe.reproduction.verdicts (n-1 degrees of freedom); holds when the interval lies above 0.", "",
              "| MH-MoE | SMoE (equal FLOPs) | column | Δ activation [95% CI] | n | verdict |",
              "|---|---|---|---|---:|---|"]
    for col, cv in claim["columns"].items():
        for c in cv["comparisons"]:
            ci = f" [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c["ci95"] else " (no interval)"
            lines.append(f"| {c['mh']} | {c['smoe']} | {col} | {c['mean_diff']:+.3f}{ci} | {c['n_seeds']} | "
                         f"{c['verdict']} |")
    return lines + [""]


# ----------------------------------------------------------------------------------------------------------
# The load heatmap


def plot_load_heatmap(recs: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Load per expert over training (tokens / mean tokens per expert), one panel per MoE layer, to `path`
    (PNG); None when the records carry no tokens_per_expert."""
    # matplotlib only here, as in mhmoe.reproduction.report.plots: `mhmoe` imports this module at start-up (inspect), and
    # the backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    recs = [r for r in recs if r.get("tokens_per_expert")]
    if not recs:
        return None
    n_layers = len(recs[-1]["tokens_per_expert"])
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(n_layers, 1, figsize=(9, 2.2 + 1.2 * n_layers), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        load = np.array([r["tokens_per_expert"][i] for r in recs], dtype=float).T  # [E, S]
        share = load / np.maximum(load.mean(axis=0, keepdims=True), 1e-9)
        im = ax.imshow(share, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load.shape[0] - 0.5))
        ax.set_ylabel(f"layer {i}: expert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    if title:
        axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
