"""G1, the pilot of the recipe study that `mhmoe reproduce` cannot express (docs/REPRODUCTION.md): the `gpu-9min`
preset's exact step schedule at reduced width and depth, on the CPU, for dense and SMoE. A preset's width is no
`--set` field (the dense FFNs and experts are sized from it), so the reduced model is built here. The study's other
candidate, C1, is the `cpu` preset itself: `mhmoe reproduce --preset cpu --tables 1 --models dense,smoe --seeds 2`.

The runs go through the reproduction's own matrix and report (mhmoe.reproduction): the same run directories,
locks, resumption, sanity check and the plot of SMoE - dense at every periodic evaluation with its 95% interval
(plots/differences_vs_tokens.png; "curves" in results.json). Two processes on two cores share the runs:

    python benchmarks/regime_pilot.py --out runs/g1 &     # one thread each
    python benchmarks/regime_pilot.py --out runs/g1       # both write OUT/tables.md and OUT/results.json at the end
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mhmoe.reproduction.paper_tables import Row, run_id
from mhmoe.reproduction.report import report
from mhmoe.reproduction.reproduce import SEED_BASE, PlannedRun, execute
from mhmoe.training.config import TrainConfig
from mhmoe.training.presets import gpu_9min

ROWS = (Row("Dense", "dense"), Row("SMoE", "smoe"))


def gpu_9min_reduced(variant: str) -> TrainConfig:
    """The `gpu-9min` preset's exact step schedule (600 steps of 64 x 256 tokens, lr 1.5e-3, 60 warm-up steps,
    its 8192-token BPE) at reduced width and depth (d=96, 4 layers, SMoE 8 x 256), in float32 on the CPU;
    evaluation cut to 16,384 tokens per domain (65,536 at the milestones) to save CPU time."""
    cfg = gpu_9min(variant, dim=96, n_layers=4, n_heads=4, hidden_dim=256, preset_name="pilot")
    cfg = cfg.replace(dtype="float32", device="cpu", eval_tokens=16_384)
    return cfg.override("data.max_eval_tokens", 65_536)


def planned(seeds: int) -> list[PlannedRun]:
    return [PlannedRun(run_id(row, s), row, s, gpu_9min_reduced(row.variant).replace(seed=SEED_BASE + s, threads=1),
                       [1])
            for s in range(seeds) for row in ROWS]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    p.add_argument("--data-root", default=os.environ.get("MHMOE_DATA_ROOT"))
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    results = execute(planned(args.seeds), out, args.data_root, str(out / "cache"), progress=False,
                      log=lambda m: print(m, flush=True), report_only=args.report_only)
    if results:
        print(report(results, out, [1], "gpu-9min at d=96, 4 layers (G1 pilot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
