"""The paper's claims as contrasts: signed sums of models' evaluation losses, one value per seed.

A pair "A is better than B" is loss(A) - loss(B). Table 4's "head & merge help MH-MoE more than SMoE" is the gain
of the baseline minus the gain of MH-MoE, (loss(SMoE) - loss(SMoE + h&m)) - (loss(MH w/o) - loss(MH + h&m)), as
`mhmoe.reproduction.verdicts.compare_gains` computes it. Negative = the claim's direction, as in the verdicts.

The curves (a record's claims at every periodic evaluation, `mhmoe.reproduction.curves`) and the trend (a claim in
two records of different lengths, `mhmoe.reproduction.trend`) read this one list, so that a claim has one
definition and one name wherever it is followed. The verdicts at the milestones keep their own code
(`verdicts.table_comparisons`); tests/e2e/test_curves_and_trend.py checks that both give the same per-seed numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mhmoe.reproduction.paper_tables import TABLES, Row

# Table 1's rows need no tag; the other tables reuse its labels ("SMoE", "MH-MoE (head=2)", ...) for other models.
_TABLE_NOTE = {1: "", 2: " (shared expert, Table 2)", 3: " (BitNet b1.58, Table 3)", 4: " (Table 4)",
               5: " (Table 5)"}

Key = tuple[str, bool]  # (variant, bitnet): one model of the matrix


@dataclass(frozen=True)
class Contrast:
    """One claim: `better` is claimed better than `worse`; its value per seed is sum(coef * loss(row))."""

    better: str
    worse: str
    table: int | None  # the table whose claim it is; None: a `--models` variant outside the tables, against SMoE
    terms: tuple[tuple[float, Row], ...]

    @property
    def name(self) -> str:
        return f"{self.better} - {self.worse}" + (_TABLE_NOTE[self.table] if self.table else " (--models)")

    @property
    def keys(self) -> list[Key]:
        return [(r.variant, r.bitnet) for _, r in self.terms]

    def per_seed(self, losses: dict[Key, dict[int, float]]) -> dict[int, float]:
        """{seed id: value} on the seeds that every model of the contrast has in `losses` ({model: {seed: loss}})."""
        if any(k not in losses for k in self.keys):
            return {}
        seeds = set.intersection(*(set(losses[k]) for k in self.keys))
        return {s: sum(c * losses[(r.variant, r.bitnet)][s] for c, r in self.terms) for s in sorted(seeds)}

    def describe(self) -> dict[str, Any]:
        """What results.json says of the contrast: its name, table and terms [coefficient, variant, bitnet]."""
        return {"comparison": self.name, "better": self.better, "worse": self.worse, "table": self.table,
                "terms": [[c, r.variant, r.bitnet] for c, r in self.terms]}


def _pair(better: Row, worse: Row, table: int | None) -> Contrast:
    return Contrast(better.label, worse.label, table, ((1.0, better), (-1.0, worse)))


def claim_contrasts(tables: list[int], present: set[Key], extra: list[Row] | None = None) -> list[Contrast]:
    """The contrasts of `tables` whose models are all `present`, each once (first table wins), in reading order:

    Tables 1-3 (chains): SMoE - Dense (the sanity pair), every other row - the table's SMoE, then the chain's links
    not listed yet (fine-grained - SMoE is both; h=2 - fine-grained, h=3 - h=2). Table 4: the two head & merge
    gains. Table 5: head - none, merge - none, head - merge. Then each `extra` model (`--models`) - SMoE.
    """
    out: list[Contrast] = []
    seen: set[tuple] = set()

    def add(c: Contrast) -> None:
        ident = tuple((coef, r.variant, r.bitnet) for coef, r in c.terms)
        if all(k in present for k in c.keys) and ident not in seen:
            seen.add(ident)
            out.append(c)

    for t in tables:
        rows = TABLES[t][1]
        by = {r.variant: r for r in rows}
        if t in (1, 2, 3):
            smoe = next(r for r in rows if r.variant in ("smoe", "smoe-shared"))
            if "dense" in by:
                add(_pair(smoe, by["dense"], t))
            for r in rows:
                if r not in (smoe, by.get("dense")):
                    add(_pair(r, smoe, t))
            for worse, better in zip(rows, rows[1:]):
                add(_pair(better, worse, t))
        elif t == 4:
            mh = (by["mhmoe-h2-nohm"], by["mhmoe-h2-nohm-hm"])
            for w in ("smoe", "fine-grained"):
                base = (by[w], by[f"{w}-hm"])
                add(Contrast(f"head & merge on {mh[0].label}", f"head & merge on {base[0].label}", 4,
                             ((1.0, base[0]), (-1.0, base[1]), (-1.0, mh[0]), (1.0, mh[1]))))
        elif t == 5:
            none, head, merge = by["mhmoe-h2-drophm"], by["mhmoe-h2-dropmerge"], by["mhmoe-h2-drophead"]
            for better, worse in ((head, none), (merge, none), (head, merge)):
                add(_pair(better, worse, 5))
    for r in extra or []:
        add(_pair(r, Row("SMoE", "smoe"), None))
    return out
