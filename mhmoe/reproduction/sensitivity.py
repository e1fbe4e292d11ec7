"""`mhmoe sensitivity`: the same claims, seed-paired, in records trained under different MoE settings.

A column is one setting (ours, the authors', ours with raw top-k gates only). It reads one or more finished records
(`mhmoe reproduce` output directories, or their results.json) and takes each model from the LAST source that names
it; a source may restrict and rename what it gives: `DIR:mhmoe-h3=mhmoe-h3-rawgates,fine-grained=fine-grained-rawgates`
takes only those two models from DIR, the record's variants on the right, the Table 1 models they stand for on the
left. A row is one contrast of Table 1 (fine-grained - SMoE, h2 - SMoE, h3 - SMoE, h3 - h2) at one milestone:
mean over paired seeds of loss(better) - loss(worse), domains averaged, with its 95% Student-t interval
(`verdicts.compare_rows`, the numbers of tables.md's "Every model against SMoE").

Whether a row MOVED from the first column to another is a contrast of its own: per seed, the row's difference in
that column minus the same in the first column, paired by seed id (the records share seeds, data order and
evaluation sets), with its interval. An interval that excludes 0 says the setting changed the difference by more
than seed noise; one that contains 0 resolves no change. The same is given for every model's own loss (the dense
model, trained with the same config in every record, shows how far two records of one model differ), so that a
contrast that moved can be read as which of its two models moved.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mhmoe.errors import UserError
from mhmoe.reproduction.paper_tables import DOMAINS, TABLES, Row
from mhmoe.reproduction.verdicts import compare_rows, losses, paired_interval

TABLE1 = {r.variant: r for r in TABLES[1][1]}
# The rows of the sensitivity table: (claimed better, worse) as Table 1 variants.
ROWS = (("fine-grained", "smoe"), ("mhmoe-h2", "smoe"), ("mhmoe-h3", "smoe"), ("mhmoe-h3", "mhmoe-h2"))


@dataclass(frozen=True)
class Source:
    """One record read into a column: its results.json, and {Table 1 variant: the record's variant} to take (None:
    every Table 1 model it holds, under its own name)."""

    path: Path
    models: dict[str, str] | None = None

    @classmethod
    def parse(cls, spec: str, flag: str = "--column") -> "Source":
        """`DIR` or `DIR:table1=variant,...` (see the module docstring); UserError naming `flag` if malformed."""
        path, _, sel = spec.partition(":")
        if not sel:
            return cls(_results_path(path, flag))
        models: dict[str, str] = {}
        for item in sel.split(","):
            base, eq, variant = item.partition("=")
            base, variant = base.strip(), (variant.strip() if eq else base.strip())
            if base not in TABLE1:
                raise UserError(f"{flag}: {spec!r}: {base!r} is no model of Table 1; use one of "
                                f"{', '.join(TABLE1)} (as MODEL or MODEL=VARIANT)")
            models[base] = variant
        return cls(_results_path(path, flag), models)


@dataclass
class Column:
    label: str
    sources: list[Source]
    profile: list[str] = field(default_factory=list)  # the "profile" of each source's record, as it says


def _results_path(path: str, flag: str) -> Path:
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{flag}: {path} holds no results.json; give the output directory of a finished "
                        "`mhmoe reproduce` (or its results.json)")
    return p


def _read(source: Source, flag: str) -> tuple[list[dict[str, Any]], str]:
    try:
        data = json.loads(source.path.read_text(encoding="utf-8"))
        recs = data["records"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{flag}: {source.path} is no results.json of `mhmoe reproduce` ({type(e).__name__}: {e})"
                        ) from None
    return recs, data.get("profile", "mhmoe")


def column_records(column: Column, flag: str = "--column") -> list[dict[str, Any]]:
    """The records of a column, Table 1 models only and under their Table 1 names, each model from the last source
    that gives it. Sets `column.profile`."""
    chosen: dict[str, list[dict[str, Any]]] = {}
    column.profile = []
    for src in column.sources:
        recs, profile = _read(src, flag)
        column.profile.append(profile)
        wanted = src.models if src.models is not None else {v: v for v in TABLE1}
        for base, variant in wanted.items():
            got = [{**x, "variant": base} for x in recs if x["variant"] == variant and not x.get("bitnet")]
            if got:
                chosen[base] = got
            elif src.models is not None:
                have = sorted({x["variant"] for x in recs})
                raise UserError(f"{flag}: {src.path} holds no {variant!r} (it holds {', '.join(have)})")
    return [x for recs in chosen.values() for x in recs]


def _per_seed(recs: list[dict[str, Any]], better: str, worse: str, column: str) -> dict[int, float]:
    a, b = losses(recs, better, False, column), losses(recs, worse, False, column)
    return {s: a[s]["mean"] - b[s]["mean"] for s in sorted(set(a) & set(b))}


def _shift(base: dict[int, float], here: dict[int, float]) -> dict[str, Any] | None:
    """here - base per shared seed: mean, 95% t-interval, and whether it resolves a change."""
    seeds = sorted(set(base) & set(here))
    if not seeds:
        return None
    mean, lo, hi = paired_interval([here[s] - base[s] for s in seeds])
    moved = ("not tested (1 seed)" if len(seeds) < 2 else "lower" if hi < 0 else "higher" if lo > 0
             else "no change resolved")
    return {"mean_diff_nats": mean, "ci95": [lo, hi] if len(seeds) > 1 else None, "n_seeds": len(seeds),
            "moved": moved}


def sensitivity(columns: list[Column], milestone: str = "100%") -> dict[str, Any]:
    """Every row of ROWS in every column (Comparison as a dict, or None where the column lacks a model), and the
    row's shift from the first column, seed-paired; then every model's own loss per column and its shift from the
    first column (what moved the contrasts): {"columns": [...], "rows": [...], "models": [...]}."""
    recs = [column_records(c) for c in columns]
    models = []
    for m in TABLE1:
        per_col = [{s: v["mean"] for s, v in losses(r, m, False, milestone).items()} for r in recs]
        if not any(per_col):
            continue
        models.append({"model": TABLE1[m].label, "variant": m,
                       "cells": [{"mean_loss": statistics.fmean(c.values()), "n_seeds": len(c), "seeds": sorted(c)}
                                 if c else None for c in per_col],
                       "shift_from_first": [_shift(per_col[0], c) if per_col[0] and c else None
                                            for c in per_col[1:]]})
    rows = []
    for better, worse in ROWS:
        cells, shifts = [], []
        base = _per_seed(recs[0], better, worse, milestone)
        for i, col_recs in enumerate(recs):
            c = compare_rows(col_recs, TABLE1[better], TABLE1[worse], milestone)
            cells.append(None if c is None else {k: v for k, v in c.as_dict().items() if k != "per_domain"})
            if i == 0:
                continue
            shifts.append(_shift(base, _per_seed(col_recs, better, worse, milestone)))
        rows.append({"comparison": f"{TABLE1[better].label} - {TABLE1[worse].label}", "better": better,
                     "worse": worse, "cells": cells, "shift_from_first": shifts})
    return {"milestone": milestone, "domains": list(DOMAINS),
            "columns": [{"label": c.label, "profiles": c.profile,
                         "sources": [{"path": str(s.path), "models": s.models} for s in c.sources]}
                        for c in columns],
            "rows": rows, "models": models}


def _ci(lo_hi: list[float] | None) -> str:
    if not lo_hi or any(math.isnan(v) for v in lo_hi):
        return "(no interval)"
    return f"[{lo_hi[0]:+.4f}, {lo_hi[1]:+.4f}]"


def render(result: dict[str, Any]) -> str:
    """The table (markdown) and one sentence per row on whether its verdict moved."""
    cols = result["columns"]
    head = "| contrast (negative = claimed better is better) | " + " | ".join(c["label"] for c in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for row in result["rows"]:
        cells = []
        for c in row["cells"]:
            cells.append("-" if c is None else
                         f"{c['mean_diff_nats']:+.4f} {_ci(c['ci95'])}, n={c['n_seeds']}, {c['verdict']}")
        lines.append(f"| {row['comparison']} | " + " | ".join(cells) + " |")
    lines.append("")
    first = cols[0]["label"]
    for row in result["rows"]:
        said = []
        c0 = row["cells"][0]
        if c0 is None:
            lines.append(f"- **{row['comparison']}**: not measured under {first}, so no shift from it.")
            continue
        for col, c, shift in zip(cols[1:], row["cells"][1:], row["shift_from_first"]):
            if c is None or shift is None:
                said.append(f"not measured under {col['label']}")
                continue
            moved = ("the verdict stays" if c["verdict"] == c0["verdict"]
                     else f"the verdict moves from {c0['verdict']} to {c['verdict']}")
            size = f"the difference shifts by {shift['mean_diff_nats']:+.4f} nats {_ci(shift['ci95'])}"
            if shift["ci95"] is not None:
                size += (", more than seed noise" if shift["moved"] in ("lower", "higher") else ", within seed noise")
            said.append(f"under {col['label']}, {moved}; {size}")
        lines.append(f"- **{row['comparison']}** (from {first}): " + "; ".join(said) + ".")
    lines += ["", f"Each model's own mean evaluation loss (nats, 3 domains, {result['milestone']}), and in brackets its "
              f"seed-paired change from {first}:", "",
              "| model | " + " | ".join(c["label"] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in result["models"]:
        cells = ["-" if m["cells"][0] is None else f"{m['cells'][0]['mean_loss']:.4f} (n={m['cells'][0]['n_seeds']})"]
        for c, sh in zip(m["cells"][1:], m["shift_from_first"]):
            if c is None:
                cells.append("-")
            elif sh is None:
                cells.append(f"{c['mean_loss']:.4f} (n={c['n_seeds']})")
            else:
                cells.append(f"{c['mean_loss']:.4f} ({sh['mean_diff_nats']:+.4f} {_ci(sh['ci95'])}, n={sh['n_seeds']})")
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
