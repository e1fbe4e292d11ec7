"""The report of a reproduction matrix: results.json, tables.md and plots/.

results.json holds one record per (run, milestone, domain), the verdicts with every comparison's paired
`mean_diff_nats`, `ci95` and `n_seeds` (mhmoe.reproduction.verdicts), per run its training health: router entropy as a
fraction of ln E over training and grad-norm spikes, and its routing at the milestones with the v1 expert-activation
claim (mhmoe.reproduction.routing_report). tables.md prints the paper's tables with ours beside them, the FLOPs of every row,
each claim's paired intervals, where a router stayed near uniform, and the routing section. Models passed to
`--models` that are no row of the tables (e.g. smoe-alf) are compared with SMoE in "Every model against SMoE".
Every record also holds its claims at every periodic evaluation ("curves", plots/differences_vs_tokens.png;
mhmoe.reproduction.curves), the config of every run ("run_configs"), and, with `--trend-against DIR`, the change of
each claim from a shorter record to this one ("trend" and "Trend with training length"; mhmoe.reproduction.trend).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from mhmoe.complexity import model_flops_per_token, model_param_count
from mhmoe.fileio import atomic_write_text
from mhmoe.reproduction.curves import paired_curves, plot_curves
from mhmoe.reproduction.paper_tables import DOMAIN_TITLES, DOMAINS, PAPER, TABLES, Row, run_id
from mhmoe.reproduction.routing_report import activation_claim, plot_load_heatmap, read_metrics, routing_section, run_routing
from mhmoe.reproduction.verdicts import (COLUMNS, NOT_INTERPRETABLE, Comparison, apply_sanity, label_claim, paper_ppl,
                            sanity_check, verdicts, versus_smoe)
from mhmoe.reproduction.trend import Shorter, trend, trend_lines

SPIKE_FACTOR = 5.0  # a step whose grad norm exceeds this multiple of the run's median counts as a spike
NEAR_UNIFORM = 0.99  # router entropy at or above this fraction of ln E at the end: the router barely routes


def collect(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (run, milestone, domain). `seed` is the seed id (what pairs runs), `seed_index` its place."""
    recs = []
    for rid, info in results.items():
        r = info["run"]
        counts = model_param_count(r.cfg.model)
        for col, ev in info["evals"].items():
            for dom, m in ev["domains"].items():
                recs.append({
                    "run_id": rid, "variant": r.row.variant, "model": r.model, "bitnet": r.row.bitnet,
                    "tables": r.tables,
                    "seed": r.cfg.seed, "seed_index": r.seed, "step": ev["step"], "column": col,
                    "tokens_seen": ev["tokens_seen"], "domain": dom, "loss": m["loss"], "ppl": m["ppl"],
                    "eval_tokens": m["tokens"], "eval_docs": m["docs"], "params": counts["total"],
                    "active_params": counts["active"], "flops_per_token": model_flops_per_token(r.cfg.model),
                    "wall_s": info["wall_s"],
                })
    return recs


