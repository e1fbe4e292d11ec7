"""The summary of one `benchmarks/gpu_check.sh` folder: summary.md (for people) and summary.json (for tools).

    python benchmarks/gpu_check_summary.py OUT

It reads what the steps left (steps.tsv, logs/: versions.log, tests.log, fallback.json, bench_layers.json,
bench_train.json, bench_train_compiled.json, gpu9min.json; profile/profile.json) and tolerates any of them missing
or cut short: a failed step is reported with its exit code, never skipped silently; the JSON a step wrote as it
went is read as far as it got, and "What finished" says how far that was (a bench's meta.progress, gpu9min's
complete); an acceptance line whose data is missing says "not measured". The budget table puts each step's
planned seconds against its limit (the plan cut to what was left) and the seconds it used.

Acceptance lines (`ACCEPTANCE`), each PASS, FAIL or not measured; a line with an interval is judged on its median
and says when the interval straddles the target:
  * MFU of each Table 1 model in `mhmoe bench train` against the check's peak (989 TFLOP/s unless
    MHMOE_PEAK_TFLOPS says otherwise): dense >= 30%, the MoE models >= 25%; judged on the compiled run (as
    `mhmoe train` runs the gpu preset) where it reached the model, else on the eager one, the note says which;
  * MH-MoE h=3's tokens/s x SMoE's (whole model, same rounds) >= 0.95: the compiled run's when its rounds ran,
    else the eager run's;
  * layer table, fwd+bwd, each layer on what dispatch="auto" picks: h=3 / SMoE time <= 1.15 and SMoE / dense FFN
    time <= 1.6;
  * the fastest of transformers' blocks (fwd+bwd) against our SMoE on auto: its time ratio's interval is not
    entirely below 1 (transformers is not measurably faster);
  * the fallback check: every MoE layer on the expected fused dispatch, no graph break.
The "before" columns come from benchmarks/records/2026-12-04-gpu-before.json (measured then, other method: see
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mhmoe.bench.profile import format_profile
from mhmoe.complexity import model_flops_per_token
from mhmoe.fileio import atomic_write_text
from mhmoe.training.presets import PAPER_VARIANTS, preset

# Exit codes of `timeout`, and what the other codes of the steps mean.
NOTES = {0: "ok", 1: "failed", 2: "bad arguments", 124: "time limit", 127: "command not found", 130: "interrupted",
         137: "killed after the time limit"}
BEFORE = Path(__file__).resolve().parent / "records" / "2026-12-04-gpu-before.json"
MFU_MIN = {"dense": 0.30}  # every other model: MOE_MFU_MIN
MOE_MFU_MIN = 0.25
H3_TOK_S_MIN = 0.95
LAYER_H3_MAX = 1.15
LAYER_SMOE_DENSE_MAX = 1.6
TOTAL_S = 570  # the check's whole budget (gpu_check.sh)


def _steps(out: Path) -> list[dict]:
    """steps.tsv's rows by its header: step, exit_code, planned_s, limit_s, used_s, log."""
    rows = []
    path = out / "steps.tsv"
    if not path.is_file():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t") if lines else []
    for line in lines[1:]:
        cells = dict(zip(head, line.split("\t")))
        num = lambda key: int(cells[key]) if cells.get(key, "").lstrip("-").isdigit() else None  # noqa: E731
        rows.append({"step": cells.get("step", ""), "exit_code": num("exit_code"), "planned_s": num("planned_s"),
                     "limit_s": num("limit_s"), "used_s": num("used_s"),
                     "log": cells.get("log", "")})
    return rows


def _versions(logs: Path) -> dict:
    info = {}
    path = logs / "versions.log"
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
    return info


def _tests(logs: Path) -> str:
    """pytest's last summary line ('N passed, M failed in S s'), or why there is none."""
    path = logs / "tests.log"
    if not path.is_file():
        return "no tests.log"
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if (" passed" in ln or " failed" in ln or " error" in ln) and " in " in ln]
    return (hits or lines or ["empty log"])[-1].strip("= ")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _layers(logs: Path) -> dict | None:
    data = _json(logs / "bench_layers.json")
    if data is None:
        return None
    keep = ("variant", "impl", "auto", "dtype", "mode", "median_ms", "gflops", "mfu", "ratio_to_smoe", "ratio_ci",
            "ratio_to_smoe_auto", "ratio_to_smoe_auto_ci", "ratio_to_dense", "ratio_to_dense_ci", "frac_of_gemm",
            "frac_of_gemm_ci", "rounds", "target_reached", "peak_mem_mb")
    meta = data.get("meta", {})
    return {"meta": {k: meta.get(k) for k in ("gpu", "torch", "cuda", "tokens", "dim", "hidden_dim", "peak_tflops",
                                              "sampling", "target_reached", "gemm_gflops", "progress")},
            "records": [{k: r.get(k) for k in keep} for r in data.get("records", [])]}


