"""`mhmoe reproduce`: the matrix of runs behind the paper's Tables 1-5, their evaluation, report and verdicts.

Every (variant, BitNet, seed) is one run directory DIR/runs/<run_id>; a run shared by several tables (the SMoE of
Tables 1 and 4, the MH-MoE h=2 of Tables 1, 4 and 5, ...) is trained once. Each run is evaluated at 50% and
100% of its steps (the paper's 50k / 100k columns) on every domain, results cached next to the run, so the
command can be stopped and re-run at any time: finished work is skipped and interrupted runs resume.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mhmoe.data import resolve_data_root
from mhmoe.errors import UserError
from mhmoe.fileio import atomic_write_text
from mhmoe.paper_tables import TABLES, Row, run_id
from mhmoe.report import report
from mhmoe.train import TrainConfig, train

SEED_BASE = 1337
# Ternary weights move only when an update crosses a rounding threshold, so the b1.58 recipe trains them at a
# higher peak LR than their full-precision twins; a modest factor, as our presets' LRs are already high.
BITNET_LR_SCALE = 1.5


@dataclass
class PlannedRun:
    run_id: str
    row: Row
    seed: int
    cfg: TrainConfig
    tables: list[int]


def plan(preset_name: str, tables: list[int], seeds: int, overrides: list[str] | None = None,
         models: list[str] | None = None) -> list[PlannedRun]:
    """The unique runs the chosen tables need, identical configurations planned once: every run of seed 0 in
    table order, then every run of seed 1, ..., so that a matrix stopped early already has whole tables.

    models: keep only the rows of these variants (e.g. smoe and mhmoe-h3 for a learning-rate check).
    """
    from mhmoe.train import resolve_config

    runs: dict[str, PlannedRun] = {}
    for t in tables:
        for row in TABLES[t][1]:
            if models is not None and row.variant not in models:
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


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_tables(text: str) -> list[int]:
    try:
        tables = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--tables: expected a comma-separated list of 1-5, got {text!r}") from None
    if not tables or any(t not in TABLES for t in tables):
        raise UserError(f"--tables: tables are 1, 2, 3, 4, 5; got {text!r}")
    return tables


def parse_models(text: str | None, tables: list[int]) -> list[str] | None:
    if not text:
        return None
    models = [m.strip() for m in text.split(",") if m.strip()]
    known = {r.variant for t in tables for r in TABLES[t][1]}
    for m in models:
        if m not in known:
            raise UserError(f"--models: {m!r} is not a row of tables {','.join(map(str, tables))}; "
                            f"use some of {', '.join(sorted(known))}")
    return models


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _start_workers(args: argparse.Namespace, out: Path, overrides: list[str]) -> list[subprocess.Popen]:
    """Start args.workers - 1 more processes of this command on the same `out`; the run locks share the matrix."""
    argv = [sys.executable, "-m", "mhmoe.cli", "reproduce", "--preset", args.preset, "--tables", args.tables,
            "--seeds", str(args.seeds), "--out", str(out), "--workers", str(args.workers), "--worker", "--no-progress"]
    if args.models:
        argv += ["--models", args.models]
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
    models = parse_models(args.models, tables)
    runs = plan(args.preset, tables, args.seeds, overrides, models)
    if not args.dry_run:
        resolve_data_root(args.data_root, args.preset)  # a preset too large for the embedded sample: say so now
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
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds per model; claims get seed-paired 95%% intervals from 2 seeds on (default 1)")
    p.add_argument("--models", default=None,
                   help="comma-separated variants: train only these rows of the tables (e.g. smoe,mhmoe-h3)")
    p.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field in every run")
    p.add_argument("--data-root", default=None,
                   help="corpora folder (default: $MHMOE_DATA_ROOT, else the embedded sample: smoke and demo)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: OUT/cache)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: evaluate and report the runs that are finished (partial tables)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the matrix, each with cores/workers threads (default 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a started worker: no report
    p.set_defaults(func=_cli)
