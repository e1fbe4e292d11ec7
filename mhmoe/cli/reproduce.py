"""`mhmoe reproduce`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mhmoe.data.corpora import resolve_data_root
from mhmoe.errors import UserError
from mhmoe.reproduction.paper_tables import TABLES
from mhmoe.reproduction.report import report
from mhmoe.reproduction.reproduce import PlannedRun, execute, plan
from mhmoe.reproduction.trend import Shorter, check_against, load_shorter
from mhmoe.training.presets import PROFILES, preset_names

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
    """The --models list: rows of the tables to keep, plus extra variants (e.g. smoe-alf) that `plan` checks
    against the preset's variant grammar."""
    if not text:
        return None
    models = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not models:
        raise UserError(f"--models: expected comma-separated variants (e.g. smoe,smoe-alf), got {text!r}")
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
    argv += ["--profile", args.profile]
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
    runs = plan(args.preset, tables, args.seeds, overrides, models, args.profile)
    shorter = _trend_against(args.trend_against, runs)
    if not args.dry_run:
        resolve_data_root(args.data_root, args.preset)  # a preset too large for the embedded sample: say so now
    print(f"mhmoe reproduce: preset {args.preset}, tables {','.join(map(str, tables))}, {args.seeds} seed(s), "
          f"profile {args.profile}: "
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
    md = report(results, out, tables, args.preset, args.profile, trend_against=shorter)
    print(md)
    print(f"wrote {out / 'tables.md'}, {out / 'results.json'} and {out / 'plots'}/")
    return 0


def _trend_against(path: str | None, runs: list[PlannedRun]) -> Shorter | None:
    """The shorter record of --trend-against, checked against the planned runs before any training."""
    if not path:
        return None
    shorter = load_shorter(path)
    check_against(shorter, runs)
    return shorter


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="train, evaluate and report the paper's Tables 1-5")
    p.add_argument("--preset", default="demo", help=f"{preset_names()} (default demo)")
    p.add_argument("--tables", default="1,2,3,4,5", help="comma-separated tables (default 1,2,3,4,5)")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds per model; claims get seed-paired 95%% intervals from 2 seeds on (default 1)")
    p.add_argument("--models", default=None,
                   help="comma-separated variants: train only these rows of the tables (e.g. smoe,mhmoe-h3); "
                        "variants outside the tables (e.g. smoe-alf, mhmoe-h3-sigmoid) are added and compared "
                        "with SMoE")
    p.add_argument("--profile", default="mhmoe", choices=PROFILES,
                   help="MoE settings of the tables' MoE rows: mhmoe (ours, default) or authors (the -authors "
                        "variants: the authors' released code); the dense row is shared")
    p.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field in every run")
    p.add_argument("--data-root", default=None,
                   help="corpora folder (default: $MHMOE_DATA_ROOT, else the embedded sample: smoke and demo)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: OUT/cache)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: evaluate and report the runs that are finished (partial tables)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
    p.add_argument("--trend-against", default=None, metavar="DIR",
                   help="a shorter record of the same models and seeds (its output directory or results.json): "
                        "report how each claim's seed-paired difference changes from it to this one")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the matrix, each with cores/workers threads (default 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a started worker: no report
    p.set_defaults(func=_cli)