def _train(path: Path) -> dict | None:
    """A `mhmoe bench train --json-out` file (the eager or the compiled run), as far as it got."""
    data = _json(path)
    if data is None:
        return None
    keep = ("variant", "dtype", "compile", "timing", "tokens_per_step", "micro_batch", "accum", "median_ms",
            "alone_ms", "tok_per_s", "gflops", "mfu", "ratio_to_smoe", "ratio_ci", "tok_s_x_smoe", "tok_s_x_smoe_ci",
            "rounds", "warmup_s", "peak_mem_mb")
    meta = data.get("meta", {})
    return {"meta": {k: meta.get(k) for k in ("preset", "sampling", "peak_tflops", "gemm_gflops", "wall_s",
                                              "compile", "progress")},
            "records": [{k: r.get(k) for k in keep} for r in data.get("records", [])]}


def _before() -> dict:
    """The 2026-12-04 figures by (variant, impl, mode) and by variant, with their MFU against 989 TFLOP/s."""
    data = _json(BEFORE) or {}
    layers = {(r["variant"], r["impl"], r["mode"]): r for r in data.get("bench_layers", {}).get("records", [])}
    train = {}
    for variant, tok_s in data.get("train", {}).get("tok_per_s", {}).items():
        cfg = preset("gpu", variant)
        train[variant] = {"tok_per_s": tok_s,
                          "mfu": tok_s * 3 * model_flops_per_token(cfg.model, seq_len=cfg.seq_len) / 989e12}
    return {"layers": layers, "train": train}


def _line(name: str, target: str, value: float | None, ci: list | None = None, ok: bool | None = None,
          note: str = "") -> dict:
    verdict = "not measured" if value is None or ok is None else ("PASS" if ok else "FAIL")
    return {"check": name, "target": target, "value": value, "ci": ci, "verdict": verdict, "note": note}


def _straddles(ci: list | None, threshold: float) -> str:
    return "interval straddles the target" if ci and ci[0] <= threshold <= ci[1] else ""


