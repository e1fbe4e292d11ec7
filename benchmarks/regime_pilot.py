"""The recipe study behind the `cpu` and `gpu-9min` presets: which training recipe puts the models in a regime where
SMoE beats the dense model of equal FLOPs (the paper's first effect), before any MH-MoE claim is read?

Each candidate is a recipe (model size, vocabulary, steps x tokens per step, learning rate, warm-up) built from
`mhmoe.training.presets.cpu_scale`. Its `variants` train for `--seeds` seeds, one thread per process; start two
processes on two cores with the same --out (they share the runs through the run locks, as `mhmoe reproduce
--workers 2` does). Every periodic evaluation of those runs is a point of the curve: the seed-paired difference of
mean eval loss (3 domains) SMoE - dense and MH-MoE h=3 - SMoE, with 95% Student-t intervals, against the tokens
seen and the CPU-hours the runs took; and each run's grad-norm spikes after warm-up (above 5x its median, the
report's rule).

    python benchmarks/regime_pilot.py --out runs/regime --candidates C1 &     # two processes, one per core
    python benchmarks/regime_pilot.py --out runs/regime --candidates C1
    python benchmarks/regime_pilot.py --out runs/regime --report             # the curves, markdown and JSON

A point before the end of a run is on a schedule tuned for the full length: only the last point of each
candidate is the recipe's own result. The candidates measured, and what they showed: docs/REPRODUCTION.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from mhmoe.reproduction.paper_tables import Row
from mhmoe.reproduction.report import SPIKE_FACTOR
from mhmoe.reproduction.reproduce import SEED_BASE, PlannedRun, execute
from mhmoe.training.config import TrainConfig
from mhmoe.training.presets import cpu_scale, gpu_9min
from mhmoe.reproduction.verdicts import paired_interval

DOMAINS = ("redpajama", "wikipedia", "c4")


def recipe(*, dim: int = 144, n_layers: int = 4, n_heads: int = 4, hidden_dim: int = 384, steps: int,
           tokens_per_step: int = 4096, seq_len: int = 128, lr: float = 2e-3, warmup: int | None = None,
           vocab: int = 4096, evals: int = 8, eval_tokens: int = 16_384) -> Callable[[str], TrainConfig]:
    """A candidate: variant -> TrainConfig (cpu_scale with the schedule and data replaced)."""

    def build(variant: str) -> TrainConfig:
        cfg = cpu_scale(variant, dim=dim, n_layers=n_layers, n_heads=n_heads, hidden_dim=hidden_dim, steps=steps,
                        lr=lr, preset_name="pilot")
        batch = tokens_per_step // seq_len
        cfg = cfg.override("model.max_seq_len", max(seq_len, cfg.model.max_seq_len))
        cfg = cfg.replace(seq_len=seq_len, batch_size=min(batch, 32), tokens_per_step=tokens_per_step,
                          eval_every=max(1, steps // evals), eval_tokens=eval_tokens, ckpt_every=max(1, steps // 8))
        cfg = cfg.override("optim.warmup_steps", warmup if warmup is not None else max(1, steps // 10))
        if vocab != cfg.data.vocab_size:
            cfg = cfg.override("data.vocab_size", vocab).override("model.vocab_size", vocab)
        return cfg

    return build


def gpu_9min_reduced(variant: str) -> TrainConfig:
    """The `gpu-9min` preset's exact step schedule (600 steps of 64 x 256 tokens, lr 1.5e-3, 60 warm-up steps,
    its 8192-token BPE) at reduced width and depth (d=96, 4 layers, SMoE 8 x 256), in float32 on the CPU;
    evaluation cut to 16,384 tokens per domain (65,536 at the milestones) to save CPU time."""
    cfg = gpu_9min(variant, dim=96, n_layers=4, n_heads=4, hidden_dim=256, preset_name="pilot")
    cfg = cfg.replace(dtype="float32", device="cpu", eval_tokens=16_384)
    return cfg.override("data.max_eval_tokens", 65_536)


CANDIDATES: dict[str, tuple[Callable[[str], TrainConfig], tuple[str, ...]]] = {
    # C1: the 2026-12-03 `cpu` model (d=144, 4 layers, 4096-token BPE, 128-token windows, 4096 tokens per step)
    # trained 9x longer: 1600 steps (6.6M tokens, 0.63 epochs of the 10.4M-token mix), 10% warm-up. It became the
    # `cpu` preset (its configuration is the preset's but for the name).
    "C1": (recipe(steps=1600), ("dense", "smoe")),
    # G1: the `gpu-9min` preset's schedule at reduced width (gpu_9min_reduced).
    "G1": (gpu_9min_reduced, ("dense", "smoe")),
}


def planned(names: list[str], seeds: int) -> list[PlannedRun]:
    runs = []
    for s in range(seeds):
        for name in names:
            build, variants = CANDIDATES[name]
            for v in variants:
                cfg = build(v).replace(seed=SEED_BASE + s, threads=1)
                runs.append(PlannedRun(f"{name}-{v}-s{s}", Row(v, v), s, cfg, []))
    return runs


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def run_summary(run_dir: Path, warmup: int) -> dict:
    """Per eval step the mean loss over the domains; the grad-norm spikes after warm-up; wall seconds."""
    evals = {r["step"]: statistics.fmean(r[d] for d in DOMAINS) for r in _jsonl(run_dir / "evals.jsonl")
             if all(d in r for d in DOMAINS)}
    recs = _jsonl(run_dir / "metrics.jsonl")
    norms = [r["grad_norm"] for r in recs if isinstance(r.get("grad_norm"), float) and math.isfinite(r["grad_norm"])]
    med = statistics.median(norms) if norms else math.nan
    spikes = [(r["step"], round(r["grad_norm"] / med, 1)) for r in recs
              if r["step"] > warmup and r.get("grad_norm", 0) > SPIKE_FACTOR * med]
    wall = run_dir / "train_wall.json"
    return {"evals": evals, "spikes_after_warmup": spikes, "grad_norm_median": med,
            "steps_done": len(recs), "wall_s": json.loads(wall.read_text())["wall_s"] if wall.is_file() else None}


def curves(out: Path, names: list[str], seeds: int) -> list[dict]:
    """One record per (candidate, comparison, eval step): per-seed paired differences and their interval."""
    rows = []
    for name in names:
        build, variants = CANDIDATES[name]
        cfg = build("smoe")
        runs = {(v, s): run_summary(out / "runs" / f"{name}-{v}-s{s}", cfg.optim.warmup_steps)
                for v in variants for s in range(seeds)}
        pairs = [("smoe", "dense")] + [(v, "smoe") for v in variants if v not in ("smoe", "dense")]
        for better, base in pairs:
            if better not in variants or base not in variants:
                continue
            steps = sorted(set.intersection(*[set(runs[(v, s)]["evals"]) for v in (better, base)
                                               for s in range(seeds)]) if seeds else set())
            for step in steps:
                d = [runs[(better, s)]["evals"][step] - runs[(base, s)]["evals"][step] for s in range(seeds)]
                mean, lo, hi = paired_interval(d)
                walls = [runs[(v, s)]["wall_s"] or 0 for v in (better, base) for s in range(seeds)]
                rows.append({"candidate": name, "comparison": f"{better} - {base}", "step": step,
                             "tokens": step * cfg.tokens_per_step, "diffs": d, "mean": mean, "ci95": [lo, hi],
                             "loss": {v: statistics.fmean(runs[(v, s)]["evals"][step] for s in range(seeds))
                                      for v in (better, base)},
                             "core_hours_per_run_at_end": statistics.fmean(walls) / 3600})
        for (v, s), r in runs.items():
            rows.append({"candidate": name, "run": f"{v}-s{s}", "spikes_after_warmup": r["spikes_after_warmup"],
                         "grad_norm_median": r["grad_norm_median"], "steps_done": r["steps_done"],
                         "wall_s": r["wall_s"]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma-separated: {', '.join(CANDIDATES)}")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--report", action="store_true", help="print the curves of the runs so far")
    p.add_argument("--plot", default=None, help="with --report: write the curves to this PNG")
    p.add_argument("--data-root", default=os.environ.get("MHMOE_DATA_ROOT"))
    args = p.parse_args()
    names = [c for c in args.candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        p.error(f"--candidates: unknown {unknown}; choose from {', '.join(CANDIDATES)}")
    out = Path(args.out)
    if not args.report:
        torch.set_num_threads(1)
        execute(planned(names, args.seeds), out, args.data_root, str(out / "cache"), progress=False,
                log=lambda m: print(m, flush=True))
        return 0
    rows = curves(out, names, args.seeds)
    print("| candidate | comparison | step | tokens | per seed (nats) | mean [95% CI] | losses |")
    print("|---|---|---:|---:|---|---|---|")
    for r in rows:
        if "comparison" in r:
            print(f"| {r['candidate']} | {r['comparison']} | {r['step']} | {r['tokens'] / 1e6:.2f}M | "
                  + ", ".join(f"{d:+.3f}" for d in r["diffs"])
                  + f" | {r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["loss"].items()) + " |")
    print()
    for r in rows:
        if "run" in r:
            print(f"{r['candidate']} {r['run']}: {r['steps_done']} steps, wall {r['wall_s']} s, grad-norm median "
                  f"{r['grad_norm_median']:.3f}, spikes after warm-up {r['spikes_after_warmup'][:8]}")
    (out / "pilot.json").write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Per candidate and comparison: the mean eval loss of both models (top) and their paired difference (mean,
    95% interval, each seed as a dot; bottom), against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if "comparison" in r]
    panels = sorted({(r["candidate"], r["comparison"]) for r in pts})
    fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 7.0), squeeze=False, sharex="col")
    for col, (cand, comp) in enumerate(panels):
        rs = sorted((r for r in pts if (r["candidate"], r["comparison"]) == (cand, comp)), key=lambda r: r["step"])
        x = [r["tokens"] / 1e6 for r in rs]
        top, ax = axes[0][col], axes[1][col]
        for i, v in enumerate(rs[0]["loss"]):
            top.plot(x, [r["loss"][v] for r in rs], "o-", ms=3, color=f"C{i}", label=f"{v} (mean of seeds)")
        top.set_title(f"{cand}: mean eval loss of 3 domains")
        top.set_ylabel("nats")
        top.grid(alpha=0.3)
        top.legend(fontsize=7)
        ax.plot(x, [r["mean"] for r in rs], "o-", color="C0", label="mean of seeds")
        lo = [r["ci95"][0] for r in rs]
        hi = [r["ci95"][1] for r in rs]
        if all(math.isfinite(v) for v in lo + hi):
            ax.fill_between(x, lo, hi, color="C0", alpha=0.2, label="95% interval")
        for i in range(len(rs[0]["diffs"])):
            ax.plot(x, [r["diffs"][i] for r in rs], ".", color=f"C{i + 1}", ms=5, label=f"seed {i}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{cand}: {comp}, seed-paired")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("Δ mean eval loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
