"""The paper's claims, each tested on seed-paired differences of evaluation loss.

A run's score at one milestone column ("50%" / "100%") is its mean evaluation loss in nats over the three
domains (and, for the per-domain lines, the loss on one domain). Two variants are compared only on the seeds
both have, matched by seed id: a seed fixes the data order and the initial values of every module the variants
share (embeddings, attention, dense FFNs; `Transformer.reset_parameters`), so the per-seed difference removes
most of the seed-to-seed spread.

For a claim "A is better than B" the difference is loss(A) - loss(B): negative when the claim holds. With n seeds
its mean carries a 95% Student-t interval with n-1 degrees of freedom, and the verdict is
    "holds"          the interval lies below 0,
    "reversed"       the interval lies above 0,
    "within noise"   the interval contains 0,
    "not tested (1 seed)"  fewer than two paired seeds: no spread, no interval, no verdict.
A chain of claims (Table 1: Dense > SMoE > fine-grained > h=2 > h=3) holds when every link holds and does not
hold when any link is reversed.

Before any claim is read, the sanity check (`sanity_check`): the models must be in a regime where MoE matters,
i.e. SMoE beats the dense model of equal FLOPs at 100% (the paper's first effect: -0.136 nats), with its
seed-paired interval below 0, and no run of the matrix has a grad-norm spike after warm-up. When it fails, every
claim's verdict is "not interpretable" (the measured verdict is kept beside it): an ordering of MoE designs
measured where MoE does not beat dense, or where a run spiked, measures noise and instabilities.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from mhmoe.reproduction.paper_tables import DOMAINS, PAPER, TABLES, Row

COLUMNS = ("50%", "100%")
NOT_TESTED = "not tested (1 seed)"
NOT_INTERPRETABLE = "not interpretable"
SANITY_CHECK = ("SMoE beats the dense model of equal FLOPs at 100% (seed-paired 95% interval below 0), and no run "
                "has a grad-norm spike after warm-up")


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

    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def status_of(lo: float, hi: float, n: int) -> str:
    if n < 2:
        return NOT_TESTED
    return "holds" if hi < 0 else "reversed" if lo > 0 else "within noise"


@dataclass
class Comparison:
    """One claim "better is better than worse" at one column, on seed-paired differences (nats)."""

    better: str
    worse: str
    column: str
    mean_diff_nats: float  # mean over paired seeds of loss(better) - loss(worse), domains averaged
    ci95: list[float] | None  # [lo, hi]; None with one seed (no spread, no interval)
    n_seeds: int
    verdict: str
    seeds: list[int] = field(default_factory=list)  # the seed ids that were paired
    per_domain: dict[str, dict[str, Any]] = field(default_factory=dict)  # {domain: {mean_diff_nats, ci95}}
    paper_diff_nats: float | None = None  # the same difference from the paper's perplexities, when it has both

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def losses(recs: list[dict], variant: str, bitnet: bool, column: str) -> dict[int, dict[str, float]]:
    """{seed id: {domain: loss, ..., "mean": mean over the domains}} of one model at one column."""
    out: dict[int, dict[str, float]] = {}
    for x in recs:
        if x["variant"] == variant and x["bitnet"] == bitnet and x["column"] == column:
            out.setdefault(x["seed"], {})[x["domain"]] = x["loss"]
    return {s: {**d, "mean": statistics.fmean(d[k] for k in DOMAINS)} for s, d in out.items()
            if all(k in d for k in DOMAINS)}


def paired(per_seed: dict[int, float], better: str, worse: str, column: str,
           per_domain: dict[str, dict[int, float]] | None = None, paper: float | None = None) -> Comparison:
    """A Comparison from {seed id: difference} (and the same per domain)."""
    seeds = sorted(per_seed)
    mean, lo, hi = paired_interval([per_seed[s] for s in seeds])
    doms = {}
    for d, vals in (per_domain or {}).items():
        m, l, h = paired_interval([vals[s] for s in sorted(vals)])
        doms[d] = {"mean_diff_nats": m, "ci95": [l, h] if len(vals) > 1 else None,
                   "verdict": status_of(l, h, len(vals))}
    return Comparison(better, worse, column, mean, [lo, hi] if len(seeds) > 1 else None, len(seeds),
                      status_of(lo, hi, len(seeds)), seeds, doms, paper)


def paper_ppl(row: Row, column: str) -> tuple[float, ...] | None:
    """The paper's perplexities (RP, Wiki, C4) of a row at a column, from the first table that prints them."""
    for t, (_, rows) in TABLES.items():
        if row in rows and row.label in PAPER.get(t, {}):
            got = PAPER[t][row.label].get(column)
            if got:
                return got
    return None