def acceptance(layers: dict | None, train: dict | None, fallback: dict | None, peak: float | None,
               compiled: dict | None = None) -> list[dict]:
    """The acceptance lines (module docstring): `train` is the eager bench_train, `compiled` the compiled one."""
    lines = []
    eager = {r["variant"]: r for r in (train or {}).get("records", [])}
    comp = {r["variant"]: r for r in (compiled or {}).get("records", [])}
    for v in PAPER_VARIANTS:
        floor = MFU_MIN.get(v, MOE_MFU_MIN)
        r, note = comp.get(v), ""
        if r is not None:
            note = f"compiled ({r.get('compile')}), {'timed alone' if r.get('timing') == 'alone' else 'rounds'}"
        else:
            r = eager.get(v)
            note = "eager: " + ("the compiled run did not reach it" if compiled is not None else "no compiled run")
        mfu = None if r is None or r.get("mfu") is None else 100 * r["mfu"]
        lines.append(_line(f"MFU {v} (whole model)", f">= {100 * floor:.0f}% of {peak} TFLOP/s", mfu, None,
                           None if mfu is None else mfu >= 100 * floor, note if mfu is not None else ""))
    h3, source = comp.get("mhmoe-h3"), "compiled"
    if h3 is None or h3.get("tok_s_x_smoe") is None:  # the compiled run's rounds did not run: the eager one's
        h3, source = eager.get("mhmoe-h3"), "eager"
    v = None if h3 is None else h3.get("tok_s_x_smoe")
    ci = None if h3 is None else h3.get("tok_s_x_smoe_ci")
    lines.append(_line("mhmoe-h3 tokens/s x SMoE (whole model)", f">= {H3_TOK_S_MIN}", v, ci,
                       None if v is None else v >= H3_TOK_S_MIN,
                       "; ".join(filter(None, (source if v is not None else "", _straddles(ci, H3_TOK_S_MIN))))))
    auto = {r["variant"]: r for r in (layers or {}).get("records", []) if r.get("mode") == "fwd+bwd" and r.get("auto")}
    for name, variant, key, target in (("layer mhmoe-h3 / SMoE time (fwd+bwd, auto)", "mhmoe-h3", "ratio_to_smoe_auto",
                                        LAYER_H3_MAX),
                                       ("layer SMoE / dense FFN time (fwd+bwd, auto)", "smoe", "ratio_to_dense",
                                        LAYER_SMOE_DENSE_MAX)):
        r = auto.get(variant)
        v = None if r is None else r.get(key)
        ci = None if r is None else r.get(f"{key}_ci")
        impl = "" if r is None else f"on {r['impl']}"
        lines.append(_line(name, f"<= {target}", v, ci, None if v is None else v <= target,
                           "; ".join(filter(None, (impl, _straddles(ci, target))))))
    hf = [r for r in (layers or {}).get("records", []) if r["variant"].startswith("hf-") and r.get("mode") == "fwd+bwd"
          and r.get("ratio_to_smoe_auto") is not None]
    best = min(hf, key=lambda r: r["median_ms"], default=None)
    v = None if best is None else best["ratio_to_smoe_auto"]
    ci = None if best is None else best.get("ratio_to_smoe_auto_ci")
    lines.append(_line("fastest transformers block / our SMoE time (fwd+bwd)", "interval not entirely below 1", v, ci,
                       None if ci is None else ci[1] >= 1.0, "" if best is None else best["variant"]))
    ok = None if fallback is None else bool(fallback.get("ok"))
    lines.append(_line(f"fallback check: every MoE layer on {(fallback or {}).get('expect', '?')}, 0 graph breaks",
                       "all five models", None if ok is None else float(ok), None, ok,
                       "" if fallback is None else "; ".join(r["line"] for r in fallback.get("variants", [])
                                                             if not r.get("ok"))))
    return lines


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ci(v: float | None, ci: list | None, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    return _fmt(v, spec) + ("" if not ci else f" [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]")


def markdown(summary: dict) -> str:
    v = summary["versions"]
    dry = v.get("dry_run") == "1"
    lines = ["# GPU check", "",
             f"- date {v.get('date', '?')}, {v.get('gpu', 'no GPU seen by torch')}; torch {v.get('torch', '?')}, "
             f"CUDA {v.get('cuda', '?')}, triton {v.get('triton', '?')}, transformers {v.get('transformers', '?')}; "
             f"git {v.get('git', '?')[:12]}",
             f"- peak for MFU {summary['peak_tflops']} TFLOP/s" + (" (CPU dry run: no figure here is a GPU figure)"
                                                                   if dry else ""),
             f"- tests: {summary['tests']}"]
    lines += _budget_md(summary["steps"])
    lines += ["", "## What finished", ""] + [f"- {line}" for line in summary["finished"]]
    lines += ["", "## Acceptance", "", "| check | target | measured [95% CI] | verdict | note |",
              "|---|---|---:|---|---|"]
    for a in summary["acceptance"]:
        value = a["value"]
        shown = "-" if value is None else ("yes" if a["check"].startswith("fallback") and value else
                                           "no" if a["check"].startswith("fallback") else _ci(value, a["ci"], ".3g"))
        lines.append(f"| {a['check']} | {a['target']} | {shown} | **{a['verdict']}** | {a['note']} |")
    fb = summary["fallback"]
    lines += ["", "## Fallback check", ""]
    lines += ["no fallback.json (see the fallback log)"] if fb is None else [f"- {r['line']}" for r in fb["variants"]]
    lines += _layer_md(summary["bench_layers"], summary["before"]["layers"])
    lines += _train_md(summary["bench_train"], summary["before"]["train"], "eager")
    lines += _train_md(summary.get("bench_train_compiled"), {}, "compiled")
    lines += _nine_md(summary.get("gpu9min"))
    prof = summary["profile"]
    lines += ["", "## Profile (mhmoe bench train --profile)", ""]
    if prof is None:
        lines.append("no profile/profile.json")
    else:
        table = format_profile(prof).split("\n## ")[0].splitlines()
        lines += [ln for ln in table if not ln.startswith("# ")]
    return "\n".join(lines).rstrip() + "\n"


def _layer_md(bench: dict | None, before: dict) -> list[str]:
    if bench is None:
        return ["", "## Layer table: no bench_layers.json (see its log)"]
    m = bench["meta"]
    loops = "; ".join(f"{k}: {s.get('rounds')} rounds in {s.get('seconds')} s, every interval within the target: "
                      f"{s.get('target_reached')}" for k, s in (m.get("sampling") or {}).items())
    out = ["", f"## Layer table ({m.get('tokens')} tokens, d={m.get('dim')}; {loops})", "",
           "`*` = what dispatch=\"auto\" runs on this device. x SMoE = time / SMoE's on auto, in the same rounds. "
           "before = 2026-12-04 (bench_layers, eager, other rounds).", "",
           "| variant | impl | mode | median ms | MFU | x SMoE auto [95% CI] | x dense [95% CI] | before ms |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for mode in ("fwd+bwd", "fwd"):
        for r in bench["records"]:
            if r["mode"] != mode:
                continue
            b = before.get((r["variant"], r["impl"], mode))
            mfu = None if r["mfu"] is None else 100 * r["mfu"]
            out.append(f"| {r['variant']} | {r['impl']}{'*' if r.get('auto') else ''} | {mode} | "
                       f"{_fmt(r['median_ms'], '.3f')} | {_fmt(mfu, '.1f')}% | "
                       f"{_ci(r.get('ratio_to_smoe_auto'), r.get('ratio_to_smoe_auto_ci'), '.2f')} | "
                       f"{_ci(r.get('ratio_to_dense'), r.get('ratio_to_dense_ci'), '.2f')} | "
                       f"{_fmt(None if b is None else b['median_ms'], '.3f')} |")
    return out


def _train_md(bench: dict | None, before: dict, which: str) -> list[str]:
    name = "bench_train.json" if which == "eager" else "bench_train_compiled.json"
    if bench is None:
        return ["", f"## Whole model, {which}: no {name} (see its log)"]
    m = bench["meta"]
    s = (m.get("sampling") or {}).get("train", {})
    timing = (f"{s.get('rounds')} timed steps each, shuffled rounds" if s else
              "each model timed alone (3 steps after its warm-up); the shuffled rounds did not run")
    out = ["", f"## Whole model, {which} (`mhmoe bench train`, preset {m.get('preset')}; {timing})", "",
           "ms/step alone = the median of the 3 steps each model ran alone right after its warm-up. "
           + ("before = 2026-12-04, `mhmoe train` seed 0 (eager, one micro-batch per step; benchmarks/RESULTS.md)."
              if before else ""), "",
           "| model | compile | tokens/step | warm-up s | ms/step alone | ms/step | tokens/s | MFU | "
           "tokens/s x SMoE [95% CI] | before tokens/s (MFU) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bench["records"]:
        b = before.get(r["variant"])
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        was = "-" if b is None else f"{b['tok_per_s']:,.0f} ({100 * b['mfu']:.1f}%)"
        alone = r["median_ms"] if r.get("timing") == "alone" else r.get("alone_ms")
        rounds = None if r.get("timing") == "alone" else r["median_ms"]
        out.append(f"| {r['variant']} | {r.get('compile')} | {r['tokens_per_step']:,} | "
                   f"{_fmt(r.get('warmup_s'), '.1f')} | {_fmt(alone, '.1f')} | {_fmt(rounds, '.1f')} | "
                   f"{_fmt(r['tok_per_s'], ',.0f')} | "
                   f"{_fmt(mfu, '.1f')}% | {_ci(r.get('tok_s_x_smoe'), r.get('tok_s_x_smoe_ci'), '.3f')} | {was} |")
    return out


def _budget_md(steps: list[dict]) -> list[str]:
    """Each step's planned seconds against its limit (the plan cut to what was left) and the seconds it used."""
    out = ["", "## Budget", "", "| step | exit | planned s | limit s | used s | note |",
           "|---|---:|---:|---:|---:|---|"]
    for s in steps:
        rc = s["exit_code"]
        cut = s["limit_s"] is not None and s["planned_s"] is not None and s["limit_s"] < s["planned_s"]
        note = NOTES.get(rc, "failed") + ("; its limit cut to what was left" if cut else "")
        out.append(f"| {s['step']} | {rc} | {_fmt(s['planned_s'], 'd')} | {_fmt(s['limit_s'], 'd')} | "
                   f"{_fmt(s['used_s'], 'd')} | {note} |")
    used = sum(s["used_s"] or 0 for s in steps)
    planned = sum(s["planned_s"] or 0 for s in steps)
    out += ["", f"Used {used} s of the check's {TOTAL_S} s (the steps' plans add up to {planned} s; the summary's "
            "own row and the packing come after this table)."]
    return out


def finished(summary: dict) -> list[str]:
    """How far each measuring step got, from what it wrote (a step cut off keeps what it finished)."""
    out = []
    for key, name in (("bench_layers", "bench_layers"), ("bench_train", "bench_train (eager)"),
                      ("bench_train_compiled", "bench_train_compiled")):
        bench = summary.get(key)
        if bench is None:
            out.append(f"{name}: nothing written")
            continue
        prog = bench["meta"].get("progress") or {}
        recs = bench["records"]
        models = ", ".join(dict.fromkeys(r["variant"] for r in recs)) or "none"
        if prog.get("complete"):
            what = "complete"
        elif prog:
            what = f"cut off at {prog.get('stage')!r}"
        else:  # a file from before --json-out: printed whole at the end, so complete
            what = "complete"
        if key == "bench_layers":
            rounds = sorted({r["rounds"] for r in recs})
            out.append(f"{name}: {what}; {len(recs)} records" + (f", {rounds[-1]} rounds" if rounds else ""))
        else:
            alone = all(r.get("timing") == "alone" for r in recs) and recs
            out.append(f"{name}: {what}; models {'timed alone only' if alone else 'timed'}: {models}")
    nine = summary.get("gpu9min")
    if nine is None:
        out.append("gpu9min: nothing written")
    else:
        done, planned = list(nine.get("runs", {})), nine.get("models") or list(nine.get("runs", {}))
        out.append(f"gpu9min: {'complete' if nine.get('complete', True) else 'cut off'}; runs "
                   f"{', '.join(done) or 'none'} of {', '.join(planned)}")
    fb = summary.get("fallback")
    out.append("fallback: nothing written" if fb is None else f"fallback: {len(fb.get('variants', []))} models checked")
    out.append(f"tests: {summary['tests']}")
    prof = summary.get("profile")
    out.append("profile: none" if prof is None else f"profile: {', '.join(prof.get('variants', {}))}")
    return out


def _nine_md(nine: dict | None) -> list[str]:
    """The gpu-9min preset's per-run times (benchmarks/gpu_9min_check.py) and the matrix's time from them."""
    if nine is None:
        return ["", "## gpu-9min preset: no gpu9min.json (see its log)"]
    out = ["", f"## {nine['preset']} preset from its token pack (one seed, trained and evaluated as `mhmoe "
           "reproduce` does)", "", "| model | seconds in all | training s | tokens/s | eval loss 100% |",
           "|---|---:|---:|---:|---:|"]
    for v, r in nine["runs"].items():
        out.append(f"| {v} | {r['wall_s']:.1f} | {r['train_wall_s']:.1f} | {_fmt(r['tok_per_s'], ',.0f')} | "
                   f"{_fmt(r['eval_loss'].get('100%'), '.3f')} |")
    out += ["", f"Table 1 x 3 seeds, one run after another: about {nine['matrix_estimate_s'] / 60:.1f} minutes "
            "(the target: 9)."]
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_check_summary.py OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    logs = out / "logs"
    versions = _versions(logs)
    try:
        peak = float(versions.get("peak_tflops", ""))
    except ValueError:
        peak = None
    layers, fallback = _layers(logs), _json(logs / "fallback.json")
    train, compiled = _train(logs / "bench_train.json"), _train(logs / "bench_train_compiled.json")
    summary = {"versions": versions, "peak_tflops": peak, "steps": _steps(out), "tests": _tests(logs),
               "acceptance": acceptance(layers, train, fallback, peak, compiled), "fallback": fallback,
               "bench_layers": layers, "bench_train": train, "bench_train_compiled": compiled,
               "profile": _json(out / "profile" / "profile.json"), "gpu9min": _json(logs / "gpu9min.json")}
    summary["finished"] = finished(summary)
    before = {"layers": {}, "train": {}} if versions.get("dry_run") == "1" else _before()  # CPU toys: no before
    summary["before"] = before
    text = markdown(summary)
    summary["before"] = {"layers": list(before["layers"].values()), "train": before["train"]}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
