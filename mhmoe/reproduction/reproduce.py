"""`mhmoe reproduce`: the matrix of runs behind the paper's Tables 1-5, their evaluation, report and verdicts.

Every (variant, BitNet, seed) is one run directory DIR/runs/<run_id>; a run shared by several tables (the SMoE of
Tables 1 and 4, the MH-MoE h=2 of Tables 1, 4 and 5, ...) is trained once. Each run is evaluated at 50% and
100% of its steps (the paper's 50k / 100k columns) on every domain, results cached next to the run, so the
command can be stopped and re-run at any time: finished work is skipped and interrupted runs resume.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mhmoe.errors import ConfigError, UserError
from mhmoe.fileio import atomic_write_text
from mhmoe.reproduction.paper_tables import TABLES, Row, run_id
from mhmoe.training.checkpoint import RunBusy, latest_good_checkpoint, run_lock
from mhmoe.training.config import TrainConfig
from mhmoe.training.evaluate import evaluate_run
from mhmoe.training.loop import train
from mhmoe.training.presets import with_profile
from mhmoe.training.rundir import resolve_config

SEED_BASE = 1337
# Ternary weights move only when an update crosses a rounding threshold, so the b1.58 recipe trains them at a
# higher peak LR than their full-precision twins; a modest factor, as our presets' LRs are already high.
BITNET_LR_SCALE = 1.5


@dataclass
class PlannedRun:
    run_id: str
    row: Row  # the table row (or the extra model) this run stands for
    seed: int
    cfg: TrainConfig
    tables: list[int]
    model: str = ""  # the variant trained: row.variant under the profile (smoe-authors for smoe); "" = row.variant

    def __post_init__(self) -> None:
        self.model = self.model or self.row.variant


def plan(preset_name: str, tables: list[int], seeds: int, overrides: list[str] | None = None,
         models: list[str] | None = None, profile: str = "mhmoe") -> list[PlannedRun]:
    """The unique runs the chosen tables need, identical configurations planned once: every run of seed 0 in
    table order, then every run of seed 1, ..., so that a matrix stopped early already has whole tables.

    models: keep only the rows of these variants (e.g. smoe and mhmoe-h3 for a learning-rate check); a variant
    that is no row of the tables (e.g. smoe-alf, mhmoe-h3-sigmoid) is planned as an extra model, in no table,
    after the tables' rows of each seed, and compared with SMoE in the report.
    profile: "mhmoe" (our MoE settings) or "authors": every MoE row of the tables trains its -authors variant
    (run ids smoe-authors-s0, ...), the dense row is the same run in both; extra models are trained as named.
    """
    in_tables = {r.variant for t in tables for r in TABLES[t][1]}
    named = set(models or [])
    table_names = in_tables | {with_profile(v, profile) for v in in_tables}
    extra = [Row(m, m) for m in dict.fromkeys(models or []) if m not in table_names]
    runs: dict[str, PlannedRun] = {}
    for t, row in [(t, row) for t in tables for row in TABLES[t][1]] + [(None, row) for row in extra]:
        model = with_profile(row.variant, profile) if t is not None else row.variant
        if models is not None and row.variant not in named and model not in named:
            continue
        for s in range(seeds):
            rid = run_id(Row(row.label, model, row.bitnet), s)
            if rid in runs:
                runs[rid].tables.append(t)
                continue
            try:
                cfg = resolve_config(preset_name, model, list(overrides or [])).replace(seed=SEED_BASE + s)
            except ConfigError as e:
                if t is not None:
                    raise
                raise UserError(f"--models: {row.variant!r} is no row of tables "
                                f"{','.join(map(str, tables))} and no variant of preset {preset_name!r} ({e})") from None
            if row.bitnet:  # the b1.58 recipe: higher peak LR, two-stage LR, weight decay off at mid-training
                cfg = (cfg.override("model.bitnet", True).override("optim.schedule", "two_stage")
                       .override("optim.wd_off_at", 0.5)
                       .override("optim.lr", cfg.optim.lr * BITNET_LR_SCALE))
            runs[rid] = PlannedRun(rid, row, s, cfg, [t] if t is not None else [], model)
    return sorted(runs.values(), key=lambda r: r.seed)  # stable: table order within a seed


# ----------------------------------------------------------------------------------------------------------
# Running the matrix


def _eval_cached(run_dir: Path, step: int, cfg: TrainConfig, data_root, cache_dir) -> dict[str, Any]:  # noqa: ANN001
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
        # Named by position, not by m / steps: an odd step count puts the mid milestone at 49.7%.
        evals = {col: _eval_cached(run_dir, m, r.cfg, data_root, cache_dir)
                 for col, m in zip(("50%", "100%"), r.cfg.milestones)}
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
            if report_only:  # a report of what is finished must not wait for a run still training elsewhere
                log(f"[{i + 1}/{len(runs)}] {r.run_id}: being trained by another process (pid {e.pid}), left out")
                continue
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