def paper_diff(better: Row, worse: Row, column: str) -> float | None:
    """ln ppl(better) - ln ppl(worse) averaged over the domains, from the paper's tables, when it has both."""
    a, b = paper_ppl(better, column), paper_ppl(worse, column)
    if a is None or b is None:
        return None
    return statistics.fmean(math.log(x) - math.log(y) for x, y in zip(a, b))


def compare_rows(recs: list[dict], better: Row, worse: Row, column: str) -> Comparison | None:
    """Is `better` better than `worse` at `column`? None when either has no numbers there."""
    a, b = losses(recs, better.variant, better.bitnet, column), losses(recs, worse.variant, worse.bitnet, column)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    per_seed = {s: a[s]["mean"] - b[s]["mean"] for s in seeds}
    per_domain = {d: {s: a[s][d] - b[s][d] for s in seeds} for d in DOMAINS}
    return paired(per_seed, better.label, worse.label, column, per_domain, paper_diff(better, worse, column))


def compare_gains(recs: list[dict], mh: tuple[Row, Row], base: tuple[Row, Row], column: str) -> Comparison | None:
    """Does adding head & merge help MH-MoE more than it helps a baseline? (Table 4)

    mh, base: (without, with). The difference per seed is gain_base - gain_mh, with gain = loss(without) -
    loss(with): negative when MH-MoE gains more.
    """
    ls = [losses(recs, r.variant, r.bitnet, column) for r in (*mh, *base)]
    seeds = sorted(set.intersection(*(set(x) for x in ls)))
    if not seeds:
        return None

    def diff(key: str) -> dict[int, float]:
        return {s: (ls[2][s][key] - ls[3][s][key]) - (ls[0][s][key] - ls[1][s][key]) for s in seeds}

    return paired(diff("mean"), f"head & merge on {mh[0].label}", f"head & merge on {base[0].label}", column,
                  {d: diff(d) for d in DOMAINS})


def summarise(claim: str, comps: list[Comparison]) -> str:
    if not comps:
        return "not run"
    if any(c.n_seeds < 2 for c in comps):
        return NOT_TESTED
    if any(c.verdict == "reversed" for c in comps):
        return "does not hold"
    return "holds" if all(c.verdict == "holds" for c in comps) else "within noise"


CHAIN_CLAIMS = {1: "Dense > SMoE > Fine-grained > MH h=2 > MH h=3 in perplexity",
                2: "with a shared expert: SMoE > Fine-grained > MH h=2 > MH h=3",
                3: "under BitNet: Dense > SMoE > Fine-grained > MH h=2 > MH h=3"}
# The column each table is read at in the paper: Tables 1-3 report both, Tables 4-5 the 50k-step models.
HEADLINE = {1: "100%", 2: "100%", 3: "100%", 4: "50%", 5: "50%"}


def table_comparisons(recs: list[dict], t: int, column: str) -> tuple[str, list[Comparison]] | None:
    """The claim of table `t` and its comparisons at `column`; None until every row has numbers there."""
    rows = TABLES[t][1]
    if not all(losses(recs, r.variant, r.bitnet, column) for r in rows):
        return None
    if t in CHAIN_CLAIMS:
        comps = [compare_rows(recs, b, a, column) for a, b in zip(rows, rows[1:])]
        return CHAIN_CLAIMS[t], [c for c in comps if c]
    by = {r.variant: r for r in rows}
    if t == 4:
        mh = (by["mhmoe-h2-nohm"], by["mhmoe-h2-nohm-hm"])
        comps = [compare_gains(recs, mh, (by[w], by[f"{w}-hm"]), column) for w in ("smoe", "fine-grained")]
        return "head & merge layers help MH-MoE more than they help SMoE / fine-grained SMoE", [c for c in comps if c]
    none, head, merge = by["mhmoe-h2-drophm"], by["mhmoe-h2-dropmerge"], by["mhmoe-h2-drophead"]
    comps = [compare_rows(recs, head, none, column), compare_rows(recs, merge, none, column),
             compare_rows(recs, head, merge, column)]
    claim = "the head layer helps, the merge layer helps, and the head helps more than the merge"
    return claim, [c for c in comps if c]


