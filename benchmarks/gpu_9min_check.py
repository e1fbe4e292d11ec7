"""One seed of the `gpu-9min` matrix's fastest and slowest MoE models, run exactly as `mhmoe reproduce` runs them
(training, then the 50% and 100% evaluations) from the token pack, timed: the measured per-run time that replaces
the estimate of benchmarks/estimate_gpu_time.py, and the matrix's time extrapolated from it.

    python benchmarks/gpu_9min_check.py --pack packs/gpu-9min --json out.json          # on the GPU machine
    python benchmarks/gpu_9min_check.py --preset smoke --pack PACK --json out.json     # the plumbing, on CPU

The pack is built beforehand where the corpora are (`mhmoe data pack --preset gpu-9min --data-root DIR --out
packs/gpu-9min`) and carried to the GPU machine. Run directories go to a temporary folder (their checkpoints are
large); the JSON keeps each run's wall time, tokens/s and losses. It is rewritten (atomically) after each run, with
the matrix's estimate from the runs so far and `complete` (false until the last run is in): a check cut off in the
second run keeps the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mhmoe.bench.mfu import run_throughput
from mhmoe.data.pack import is_pack
from mhmoe.fileio import atomic_write_text
from mhmoe.reproduction.reproduce import execute, plan
from mhmoe.training.presets import PAPER_VARIANTS

SEEDS = 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpu-9min")
    p.add_argument("--pack", required=True, help="the preset's token pack (mhmoe data pack)")
    p.add_argument("--models", default="smoe,mhmoe-h3", help="comma-separated variants to time (default: the "
                                                              "fastest and slowest MoE models)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--json", required=True, help="where to write the measurements")
    args = p.parse_args()
    if not is_pack(Path(args.pack)):
        print(f"gpu_9min_check: --pack: {args.pack} is no token pack; build it with `mhmoe data pack --preset "
              f"{args.preset} --data-root DIR --out {args.pack}` and carry it", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    runs = plan(args.preset, [1], 1, args.set, models)
    out: dict = {"preset": args.preset, "pack": str(args.pack), "models": models, "runs": {}, "complete": False}
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            t0 = time.perf_counter()
            res = execute([r], Path(tmp), args.pack, str(Path(tmp) / "cache"), progress=False, log=print)
            wall = time.perf_counter() - t0
            info = res[r.run_id]
            thr = run_throughput(Path(tmp) / "runs" / r.run_id)
            out["runs"][r.row.variant] = {
                "wall_s": round(wall, 2), "train_wall_s": round(info["wall_s"], 2),
                "tok_per_s": thr["tok_per_s"], "tokens": r.cfg.steps * r.cfg.tokens_per_step,
                "eval_loss": {col: statistics.fmean(d["loss"] for d in ev["domains"].values())
                              for col, ev in info["evals"].items()}}
            print(f"{r.row.variant}: {wall:.1f} s in all ({info['wall_s']:.1f} s training), "
                  f"{thr['tok_per_s'] or 0:,.0f} tokens/s", flush=True)
            walls = [v["wall_s"] for v in out["runs"].values()]
            # The timed models bracket the others in FLOPs and speed (fastest and slowest MoE): their mean per run
            # times the matrix's runs, run one after another (from the runs so far until the last is in).
            out["matrix_estimate_s"] = round(statistics.fmean(walls) * SEEDS * len(PAPER_VARIANTS), 1)
            out["complete"] = len(out["runs"]) == len(runs)
            atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")
    print(f"Table 1 x {SEEDS} seeds, one run after another: about {out['matrix_estimate_s'] / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
