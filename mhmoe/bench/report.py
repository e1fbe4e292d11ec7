"""The printed form of the records: one markdown table per (dtype, mode)."""

from __future__ import annotations


def format_table(records: list[dict], dtype: str, mode: str) -> str:
    """One markdown table of the records of (dtype, mode)."""
    rows = [r for r in records if r["dtype"] == dtype and r["mode"] == mode]
    lines = [f"### {dtype}, {mode}", "",
             "| variant | impl | median ms | min-max ms | GFLOP/s | of GEMM | peak MiB | x smoe | x sorted |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f2 = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['variant']} | {r.get('impl', '-')} | {r['median_ms']:.1f} | {r['min_ms']:.0f}-"
                     f"{r['max_ms']:.0f} | {r['gflops']:.1f} | {r['frac_of_gemm']:.2f} | {mem} | "
                     f"{f2(r['ratio_to_smoe'])} | {f2(r.get('ratio_to_sorted'))} |")
    return "\n".join(lines)