def run_health(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """Router entropy / ln E at 10%, 25%, 50%, 75%, 100% of training, and grad-norm spikes, from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    out: dict[str, Any] = {"steps": len(recs)}
    norms = [r["grad_norm"] for r in recs
             if isinstance(r.get("grad_norm"), (int, float)) and math.isfinite(r["grad_norm"])]
    if norms:
        med = statistics.median(norms)
        spikes = [(r["step"], r["grad_norm"]) for r in recs if r.get("grad_norm", 0) > SPIKE_FACTOR * med]
        warmup = cfg.optim.warmup_steps
        out.update(grad_norm_median=med, grad_norm_max=max(norms), spikes=len(spikes),
                   spike_steps=[s for s, _ in spikes[:10]],
                   spike_steps_after_warmup=[s for s, _ in spikes if s > warmup])
    ffn = cfg.model.moe_ffn
    if ffn.kind == "moe" and recs:
        ln_e = math.log(ffn.num_experts)
        frac = {}
        for q in (0.1, 0.25, 0.5, 0.75, 1.0):
            rec = recs[max(0, min(len(recs), math.ceil(q * len(recs))) - 1)]
            frac[f"{int(q * 100)}%"] = rec["router_entropy"] / ln_e
        out["entropy_frac"] = frac
        out["near_uniform"] = frac["100%"] >= NEAR_UNIFORM
    return out


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def _ppl(recs: list[dict], row: Row, column: str, domain: str) -> list[float]:
    cell = [x for x in recs if x["variant"] == row.variant and x["bitnet"] == row.bitnet and x["column"] == column
            and x["domain"] == domain]
    return [x["ppl"] for x in sorted(cell, key=lambda x: x["seed"])]


def _fmt_cell(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def _fmt_ci(c: dict[str, Any]) -> str:
    if c["ci95"] is None:  # one seed
        return f"{c['mean_diff_nats']:+.4f} (no interval)"
    lo, hi = c["ci95"]
    return f"{c['mean_diff_nats']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _sanity_lines(sanity: dict[str, Any]) -> list[str]:
    """The sanity section at the top of tables.md: the check, its verdict, the SMoE - dense pair, the spikes."""
    lines = ["## Sanity check (before any claim)", "",
             f"{sanity['check'][0].upper()}{sanity['check'][1:]}: **{sanity['verdict'].upper()}**.", ""]
    c = sanity["smoe_vs_dense"]
    if c is not None:
        lines.append(f"- SMoE - dense at 100%: {_fmt_ci(c)} nats over {c['n_seeds']} seed(s); the paper: -0.136.")
    lines.append(f"- Runs with a grad-norm spike after warm-up: {len(sanity['spikes_after_warmup']) or 'none'}.")
    if sanity["verdict"] == "fails":
        lines += ["", f"Every claim below is therefore **{NOT_INTERPRETABLE}**; its measured verdict is given beside "
                  "it: " + "; ".join(sanity["reasons"]) + "."]
    return lines + [""]


def _comparison_lines(comps: list[dict[str, Any]], sane: bool = True) -> list[str]:
    """A table of comparisons; with sane=False (the sanity check failed) each verdict reads "not interpretable"
    with the measured one beside it."""
    lines = ["| model (claimed better) | against | Δ loss, nats, mean of 3 domains [95% CI] | n | verdict | "
             + " | ".join(f"Δ {DOMAIN_TITLES[d]}" for d in DOMAINS) + " | paper Δ |",
             "|---|---|---|---:|---|" + "---|" * len(DOMAINS) + "---|"]
    for c in comps:
        doms = " | ".join(_fmt_ci(c["per_domain"][d]) + f" {c['per_domain'][d]['verdict']}" for d in DOMAINS)
        paper = f"{c['paper_diff_nats']:+.4f}" if c.get("paper_diff_nats") is not None else "-"
        verdict = c["verdict"] if sane else f"{NOT_INTERPRETABLE} (measured: {c['verdict']})"
        lines.append(f"| {c['better']} | {c['worse']} | {_fmt_ci(c)} | {c['n_seeds']} | {verdict} | {doms} "
                     f"| {paper} |")
    return lines


def render_tables(recs: list[dict], tables: list[int], preset: str, verdict: dict[int, dict],
                  health: dict[str, dict[str, Any]], extra: list[Row] | None = None,
                  sanity: dict[str, Any] | None = None, profile: str = "mhmoe") -> str:
    """tables.md: the sanity verdict, then each table in the paper's layout with ours beside the paper's, FLOPs
    per row, paired claims.

    extra: rows of models outside the tables (`--models smoe-alf`), compared with SMoE with the others.
    sanity: `mhmoe.reproduction.verdicts.sanity_check`'s result (None: not computed, no section).
    profile: the MoE settings of the table rows ("mhmoe" ours, "authors" the -authors variants)."""
    lines = [f"# MH-MoE reproduction, preset `{preset}`", "", PROFILE_LINES[profile], "",
             "Validation perplexity (lower is better), mean ± std over seeds; **bold** = best of our rows in that "
             "column. `(paper)` = the published number (12 layers, d=768, 100k steps of 0.5M tokens). Columns "
             "50% / 100% are the paper's 50k / 100k steps scaled to this preset's budget. FLOPs are per token of "
             "the whole model; `x SMoE` shows which rows are FLOPs-equal.", "",
             "Claims are tested on seed-paired differences of mean evaluation loss (nats; negative = the claimed "
             "better model is better), with 95% Student-t intervals over the seeds (n-1 degrees of freedom): "
             "**holds** / **reversed** only when the interval excludes 0, else **within noise**; one seed gives "
             "no interval and no verdict.", ""]
    sane = sanity is None or sanity["verdict"] != "fails"
    if sanity is not None:
        lines += _sanity_lines(sanity)
    smoe_flops = next((x["flops_per_token"] for x in recs if x["variant"] == "smoe" and not x["bitnet"]), None)
    for t in tables:
        caption, rows = TABLES[t]
        lines += [f"## Table {t}", "", caption, ""]
        if t == 4:
            lines += ["Reading: the MH-MoE row with head & merge is the re-matched h=2 without them (`mhmoe-h2-nohm`) "
                      "with the two layers added back, so every row with the layers costs SMoE + 2 D² FLOPs, as the "
                      "paper states; its 11.46 (against Table 1's 11.60) confirms it.", ""]
        if t == 5:
            lines += ["Reading: Table 1's MH-MoE h=2 with layers removed and the experts not re-sized (its full row "
                      "equals Table 1's h=2; its no-layer row, 11.97, is worse than SMoE). The re-matched ablations "
                      "stay available as `mhmoe-h2-nohm/-nohead/-nomerge`.", ""]
        lines.append("| Model | Step | " + " | ".join(f"{DOMAIN_TITLES[d]} (paper)" for d in DOMAINS)
                     + " | Params | Active | FLOPs/token | x SMoE |")
        lines.append("|---|---|" + "---|" * len(DOMAINS) + "---|---|---|---|")
        for col in COLUMNS:
            best = {}
            for d in DOMAINS:
                means = [statistics.mean(v) for v in (_ppl(recs, r, col, d) for r in rows) if v]
                best[d] = min(means) if means else None
            for r in rows:
                cells = []
                for i, d in enumerate(DOMAINS):
                    vals = _ppl(recs, r, col, d)
                    txt = _fmt_cell(vals)
                    if vals and best[d] is not None and math.isclose(statistics.mean(vals), best[d]):
                        txt = f"**{txt}**"
                    paper = PAPER.get(t, {}).get(r.label, {}).get(col)
                    cells.append(f"{txt} ({paper[i]:.2f})" if paper else txt)
                meta = next((x for x in recs if x["variant"] == r.variant and x["bitnet"] == r.bitnet), None)
                counts = "- | - | - | -"
                if meta:
                    ratio = f"{meta['flops_per_token'] / smoe_flops:.3f}" if smoe_flops else "-"
                    counts = (f"{_si(meta['params'])} | {_si(meta['active_params'])} | "
                              f"{_si(meta['flops_per_token'])} | {ratio}")
                step = next((x["step"] for x in recs if x["variant"] == r.variant and x["bitnet"] == r.bitnet
                             and x["column"] == col), "-")
                lines.append(f"| {r.label} | {col} ({step}) | " + " | ".join(cells) + f" | {counts} |")
        lines.append("")
        flat = [r.label for r in rows if _near_uniform(health, r)]
        if flat:
            lines += [f"**Router near uniform** (entropy >= {NEAR_UNIFORM:.0%} of ln E at the end, mean over seeds) in: "
                      + ", ".join(flat) + ". Comparisons with these rows test models whose routing is close to "
                      "random; see Training health.", ""]
        if t in verdict:
            v = verdict[t]
            measured = f" (measured: {v['measured_verdict']})" if "measured_verdict" in v else ""
            lines += [f"**Claim T{t}: {v['claim']} — {v['verdict'].upper()}**{measured} (at {v['column']}, the "
                      "paper's column for this table).", ""]
            for col, cv in v["columns"].items():
                measured = f" (measured: {cv['measured_verdict']})" if "measured_verdict" in cv else ""
                lines += [f"At {col}: {cv['verdict']}{measured}.", ""] + _comparison_lines(cv["comparisons"], sane)
                lines += [""]
    vs = versus_smoe_all(recs, _model_rows(tables, extra))
    if any(vs.values()):
        lines += ["## Every model against SMoE (seed-paired)", "",
                  "Δ = loss(model) - loss(SMoE) in nats; negative = better than SMoE. `paper Δ` = the same from "
                  "the paper's perplexities (ln ppl ratio, domains averaged). Plot: `plots/forest.png`.", ""]
        for col, comps in vs.items():
            if comps:
                lines += [f"### {col}", ""] + _comparison_lines([c.as_dict() for _, c in comps], sane) + [""]
    lines += _health_lines(recs, health)
    return "\n".join(lines)


PROFILE_LINES = {
    "mhmoe": "Profile `mhmoe`: our MoE settings (README, \"Our defaults and the authors'\").",
    "authors": "Profile `authors`: every MoE row trains its `-authors` variant, the MoE settings of the authors' "
               "released code (raw top-k gates, capacity K x ceil(S/E) in training and evaluation, first-choice "
               "balance loss, head and merge with bias and Xavier init, kaiming-uniform experts and gate); the "
               "dense row is the same model as in profile `mhmoe`.",
}


def _model_rows(tables: list[int], extra: list[Row] | None) -> list[Row]:
    """The tables' rows and the extra models, one per model (Table 5's full row is Table 1's h=2)."""
    seen: list[Row] = []
    for r in [r for t in tables for r in TABLES[t][1]] + list(extra or []):
        if all((r.variant, r.bitnet) != (x.variant, x.bitnet) for x in seen):
            seen.append(r)
    return seen


def versus_smoe_all(recs: list[dict], rows: list[Row]) -> dict[str, list[tuple[Row, Comparison]]]:
    """{column: every row's paired comparison with SMoE}, as "Every model against SMoE" and results.json show it."""
    return {col: versus_smoe(recs, col, rows) for col in COLUMNS}


def _near_uniform(health: dict[str, dict[str, Any]], row: Row) -> bool:
    name = row.variant + ("-bitnet" if row.bitnet else "")
    fr = [h["entropy_frac"]["100%"] for h in health.values() if h["variant"] == name and "entropy_frac" in h]
    return bool(fr) and statistics.mean(fr) >= NEAR_UNIFORM


def _health_lines(recs: list[dict], health: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Training health", "",
             f"Router entropy as a fraction of ln E (mean over MoE layers and seeds) over training; a router at "
             f">= {NEAR_UNIFORM:.0%} of ln E at the end is labelled **near uniform**: its model is compared with "
             f"routing that is close to random. Spikes: steps with a grad norm above {SPIKE_FACTOR:g}x the run's "
             "median (summed over seeds; the largest ratio beside it).", "",
             "| variant | entropy / ln E at 10% | 25% | 50% | 75% | 100% | router | spikes | max / median grad norm |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for rid, h in health.items():
        by_variant.setdefault(h["variant"], []).append(h)
    for v, hs in by_variant.items():
        fr = [h["entropy_frac"] for h in hs if "entropy_frac" in h]
        cells = ([f"{statistics.mean(f[q] for f in fr):.3f}" for q in ("10%", "25%", "50%", "75%", "100%")]
                 if fr else ["-"] * 5)
        state = "-" if not fr else ("**near uniform**" if statistics.mean(f["100%"] for f in fr) >= NEAR_UNIFORM
                                    else "learned")
        spikes = sum(h.get("spikes", 0) for h in hs)
        worst = max((h["grad_norm_max"] / h["grad_norm_median"] for h in hs if h.get("grad_norm_median")),
                    default=float("nan"))
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {state} | {spikes} | {worst:.1f} |")
    return lines + [""]


def plots(results: dict[str, dict[str, Any]], recs: list[dict], out: Path, tables: list[int],
          extra: list[Row] | None = None, curves: list[dict[str, Any]] | None = None) -> list[Path]:
    """Forest plot (every model's paired difference from SMoE), the claims' paired differences at every periodic
    evaluation (`curves`, computed here when not given), validation-loss curves, expert-load bars and heatmaps
    (load per expert over training, per MoE layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for t in tables:
        rows += [r for r in TABLES[t][1] if all((r.variant, r.bitnet) != (x.variant, x.bitnet) for x in rows)]
    rows += [r for r in extra or [] if all((r.variant, r.bitnet) != (x.variant, x.bitnet) for x in rows)]
    comps = {col: versus_smoe(recs, col, rows) for col in COLUMNS}
    if any(comps.values()):
        made.append(_forest(plt, comps, plot_dir / "forest.png", tables))
    curves = paired_curves(results, out, tables) if curves is None else curves
    if curves:
        made.append(plot_curves(plt, curves, plot_dir / "differences_vs_tokens.png"))
    for t in tables:
        trows = [r for r in TABLES[t][1] if any(x["variant"] == r.variant and x["bitnet"] == r.bitnet for x in recs)]
        if not trows:
            continue
        fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5 * len(DOMAINS), 3.6), squeeze=False)
        for r in trows:  # validation-loss curves of the first seed, from evals.jsonl
            rid = next((x["run_id"] for x in recs if (x["variant"], x["bitnet"]) == (r.variant, r.bitnet)
                        and x["seed_index"] == 0), run_id(r, 0))  # under --profile authors: smoe-authors-s0
            path = out / "runs" / rid / "evals.jsonl"
            pts = [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []
            for ax, d in zip(axes[0], DOMAINS):
                ax.plot([p["tokens"] / 1e6 for p in pts if d in p], [p[d] for p in pts if d in p], marker="o",
                        ms=3, label=r.label)
        for ax, d in zip(axes[0], DOMAINS):
            ax.set_title(f"Table {t}: {DOMAIN_TITLES[d]} (seed 0)")
            ax.set_xlabel("training tokens (M)")
            ax.set_ylabel("validation loss (nats)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        made.append(plot_dir / f"table{t}_val_loss.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    for rid, info in results.items():  # expert load of the final step, one figure per MoE run of seed 0
        if info["run"].seed != 0 or info["run"].cfg.model.moe_ffn.kind != "moe":
            continue
        path = out / "runs" / rid / "metrics.jsonl"
        if not path.is_file():
            continue
        loads = json.loads(path.read_text().splitlines()[-1]).get("tokens_per_expert") or []
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
        heat = plot_load_heatmap(read_metrics(out / "runs" / rid), plot_dir / f"load_heatmap_{rid}.png",
                                 f"{rid}: tokens per expert / mean, per step")
        if heat is not None:
            made.append(heat)
    return made


def forest_label(row: Row, tables: list[int]) -> str:
    """A forest row's label: the paper's label, then the tables it is a row of and its variant, because Tables 2-5
    reuse Table 1's labels for other models ("SMoE" is `smoe-shared` in Table 2, `smoe` b1.58 in Table 3)."""
    where = [t for t in tables if any((r.variant, r.bitnet) == (row.variant, row.bitnet) for r in TABLES[t][1])]
    tag = f"T{', T'.join(map(str, where))}: " if where else "--models: "
    return f"{row.label} ({tag}{row.variant}{', b1.58' if row.bitnet else ''})"


def _forest(plt: Any, comps: dict[str, list[tuple[Row, Comparison]]], path: Path, tables: list[int]) -> Path:
    """One panel per column: per model, the paired Δ loss vs SMoE per domain and their mean with 95% intervals,
    the paper's Δ (ln ppl ratio) as a cross beside each."""
    cols = [c for c in COLUMNS if comps[c]]
    rows: list[Row] = []
    for col in cols:
        rows += [r for r, _ in comps[col] if r not in rows]
    labels = [forest_label(r, tables) for r in rows]
    fig, axes = plt.subplots(1, len(cols), figsize=(6.5 * len(cols), 0.55 * len(labels) + 1.8), squeeze=False,
                             sharey=True)
    keys = (*DOMAINS, "mean")
    for ax, col in zip(axes[0], cols):
        for row, c in comps[col]:
            y0 = rows.index(row)
            paper, smoe_paper = paper_ppl(row, col), paper_ppl(Row("SMoE", "smoe", row.bitnet), col)
            for j, k in enumerate(keys):
                y = y0 + (j - 1.5) * 0.18
                stat = c.per_domain[k] if k in DOMAINS else {"mean_diff_nats": c.mean_diff_nats, "ci95": c.ci95}
                m = stat["mean_diff_nats"]
                err = [[m - stat["ci95"][0]], [stat["ci95"][1] - m]] if stat["ci95"] else None
                ax.errorbar(m, y, xerr=err, fmt="o" if k == "mean" else ".", color=f"C{j}", capsize=2,
                            ms=6 if k == "mean" else 4, label=(DOMAIN_TITLES.get(k, "mean of 3") if y0 == 0 else None))
                if paper and smoe_paper:
                    pd = (statistics.fmean(math.log(a) - math.log(b) for a, b in zip(paper, smoe_paper)) if k == "mean"
                          else math.log(paper[DOMAINS.index(k)]) - math.log(smoe_paper[DOMAINS.index(k)]))
                    ax.plot(pd, y, marker="x", color=f"C{j}", ms=6, mew=1.5,
                            label=("paper" if y0 == 0 and k == "mean" else None))
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_xlabel("Δ validation loss vs SMoE (nats, seed-paired; < 0 = better)")
        ax.set_title(f"{col} of training: 95% intervals (x = paper)")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(results: dict[str, dict[str, Any]], out: Path, tables: list[int], preset: str,
           profile: str = "mhmoe", trend_against: Shorter | None = None) -> str:
    """Write tables.md, results.json and plots/ for the finished runs; return the markdown.

    profile: the MoE settings of the table rows (`--profile`), recorded in tables.md and results.json.
    trend_against: a shorter record of the same models and seeds (`--trend-against`, checked before training by
    `mhmoe.reproduction.trend.check_against`): adds the trend section and results.json's "trend"."""
    recs = collect(results)
    health = {}
    for rid, info in results.items():
        h = run_health(out / "runs" / rid, info["run"].cfg)
        health[rid] = {"variant": info["run"].model + ("-bitnet" if info["run"].row.bitnet else ""),
                       "seed": info["run"].cfg.seed, **h}
    sanity = sanity_check(recs, {rid: h.get("spike_steps_after_warmup", []) for rid, h in health.items()})
    verdict = apply_sanity(verdicts(recs, tables), sanity)
    extra: list[Row] = []  # --models outside the tables
    for info in results.values():
        r = info["run"]
        if not r.tables and r.row not in extra:
            extra.append(r.row)
    md = render_tables(recs, tables, preset, verdict, health, extra, sanity, profile)
    vs = versus_smoe_all(recs, _model_rows(tables, extra))
    routing = {rid: {"variant": health[rid]["variant"], "seed": info["run"].cfg.seed,
                     "routing": run_routing(out / "runs" / rid, info["run"].cfg.milestones, info["run"].cfg.steps)}
               for rid, info in results.items() if info["run"].cfg.model.moe_ffn.kind == "moe"}
    act = label_claim(activation_claim(routing), sanity)
    md += "\n" + "\n".join(routing_section(routing, act))
    tr = trend(trend_against, recs, tables, extra, sanity["verdict"]) if trend_against is not None else None
    if tr is not None:
        md += "\n" + "\n".join(trend_lines(tr))
    curves = paired_curves(results, out, tables)
    walls = "\n".join(f"| {rid} | {info['wall_s']:.0f} |" for rid, info in results.items())
    md += "\n## Training wall time per run (seconds)\n\n| run | wall s |\n|---|---|\n" + walls + "\n"
    atomic_write_text(out / "tables.md", md)
    atomic_write_text(out / "results.json", json.dumps(
        {"preset": preset, "profile": profile, "tables": tables, "records": recs, "runs": health, "sanity": sanity,
         "verdicts": {f"T{t}": v for t, v in verdict.items()},
         # tables.md's "Every model against SMoE", entry for entry (`variant`: the row's model)
         "versus_smoe": {col: [{"variant": r.variant, "bitnet": r.bitnet, **c.as_dict()} for r, c in comps]
                         for col, comps in vs.items()},
         "routing": {"runs": routing, "claim": act}, **_record_extras(results, curves, tr)}, indent=2))
    plots(results, recs, out, tables, extra, curves)
    return md


def _record_extras(results: dict[str, dict[str, Any]], curves: list[dict[str, Any]],
                   tr: dict[str, Any] | None) -> dict[str, Any]:
    """results.json's keys for reading a record against others: the claims at every periodic evaluation, every
    run's resolved config (what `--trend-against` compares), and the trend against a shorter record (or None)."""
    return {"curves": curves, "run_configs": {rid: info["run"].cfg.to_dict() for rid, info in results.items()},
            "trend": tr}
