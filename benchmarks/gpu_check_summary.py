"""The summary of one `benchmarks/gpu_check.sh` folder: summary.md (for people) and summary.json (for tools).

    python benchmarks/gpu_check_summary.py OUT

It reads what the steps left (steps.tsv, versions.log, tests.log, bench_layers.json, train_*/) and tolerates any
of them missing or cut short: a failed step is reported with its exit code, never skipped silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mhmoe.bench import run_throughput

# Exit codes of `timeout`: the train steps are meant to end on it, every other step is not.
TIMED_OUT = {124: "time limit", 137: "killed after the time limit", 130: "interrupted"}
NOTES = {0: "ok", 127: "command not found", **TIMED_OUT}


def _steps(out: Path) -> list[dict]:
    rows = []
    path = out / "steps.tsv"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        for line in lines[1:]:
            name, rc, seconds, log = (line.split("\t") + ["", "", "", ""])[:4]
            rows.append({"step": name, "exit_code": int(rc) if rc.lstrip("-").isdigit() else None,
                         "seconds": int(seconds) if seconds.isdigit() else None, "log": log})
    return rows


def _versions(out: Path) -> dict:
    info = {}
    path = out / "versions.log"
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
    return info


def _tests(out: Path) -> str:
    """pytest's last summary line ('N passed, M failed in S s'), or why there is none."""
    path = out / "tests.log"
    if not path.is_file():
        return "no tests.log"
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if (" passed" in ln or " failed" in ln or " error" in ln) and " in " in ln]
    return (hits or lines or ["empty log"])[-1].strip("= ")


def _bench(out: Path) -> dict | None:
    path = out / "bench_layers.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keep = ("variant", "impl", "dtype", "mode", "median_ms", "gflops", "mfu", "ratio_to_smoe", "ratio_ci",
            "frac_of_gemm", "frac_of_gemm_ci", "rounds", "target_reached", "peak_mem_mb")
    meta = data.get("meta", {})
    return {"meta": {k: meta.get(k) for k in ("gpu", "torch", "cuda", "tokens", "dim", "hidden_dim", "peak_tflops",
                                              "sampling", "target_reached", "gemm_gflops")},
            "records": [{k: r.get(k) for k in keep} for r in data.get("records", [])]}


def _train(out: Path, peak: float | None) -> list[dict]:
    runs = []
    for run_dir in sorted(p for p in out.glob("train_*") if p.is_dir()):
        try:
            runs.append(run_throughput(run_dir, peak))
        except Exception as e:  # noqa: BLE001  a run that never wrote its config: report why, go on
            runs.append({"variant": run_dir.name[len("train_"):], "error": f"{type(e).__name__}: {e}"})
    return runs


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(summary: dict) -> str:
    v = summary["versions"]
    lines = ["# GPU check", "",
             f"- date {v.get('date', '?')}, {v.get('gpu', 'no GPU seen by torch')}; torch {v.get('torch', '?')}, "
             f"CUDA {v.get('cuda', '?')}; "
             f"peak for MFU {summary['peak_tflops']} TFLOP/s" + (" (CPU dry run: not a GPU figure)"
                                                                  if v.get("dry_run") == "1" else ""),
             f"- tests: {summary['tests']}", "", "| step | exit | seconds | note |", "|---|---:|---:|---|"]
    for s in summary["steps"]:
        rc = s["exit_code"]
        note = NOTES.get(rc, "failed")
        if s["step"].startswith("train_") and rc in TIMED_OUT:
            note = "stopped by the time limit, as planned"
        lines.append(f"| {s['step']} | {rc} | {s['seconds']} | {note} |")
    bench = summary["bench_layers"]
    if bench is None:
        lines += ["", "bench layers: no JSON (see bench_layers.log)"]
    else:
        m = bench["meta"]
        loops = "; ".join(f"{k}: {s.get('rounds')} rounds in {s.get('seconds')} s, every interval within the "
                          f"target: {s.get('target_reached')}" for k, s in (m.get("sampling") or {}).items())
        lines += ["", f"## bench layers ({m.get('tokens')} tokens, d={m.get('dim')}; {loops})", "",
                  "| variant | impl | dtype | mode | median ms | GFLOP/s | MFU | x smoe [95% CI] | of GEMM [95% CI] |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in bench["records"]:
            ci, fci = r.get("ratio_ci") or [None, None], r.get("frac_of_gemm_ci") or [None, None]
            lines.append(
                f"| {r['variant']} | {r['impl']} | {r['dtype']} | {r['mode']} | {_fmt(r['median_ms'], '.2f')} | "
                f"{_fmt(r['gflops'], '.0f')} | {_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}% | "
                f"{_fmt(r['ratio_to_smoe'], '.2f')} [{_fmt(ci[0], '.2f')}, {_fmt(ci[1], '.2f')}] | "
                f"{_fmt(r['frac_of_gemm'], '.2f')} [{_fmt(fci[0], '.2f')}, {_fmt(fci[1], '.2f')}] |")
    lines += ["", "## train (median over logged steps after the first 10%)", "",
              "| model | steps used | tokens/s | GFLOP/s | MFU |", "|---|---:|---:|---:|---:|"]
    for t in summary["train"]:
        if "error" in t:
            lines.append(f"| {t['variant']} | - | - | - | {t['error'][:80]} |")
            continue
        mfu = None if t["mfu"] is None else 100 * t["mfu"]
        lines.append(f"| {t['variant']} | {t['steps_used']} | {_fmt(t['tok_per_s'], ',.0f')} | "
                     f"{_fmt(t['gflops'], '.0f')} | {_fmt(mfu, '.1f')}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_check_summary.py OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    versions = _versions(out)
    try:
        peak = float(versions.get("peak_tflops", ""))
    except ValueError:
        peak = None
    summary = {"versions": versions, "peak_tflops": peak, "steps": _steps(out), "tests": _tests(out),
               "bench_layers": _bench(out), "train": _train(out, peak)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
