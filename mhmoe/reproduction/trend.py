"""`mhmoe reproduce --trend-against DIR`: how each claim's difference changes from a shorter record to this one.

Two records of the same models and seeds that differ only in length (e.g. the `cpu` record and `cpu-long`) give,
per claim (`mhmoe.reproduction.contrasts`) and per seed, the difference at this record's 100% minus the same
difference at the shorter record's 100% (mean eval loss of the three domains, nats). Its mean carries a 95%
Student-t interval over the seeds (`verdicts.paired_interval`). An interval below 0 says the claimed-better model
gains on the other as training gets longer (e.g. MH-MoE h=3 - SMoE falls from 6.55M to 19.7M tokens); above 0, it
loses ground; containing 0, no change is resolved. Pairing the two records by seed removes what a seed fixes in
both (initial values shared by the models, data order), as the verdicts' pairing does within a record.

What is compared must be the same models: every config field is equal except those of LENGTH_FIELDS (steps, the
warm-up that scales with them, evaluation and checkpoint cadence, threads, the preset's name and the seed, which
pairs). The configs come from the record's results.json ("run_configs", written since this check exists), else
from its run directories (DIR/runs/<run>/config.json), else, for a record that stores neither (the 2026-12-04 `cpu`
record), from its preset's definition today, with each model's parameters and FLOPs per token checked against
the numbers the record stored. The seeds of every model in both must be the same. Each refusal is one line that
names the flag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhmoe.complexity import model_flops_per_token, model_param_count
from mhmoe.errors import ConfigError, UserError
from mhmoe.reproduction.contrasts import Key, claim_contrasts
from mhmoe.reproduction.paper_tables import DOMAINS, Row
from mhmoe.reproduction.verdicts import NOT_TESTED, losses, paired_interval
from mhmoe.training.config import TrainConfig

FLAG = "--trend-against"
COLUMN = "100%"
# Config fields two records may differ in and still be the same models: the length and what scales with it, the
# evaluation and checkpoint cadence, how many threads ran, the preset's name, and the seed (which pairs the runs).
LENGTH_FIELDS = ("preset", "steps", "seed", "optim.warmup_steps", "eval_every", "eval_tokens", "ckpt_every",
                 "keep_checkpoints", "threads", "dead_expert_window", "data.max_eval_tokens")


@dataclass
class Shorter:
    """The record a trend is taken against, read back from its results.json."""

    source: Path  # the results.json read
    preset: str
    sanity: str  # its sanity verdict ("holds", "fails", ...)
    records: list[dict[str, Any]]  # results.json "records": one per (run, milestone, domain)
    configs: dict[Key, dict[str, Any]]  # per model, the config of one of its runs (TrainConfig.to_dict)
    config_origin: str  # where `configs` came from, as the report says it


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _normalised(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A stored config through TrainConfig, so that fields added since it was written compare at their defaults."""
    try:
        return TrainConfig.from_dict(cfg).to_dict()
    except ConfigError as e:
        raise UserError(f"{FLAG}: {where} holds a config this version cannot read ({e})") from None


