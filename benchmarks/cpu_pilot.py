"""The pilot behind the `cpu` preset: which model size and token budget give the narrowest seed-paired interval of
SMoE vs MH-MoE h=3 per CPU-hour?

Each candidate of `mhmoe.training.presets.cpu_scale` trains `smoe` and `mhmoe-h3` for a few seeds (1 thread per process;
run two processes on two cores, they share the runs through the run locks as `mhmoe reproduce --workers 2` does).
Every periodic evaluation point of those runs is one point of the curve: the paired difference of mean eval loss
(3 domains) per seed, its standard deviation over seeds, and the 95% half-width that 4 seeds would give with that
spread, against the CPU-hours the Table 1 + 4 + 5 matrix (12 runs per seed, 4 seeds) would take at that budget.

    python benchmarks/cpu_pilot.py --out runs/pilot            # in two shells, or with & for a second process
    python benchmarks/cpu_pilot.py --out runs/pilot --report   # the curve, as markdown and JSON

The curve is approximate: a point before the end of a run is on a schedule tuned for the full length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

from mhmoe.reproduction.paper_tables import Row
from mhmoe.reproduction.reproduce import PlannedRun, execute
from mhmoe.training.presets import cpu_scale
from mhmoe.reproduction.verdicts import paired_interval

CANDIDATES = {  # name: (cpu_scale keywords, steps); B gets the steps A's wall time buys (0.7x A's tokens/s)
    "A-d96": (dict(dim=96, n_layers=4, n_heads=4, hidden_dim=256), 250),
    "B-d144": (dict(dim=144, n_layers=4, n_heads=4, hidden_dim=384), 175),
}
VARIANTS = ("smoe", "mhmoe-h3")
MATRIX_RUNS_PER_SEED = 12  # Tables 1, 4 and 5: 5 + 4 + 3 distinct models
SEEDS_PLANNED = 4


def planned(seeds: int) -> list[PlannedRun]:
    runs = []
    for s in range(seeds):
        for name, (kw, steps) in CANDIDATES.items():
            for v in VARIANTS:
                # preset_name "cpu": the chosen candidate's runs are the matrix's own (same config and seed), so
                # `mhmoe reproduce --preset cpu` finds them trained already when they are copied into its runs/.
                cfg = cpu_scale(v, steps=steps, **kw).replace(seed=1337 + s, threads=1)
                runs.append(PlannedRun(f"{name}-{v}-s{s}", Row(v, v), s, cfg, []))
    return runs


def curve(out: Path, seeds: int) -> list[dict]:
    """One record per (candidate, evaluation step) with every seed's paired difference."""
    rows = []
    for name, (_, steps) in CANDIDATES.items():
        per_step: dict[int, dict[int, float]] = {}
        wall_per_step: list[float] = []
        for s in range(seeds):
            evals = {}
            for v in VARIANTS:
                path = out / "runs" / f"{name}-{v}-s{s}" / "evals.jsonl"
                if not path.is_file():
                    break
                recs = [json.loads(l) for l in path.read_text().splitlines()]
                evals[v] = {r["step"]: statistics.mean(r[d] for d in ("redpajama", "wikipedia", "c4")) for r in recs}
                wall = json.loads((path.parent / "train_wall.json").read_text())["wall_s"]
                wall_per_step.append(wall / steps)
            if len(evals) < len(VARIANTS):
                continue
            for step in set(evals["smoe"]) & set(evals["mhmoe-h3"]):
                per_step.setdefault(step, {})[s] = evals["mhmoe-h3"][step] - evals["smoe"][step]
        for step, diffs in sorted(per_step.items()):
            if len(diffs) < 2:
                continue
            d = list(diffs.values())
            sd = statistics.stdev(d)
            from scipy.stats import t as student_t

            hw4 = student_t.ppf(0.975, SEEDS_PLANNED - 1) * sd / math.sqrt(SEEDS_PLANNED)
            cpu_h = statistics.mean(wall_per_step) * step * MATRIX_RUNS_PER_SEED * SEEDS_PLANNED / 3600
            mean, lo, hi = paired_interval(d)
            rows.append({"candidate": name, "step": step, "tokens": step * 4096, "n_seeds": len(d),
                         "diffs": d, "mean_diff_nats": mean, "ci95": [lo, hi], "sd": sd,
                         "half_width_4_seeds": hw4, "matrix_cpu_hours": cpu_h})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--report", action="store_true", help="print the curve of the finished runs")
    p.add_argument("--data-root", default=os.environ.get("MHMOE_DATA_ROOT"))
    args = p.parse_args()
    out = Path(args.out)
    if not args.report:
        torch.set_num_threads(1)
        execute(planned(args.seeds), out, args.data_root, str(out / "cache"), progress=False,
                log=lambda m: print(m, flush=True))
        return 0
    rows = curve(out, args.seeds)
    print("| candidate | step | tokens | seeds | h3 - smoe per seed (nats) | sd | 95% half-width at 4 seeds "
          "| matrix CPU-hours (T1+4+5, 4 seeds) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['candidate']} | {r['step']} | {r['tokens'] / 1e6:.2f}M | {r['n_seeds']} | "
              + ", ".join(f"{d:+.4f}" for d in r["diffs"])
              + f" | {r['sd']:.4f} | {r['half_width_4_seeds']:.4f} | {r['matrix_cpu_hours']:.2f} |")
    (out / "pilot.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
