"""The printed form of the records: one markdown table per (dtype, mode), each comparison with its interval."""

from __future__ import annotations


def _ci(value: float | None, ci: list[float] | None) -> str:
    """'1.13 [1.08, 1.19]': a median with its 95% interval; '-' when there is no comparison."""
    if value is None:
        return "-"
    if ci is None or ci[0] == ci[1] == value:
        return f"{value:.2f}"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def format_table(records: list[dict], dtype: str, mode: str) -> str:
    """One markdown table of the records of (dtype, mode); the MFU column only when a peak was given."""
    rows = [r for r in records if r["dtype"] == dtype and r["mode"] == mode]
    with_mfu = any(r.get("mfu") is not None for r in rows)
    head = "| variant | impl | median ms | min-max ms | GFLOP/s | " + ("MFU | " if with_mfu else "")
    head += "of GEMM [95% CI] | peak MiB | x smoe [95% CI] | x sorted [95% CI] | rounds |"
    lines = [f"### {dtype}, {mode}", "", head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        mfu = f"{100 * r['mfu']:.1f}% | " if with_mfu else ""
        lines.append(f"| {r['variant']} | {r.get('impl', '-')} | {r['median_ms']:.1f} | {r['min_ms']:.0f}-"
                     f"{r['max_ms']:.0f} | {r['gflops']:.1f} | {mfu}"
                     f"{_ci(r['frac_of_gemm'], r.get('frac_of_gemm_ci'))} | {mem} | "
                     f"{_ci(r['ratio_to_smoe'], r.get('ratio_ci'))} | "
                     f"{_ci(r.get('ratio_to_sorted'), r.get('ratio_to_sorted_ci'))} | {r['rounds']} |")
    return "\n".join(lines)


def format_train_lines(records: list[dict]) -> str:
    """One line per variant of `mhmoe bench train`: tokens/s, x SMoE with its interval, warm-up."""
    return "\n".join(f"{r['variant']:<14} {r['dtype']:<9} {r['tok_per_s']:10.0f} tokens/s  x smoe "
                     f"{_ci(r['ratio_to_smoe'], r.get('ratio_ci'))}"
                     + (f"  x float32 {_ci(r['ratio_to_float32'], r.get('ratio_to_float32_ci'))}"
                        if r.get("ratio_to_float32") is not None else "")
                     + f"  warm-up {r['warmup_s']:.1f} s" for r in records)


def format_sampling(sampling: dict, target: float) -> str:
    """Per sampling loop: rounds, seconds, and whether every interval got within +-target."""
    return "\n".join(
        f"# sampling [{label}]: {s['rounds']} rounds in {s['seconds']} s; every interval within "
        f"+-{100 * target:g}%: {'yes' if s['target_reached'] else 'no (time cap)'}"
        + ("" if s["widest_halfwidth"] is None else f", widest +-{100 * s['widest_halfwidth']:.1f}%")
        for label, s in sampling.items())