def load_shorter(path: str | Path) -> Shorter:
    """Read a record (its output directory or its results.json) for a trend; UserError naming the flag if it is
    not one, has no evaluation at 100%, or its configs cannot be found."""
    path = Path(path)
    source = path / "results.json" if path.is_dir() else path
    if not source.is_file():
        raise UserError(f"{FLAG}: {path} holds no results.json; give the output directory of a finished "
                        "`mhmoe reproduce` or its results.json")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
        records, preset, tables = data["records"], data["preset"], data["tables"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{FLAG}: {source} is not the results.json of `mhmoe reproduce` (no records, preset or "
                        "tables)") from None
    if not any(r.get("column") == COLUMN for r in records):
        raise UserError(f"{FLAG}: {source} has no evaluation at {COLUMN}; finish that record first")
    run_keys = {r["run_id"]: (r["variant"], r["bitnet"]) for r in records}
    configs: dict[Key, dict[str, Any]] = {}
    if data.get("run_configs"):
        origin = f"{source.name} (run_configs)"
        for rid, cfg in data["run_configs"].items():
            if rid in run_keys:
                configs.setdefault(run_keys[rid], _normalised(cfg, f"{source} run_configs[{rid}]"))
    elif all((source.parent / "runs" / rid / "config.json").is_file() for rid in run_keys):
        origin = "its run directories (runs/<run>/config.json)"
        for rid, key in run_keys.items():
            cfg_path = source.parent / "runs" / rid / "config.json"
            configs.setdefault(key, _normalised(json.loads(cfg_path.read_text(encoding="utf-8")), str(cfg_path)))
    else:
        from mhmoe.reproduction.reproduce import plan  # the matrix the record's command would plan today

        origin = (f"the `{preset}` preset's definition today (the record stores no configs; parameters and FLOPs "
                  "per token checked against its records)")
        models = sorted({v for v, _ in run_keys.values()})
        try:
            planned = plan(preset, tables, 1, None, models)
        except (ConfigError, UserError) as e:
            raise UserError(f"{FLAG}: {source} stores no configs and its preset {preset!r} cannot be rebuilt ({e}); "
                            "give a record written by this version of `mhmoe reproduce`") from None
        for r in planned:
            key = (r.row.variant, r.row.bitnet)
            if key in set(run_keys.values()):
                configs[key] = r.cfg.to_dict()
                _check_counts(source, key, records, r.cfg)
    sanity = (data.get("sanity") or {}).get("verdict", "not recorded")
    return Shorter(source, preset, sanity, records, configs, origin)


def _name(key: Key) -> str:
    return key[0] + (" (b1.58)" if key[1] else "")


def _check_counts(source: Path, key: Key, records: list[dict[str, Any]], cfg: TrainConfig) -> None:
    """The parameters and FLOPs per token the record stored for `key` equal those of `cfg`'s model."""
    stored = next(r for r in records if (r["variant"], r["bitnet"]) == key)
    counts = model_param_count(cfg.model)
    now = {"params": counts["total"], "active_params": counts["active"],
           "flops_per_token": model_flops_per_token(cfg.model)}
    for field, value in now.items():
        if stored.get(field) != value:
            raise UserError(f"{FLAG}: {_name(key)} in {source} has {field} {stored.get(field)} but its preset "
                            f"{stored.get('variant')!r} gives {value} today; it is not the same model")


def _seeds(records: list[dict[str, Any]], key: Key) -> set[int]:
    return set(losses(records, key[0], key[1], COLUMN))


def check_against(shorter: Shorter, runs: list[Any]) -> None:
    """Before any training: the planned runs (`reproduce.plan`) and the shorter record have models in common, the
    same model for each (configs equal outside LENGTH_FIELDS), the same seeds, and the record is shorter."""
    planned: dict[Key, list[Any]] = {}
    for r in runs:
        planned.setdefault((r.row.variant, r.row.bitnet), []).append(r)
    common = [k for k in planned if k in shorter.configs]
    if not common:
        raise UserError(f"{FLAG}: {shorter.source} has none of this matrix's models (it has "
                        f"{', '.join(sorted(map(_name, shorter.configs)))}); a trend compares the same models")
    for key in common:
        here = _flat(planned[key][0].cfg.to_dict())
        there = _flat(shorter.configs[key])
        for field in sorted(set(here) | set(there)):
            if field in LENGTH_FIELDS or here.get(field) == there.get(field):
                continue
            raise UserError(f"{FLAG}: {_name(key)} is not the same model in {shorter.source}: {field} is "
                            f"{there.get(field)!r} there and {here.get(field)!r} here; a trend compares records that "
                            "differ only in length, warm-up, evaluation and checkpoint settings")
        steps_here = planned[key][0].cfg.steps
        steps_there = max((r["step"] for r in shorter.records if (r["variant"], r["bitnet"]) == key
                           and r["column"] == COLUMN), default=0)
        if steps_there >= steps_here:
            raise UserError(f"{FLAG}: {shorter.source} is not shorter than this matrix ({steps_there:,} steps there, "
                            f"{steps_here:,} here); take the trend from the longer record against the shorter one")
        seeds_here = {r.cfg.seed for r in planned[key]}
        seeds_there = _seeds(shorter.records, key)
        if seeds_here != seeds_there:
            raise UserError(f"{FLAG}: the seeds of {_name(key)} differ: {shorter.source} has "
                            f"{', '.join(map(str, sorted(seeds_there)))} and this matrix "
                            f"{', '.join(map(str, sorted(seeds_here)))}; use --seeds {len(seeds_there)} so that "
                            "every seed pairs")


def _side(records: list[dict[str, Any]], keys: list[Key]) -> dict[str, Any]:
    """{model: {seed: mean loss}}, the same per domain, and the tokens at COLUMN, of one record."""
    per_model = {k: losses(records, k[0], k[1], COLUMN) for k in keys}
    tokens = next((r["tokens_seen"] for r in records if r["column"] == COLUMN), None)
    eval_tokens = next((r["eval_tokens"] for r in records if r["column"] == COLUMN), None)
    return {"losses": per_model, "tokens": tokens, "eval_tokens": eval_tokens}


def _stats(per_seed: dict[int, float], seeds: list[int]) -> dict[str, Any]:
    mean, lo, hi = paired_interval([per_seed[s] for s in seeds])
    return {"mean_diff_nats": mean, "ci95": [lo, hi] if len(seeds) > 1 else None,
            "per_seed": [per_seed[s] for s in seeds]}


def reading(stats: dict[str, Any], n: int) -> str:
    """How a change reads: "gains" (interval below 0), "loses" (above 0), "within noise", or not tested."""
    if n < 2:
        return NOT_TESTED
    lo, hi = stats["ci95"]
    return "gains" if hi < 0 else "loses" if lo > 0 else "within noise"


def trend(shorter: Shorter, records: list[dict[str, Any]], tables: list[int], extra: list[Row],
          sanity: str) -> dict[str, Any]:
    """results.json's "trend": per contrast of this record's tables (and extra models) whose models both records
    have, the per-seed change of its value from the shorter record's 100% to this one's, with its interval."""
    keys_here = {(r["variant"], r["bitnet"]) for r in records if r["column"] == COLUMN}
    keys_there = {(r["variant"], r["bitnet"]) for r in shorter.records if r["column"] == COLUMN}
    contrasts = claim_contrasts(tables, keys_here & keys_there, extra)
    keys = sorted({k for c in contrasts for k in c.keys})
    short, long = _side(shorter.records, keys), _side(records, keys)
    comps = []
    for c in contrasts:
        before = c.per_seed({k: {s: v["mean"] for s, v in short["losses"][k].items()} for k in c.keys})
        after = c.per_seed({k: {s: v["mean"] for s, v in long["losses"][k].items()} for k in c.keys})
        seeds = sorted(set(before) & set(after))
        if not seeds:
            continue
        change = {s: after[s] - before[s] for s in seeds}
        per_domain = {}
        for d in DOMAINS:
            b = c.per_seed({k: {s: v[d] for s, v in short["losses"][k].items()} for k in c.keys})
            a = c.per_seed({k: {s: v[d] for s, v in long["losses"][k].items()} for k in c.keys})
            per_domain[d] = _stats({s: a[s] - b[s] for s in seeds}, seeds)
        stats = _stats(change, seeds)
        comps.append({**c.describe(), "seeds": seeds, "n_seeds": len(seeds), "shorter": _stats(before, seeds),
                      "longer": _stats(after, seeds), "change": {**stats, "per_domain": per_domain},
                      "reading": reading(stats, len(seeds))})
    return {"against": str(shorter.source), "column": COLUMN, "configs_from": shorter.config_origin,
            "shorter": {"preset": shorter.preset, "tokens": short["tokens"], "eval_tokens": short["eval_tokens"],
                        "sanity": shorter.sanity},
            "longer": {"tokens": long["tokens"], "eval_tokens": long["eval_tokens"], "sanity": sanity},
            "comparisons": comps}


def _ci(s: dict[str, Any]) -> str:
    if s["ci95"] is None:
        return f"{s['mean_diff_nats']:+.4f} (no interval)"
    return f"{s['mean_diff_nats']:+.4f} [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}]"


def _tokens(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def trend_lines(tr: dict[str, Any]) -> list[str]:
    """The "Trend with training length" section of tables.md."""
    a, b = tr["shorter"], tr["longer"]
    lines = ["## Trend with training length", "",
             f"Against `{tr['against']}` (preset `{a['preset']}`, {_tokens(a['tokens'])} tokens per model) -> this "
             f"record ({_tokens(b['tokens'])}), both at {tr['column']}. Per seed: the difference at "
             f"{_tokens(b['tokens'])} minus the same difference at {_tokens(a['tokens'])} (mean eval loss of the 3 "
             "domains, nats), then its mean and 95% Student-t interval over the seeds. **gains**: the interval is "
             "below 0, the first model gains on the second as training gets longer; **loses**: above 0. The models "
             f"were checked equal outside steps, warm-up and evaluation settings; configs of the shorter record from "
             f"{tr['configs_from']}.", ""]
    if a["sanity"] != "holds" or b["sanity"] != "holds":
        lines += [f"Sanity check: {a['sanity']} in the shorter record, {b['sanity']} in this one; a trend of claims "
                  "read where SMoE does not beat dense measures the same noise as those claims.", ""]
    if a["eval_tokens"] != b["eval_tokens"]:
        lines += [f"The records evaluated {a['eval_tokens']} and {b['eval_tokens']} tokens per domain at "
                  f"{tr['column']}: their windows differ, which adds to the spread.", ""]
    lines += [f"| comparison | Δ at {_tokens(a['tokens'])} [95% CI] | Δ at {_tokens(b['tokens'])} [95% CI] | change "
              "per seed | change [95% CI] | n | reading |", "|---|---|---|---|---|---:|---|"]
    for c in tr["comparisons"]:
        per_seed = " / ".join(f"{v:+.4f}" for v in c["change"]["per_seed"])
        lines.append(f"| {c['comparison']} | {_ci(c['shorter'])} | {_ci(c['longer'])} | {per_seed} | "
                     f"{_ci(c['change'])} | {c['n_seeds']} | {c['reading']} |")
    if not tr["comparisons"]:
        lines.append("| (no claim has its models in both records) | | | | | | |")
    return lines + [""]

