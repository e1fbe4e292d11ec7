"""Human-readable report of a `ParityResult` (the text form of `mhmoe parity`)."""

from __future__ import annotations

from mhmoe.complexity import ParityResult, active_param_count, flops_per_token, param_count


def _fmt(n: float) -> str:
    return f"{n / 1e6:,.3f}M" if abs(n) >= 1e5 else f"{n:,.0f}"


def format_parity(r: ParityResult) -> str:
    """A table of both layers' sizes, parameters and FLOPs per token, with the ratios and the rounding."""
    s, m = r.smoe, r.mhmoe
    cols = [("SMoE", s), (f"MH-MoE h={m.heads}", m)]

    def row(label: str, fn) -> str:  # noqa: ANN001
        return f"  {label:<26}" + "".join(f"{fn(c):>18}" for _, c in cols)

    def ratio(fn) -> str:  # noqa: ANN001
        return f"{fn(m) / fn(s):>10.4f}"

    lines = [
        f"Section 2.3 parity: SMoE (D={s.dim}, F={s.hidden_dim}, E={s.num_experts}, top-{s.top_k}) -> "
        f"MH-MoE with h={m.heads}",
        "",
        f"  {'':<26}" + "".join(f"{name:>18}" for name, _ in cols) + f"{'ratio':>10}",
        row("sub-token width D/h", lambda c: c.head_dim),
        row("expert hidden F", lambda c: c.hidden_dim),
        row("experts E", lambda c: c.num_experts),
        row("top-k K", lambda c: c.top_k),
        row("head / merge layer", lambda c: f"{'y' if c.head_layer else 'n'} / {'y' if c.merge_layer else 'n'}"),
        "  parameters",
    ]
    for part in ("head", "router", "experts", "merge"):
        lines.append(row(f"  {part}", lambda c, p=part: _fmt(getattr(param_count(c), p))))
    lines.append(row("  total", lambda c: _fmt(param_count(c).total)) + ratio(lambda c: param_count(c).total))
    lines.append(row("  active per token", lambda c: _fmt(active_param_count(c))))
    lines.append("  FLOPs per token (2 x MAC)")
    for part in ("head", "router", "experts", "merge"):
        lines.append(row(f"  {part}", lambda c, p=part: _fmt(getattr(flops_per_token(c), p))))
    lines.append(row("  total", lambda c: _fmt(flops_per_token(c).total)) + ratio(lambda c: flops_per_token(c).total))
    lines += [
        "",
        f"  flops_ratio  = {r.flops_ratio:.4f}   (leading terms, router excluded: {r.leading_flops_ratio:.4f})",
        f"  params_ratio = {r.params_ratio:.4f}",
        f"  F' exact (eq. 8) = {r.hidden_exact:.2f} -> {m.hidden_dim} (multiple of {r.hidden_multiple})",
        f"  E' exact (eq. 9) = {r.experts_exact:.2f} -> {m.num_experts} (nearest multiple of {r.expert_multiple}; "
        f"head/merge params {'counted' if r.count_head_merge else 'not counted'} in the budget)",
    ]
    return "\n".join(lines)