def verdicts(recs: list[dict], tables: list[int]) -> dict[int, dict[str, Any]]:
    """{table: {claim, verdict (at the paper's column), column, columns: {col: {verdict, comparisons}}}}."""
    out: dict[int, dict[str, Any]] = {}
    for t in tables:
        cols = {}
        claim = None
        for col in COLUMNS:
            got = table_comparisons(recs, t, col)
            if got is None:
                continue
            claim, comps = got
            cols[col] = {"verdict": summarise(claim, comps), "comparisons": [c.as_dict() for c in comps]}
        if claim is None:
            continue
        head = HEADLINE[t] if HEADLINE[t] in cols else next(iter(cols))
        out[t] = {"claim": claim, "verdict": cols[head]["verdict"], "column": head, "columns": cols}
    return out


def versus_smoe(recs: list[dict], column: str, rows: list[Row]) -> list[tuple[Row, Comparison]]:
    """Every row's paired difference from SMoE (same BitNet setting): the forest plot's numbers."""
    out = []
    for r in rows:
        if r.variant == "smoe":
            continue
        c = compare_rows(recs, r, Row("SMoE", "smoe", r.bitnet), column)
        if c is not None:
            out.append((r, c))
    return out


def sanity_check(recs: list[dict], spikes_after_warmup: dict[str, list[int]]) -> dict[str, Any]:
    """The regime check ahead of the claims (module docstring).

    recs: the evaluation records; spikes_after_warmup: {run id: steps after warm-up whose grad norm exceeded the
    report's spike factor x the run's median}. Returns {check, verdict ("holds" | "fails" | "not tested (...)"),
    smoe_vs_dense (the Comparison at 100%, or None), spikes_after_warmup (the runs with any), reasons}.
    Full-precision dense and SMoE are used; a BitNet-only matrix (Table 3) uses its BitNet pair.
    """
    have = {(x["variant"], x["bitnet"]) for x in recs}
    bitnet = ("dense", False) not in have or ("smoe", False) not in have
    c = compare_rows(recs, Row("SMoE", "smoe", bitnet), Row("Dense", "dense", bitnet), "100%")
    spiky = {rid: steps for rid, steps in sorted(spikes_after_warmup.items()) if steps}
    reasons = []
    if c is None:
        verdict = "not tested (no dense and SMoE pair at 100%)"
    elif c.n_seeds < 2:
        verdict = NOT_TESTED
    else:
        if c.verdict != "holds":
            lo, hi = c.ci95
            reasons.append(f"SMoE - dense at 100% is {c.mean_diff_nats:+.4f} nats [{lo:+.4f}, {hi:+.4f}] "
                           f"({c.verdict}), not below 0")
        if spiky:
            reasons.append(f"{len(spiky)} run(s) spiked after warm-up: " + ", ".join(
                f"{rid} (steps {', '.join(map(str, steps[:5]))}{', ...' if len(steps) > 5 else ''})"
                for rid, steps in spiky.items()))
        verdict = "fails" if reasons else "holds"
    return {"check": SANITY_CHECK, "verdict": verdict, "smoe_vs_dense": c.as_dict() if c is not None else None,
            "spikes_after_warmup": spiky, "reasons": reasons}


def apply_sanity(verdict: dict[int, dict[str, Any]], sanity: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The table verdicts, each labelled by `label_claim` (NOT_INTERPRETABLE when the sanity check failed)."""
    return {t: label_claim(v, sanity) for t, v in verdict.items()}


def label_claim(claim: dict[str, Any], sanity: dict[str, Any]) -> dict[str, Any]:
    """A claim {verdict, columns: {col: {verdict, ...}}} with every verdict NOT_INTERPRETABLE when the sanity check
    failed, the measured one kept beside it as `measured_verdict`; unchanged otherwise."""
    if sanity["verdict"] != "fails":
        return claim
    cols = {col: {**cv, "verdict": NOT_INTERPRETABLE, "measured_verdict": cv["verdict"]}
            for col, cv in claim.get("columns", {}).items()}
    return {**claim, "verdict": NOT_INTERPRETABLE, "measured_verdict": claim["verdict"], "columns": cols}
