"""Layer benchmark (issue 2): the paper's five FFN variants at d=768 on CPU, forward and forward+backward.

    python benchmarks/layers.py [--tokens 4096] [--dim 768] [--threads 1] [--rounds N]
                                [--dtypes float32,bfloat16] [--json]

Variants (FLOPs-matched, section 3 of arXiv 2411.16205):
    smoe          8 x 2048, top-1
    fine-grained  16 x 1024, top-2                        mhmoe.complexity.fine_grained(smoe, 2)
    mhmoe-h2      40 x 768, top-2, head + merge layers    solve_parity(768, 2048, 8, 1, heads=2).mhmoe
    mhmoe-h3      96 x 512, top-3, head + merge layers    solve_parity(768, 2048, 8, 1, heads=3).mhmoe
    dense         SwiGLU 768 -> 2048
Implementations of each MoE variant:
    sorted        the layer as built (dispatch="sorted": sort by expert, one matmul per contiguous group)
    grouped_mm    the same parameters in a layer with dispatch="grouped_mm"
    naive         `naive_forward` below: loop over experts, select tokens with a mask + nonzero, index the
                  stacked weight W[e] inside the loop (the common "HF-style" implementation)

Method: every implementation lives in one process at `--threads` threads (default 1). Each is checked against
the sorted layer once (outputs and gradients, allclose) and warmed up; then `--rounds` rounds run every
implementation once per mode in a fresh random order, and the tables report medians. "fwd" is a forward pass
under torch.no_grad(); "fwd+bwd" is a forward pass with autograd, then y.backward(g) for a fixed contiguous
random g (grouped_mm's backward rejects the stride-0 gradient of y.sum()), with x.requires_grad (so dX is
included) and parameter gradients set to None between iterations. The aux losses are computed but not
back-propagated. GFLOP/s use the analytic matmul FLOPs `flops_per_token(cfg).total * tokens` (x3 for
fwd+bwd). "x smoe" is the median over rounds of time / time(smoe, same impl) (dense: / smoe sorted);
"x sorted" is the median over rounds of time / time(same variant, sorted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mhmoe.complexity import fine_grained, flops_per_token, solve_parity
from mhmoe.ffn import FFNConfig, MoEAux, build_ffn
from mhmoe.moe import MoELayer
from mhmoe.router import load_balancing_loss, router_entropy, z_loss

MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")


def variants(dim: int) -> dict[str, FFNConfig]:
    """The paper's five layers; the MH-MoE sizes come from the parity recipe (40 x 768 and 96 x 512 at d=768)."""
    smoe = FFNConfig(kind="moe", dim=dim, hidden_dim=2048, num_experts=8, top_k=1)
    return {
        "smoe": smoe,
        "fine-grained": fine_grained(smoe, 2),
        "mhmoe-h2": solve_parity(dim, 2048, 8, 1, heads=2).mhmoe,
        "mhmoe-h3": solve_parity(dim, 2048, 8, 1, heads=3).mhmoe,
        "dense": FFNConfig(kind="dense", dim=dim, hidden_dim=2048),
    }


def naive_forward(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    """The same function as `layer(x)`, computed with the common per-expert loop.

    For each expert: a boolean mask over the [N, K] routing choices, `nonzero` to get its (sub-)tokens,
    a gather, the SwiGLU with the stacked weights indexed as W[e] inside the loop, and an index_add_ of the
    weighted result. Indexing W[e] makes autograd build a full-size [E, ...] zero gradient per expert.
    """
    cfg, ex = layer.cfg, layer.experts
    shape = x.shape
    tokens = x.reshape(-1, cfg.dim)  # [BT, D]
    h = layer.head(tokens) if layer.head is not None else tokens
    sub = h.reshape(-1, cfg.head_dim)  # [N, D/H], sub-tokens of a token adjacent (as the layer splits)
    routing = layer.router(sub)
    out = torch.zeros_like(sub)
    for e in range(cfg.num_experts):
        tok, slot = (routing.indices == e).nonzero(as_tuple=True)  # assignments to expert e
        if tok.numel() == 0:
            continue
        xe = sub[tok]
        ye = (F.silu(xe @ ex.w1[e]) * (xe @ ex.w3[e])) @ ex.w2[e]
        out.index_add_(0, tok, ye * routing.weights[tok, slot].unsqueeze(-1).to(ye.dtype))
    y = out.reshape(-1, cfg.dim)
    if layer.merge is not None:
        y = layer.merge(y)
    if layer.shared is not None:
        y = y + layer.shared(tokens)
    lb = load_balancing_loss(routing.probs, routing.indices, cfg.num_experts)
    z = z_loss(routing.logits)
    counts = torch.bincount(routing.indices.reshape(-1), minlength=cfg.num_experts)
    aux = MoEAux(
        loss=cfg.lb_coef * lb + cfg.z_coef * z, lb_loss=lb, z_loss=z,
        router_entropy=router_entropy(routing.logits).detach(), tokens_per_expert=counts,
        dropped_fraction=torch.zeros((), device=x.device),
    )
    return y.reshape(shape), aux


@dataclass
class Impl:
    variant: str
    impl: str  # sorted | grouped_mm | naive | dense
    cfg: FFNConfig
    module: torch.nn.Module
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, MoEAux]]

    @property
    def key(self) -> tuple[str, str]:
        return self.variant, self.impl


def build_impls(dim: int, dtype: torch.dtype, seed: int = 0) -> list[Impl]:
    impls = []
    for i, (name, cfg) in enumerate(variants(dim).items()):
        torch.manual_seed(seed + i)
        layer = build_ffn(cfg).to(dtype)
        if cfg.kind == "dense":
            impls.append(Impl(name, "dense", cfg, layer, layer))
            continue
        gcfg = cfg.replace(dispatch="grouped_mm")
        glayer = build_ffn(gcfg).to(dtype)
        glayer.load_state_dict(layer.state_dict())
        impls.append(Impl(name, "sorted", cfg, layer, layer))
        impls.append(Impl(name, "grouped_mm", gcfg, glayer, glayer))
        impls.append(Impl(name, "naive", cfg, layer, lambda x, layer=layer: naive_forward(layer, x)))
    return impls


def run_fwd(impl: Impl, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y, _ = impl.fn(x)
    return y


def run_fwd_bwd(impl: Impl, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    impl.module.zero_grad(set_to_none=True)
    x.grad = None
    y, _ = impl.fn(x)
    y.backward(g)
    return y


def grads(impl: Impl, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in impl.module.named_parameters() if p.grad is not None}
    out["x"] = x.grad.detach().clone()
    return out


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """allclose scaled by the reference's magnitude (bf16 sums in a different order per implementation)."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = ref.float().abs().max().clamp_min(1e-12)
    err = (got.float() - ref.float()).abs().max()
    if not err <= tol * scale:
        raise AssertionError(f"{name}: max abs diff {err.item():.3e} > {tol} * max|ref| ({scale.item():.3e})")


def check_impls(impls: list[Impl], x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> None:
    """grouped_mm and naive against sorted, same parameters: outputs and all gradients. Also warms up."""
    ref: dict[str, tuple[torch.Tensor, dict]] = {}
    for impl in impls:
        if impl.impl in ("grouped_mm", "naive"):
            continue
        xg = x.detach().clone().requires_grad_(True)
        y = run_fwd_bwd(impl, xg, g).detach()
        run_fwd(impl, x)
        ref[impl.variant] = (y, grads(impl, xg))
        impl.module.zero_grad(set_to_none=True)
    for impl in impls:
        if impl.impl not in ("grouped_mm", "naive"):
            continue
        xg = x.detach().clone().requires_grad_(True)
        y = run_fwd_bwd(impl, xg, g).detach()
        gr = grads(impl, xg)
        impl.module.zero_grad(set_to_none=True)
        y_ref, g_ref = ref[impl.variant]
        check_close(f"{impl.variant}/{impl.impl} output", y, y_ref, dtype)
        fy = run_fwd(impl, x)
        check_close(f"{impl.variant}/{impl.impl} no_grad output", fy, y_ref, dtype)
        assert set(gr) == set(g_ref), f"{impl.variant}/{impl.impl}: gradients for {sorted(gr)} vs {sorted(g_ref)}"
        for n in g_ref:
            check_close(f"{impl.variant}/{impl.impl} grad {n}", gr[n], g_ref[n], dtype)


def hardware() -> dict[str, str]:
    model, cores = platform.processor() or "?", str(os.cpu_count())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("Model name", model)
        cores = f"{fields.get('CPU(s)', cores)} CPUs ({fields.get('Core(s) per socket', '?')} cores/socket x "
        cores += f"{fields.get('Socket(s)', '?')} sockets, {fields.get('Thread(s) per core', '?')} threads/core)"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": cores}


def command_line() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return f"{env} {cmd}" if env else cmd


def bench_dtype(args: argparse.Namespace, dtype: torch.dtype, log: Callable[[str], None]) -> list[dict]:
    dname = str(dtype).removeprefix("torch.")
    impls = build_impls(args.dim, dtype, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 100)
    x = torch.randn(1, args.tokens, args.dim, generator=gen).to(dtype)
    g = torch.randn(1, args.tokens, args.dim, generator=gen).to(dtype).contiguous()
    t0 = time.perf_counter()
    check_impls(impls, x, g, dtype)
    log(f"[{dname}] correctness checks + warm-up: {time.perf_counter() - t0:.1f} s")
    for _ in range(args.warmup):
        for impl in impls:
            run_fwd(impl, x)
            run_fwd_bwd(impl, x.detach().clone().requires_grad_(True), g)
    modes = ("fwd", "fwd+bwd")
    times: dict[tuple[str, str, str], list[float]] = {(m, *impl.key): [] for m in modes for impl in impls}
    rng = random.Random(args.seed)
    for r in range(args.rounds):
        t_round = time.perf_counter()
        jobs = [(m, impl) for m in modes for impl in impls]
        rng.shuffle(jobs)
        for mode, impl in jobs:
            xi = x if mode == "fwd" else x.detach().clone().requires_grad_(True)
            t = time.perf_counter()
            if mode == "fwd":
                run_fwd(impl, xi)
            else:
                run_fwd_bwd(impl, xi, g)
            times[(mode, *impl.key)].append(time.perf_counter() - t)
        for impl in impls:
            impl.module.zero_grad(set_to_none=True)
        log(f"[{dname}] round {r + 1}/{args.rounds}: {time.perf_counter() - t_round:.1f} s")

    records = []
    for mode in modes:
        for impl in impls:
            ts = times[(mode, *impl.key)]
            base_impl = impl.impl if impl.impl in ("sorted", "grouped_mm", "naive") else "sorted"
            smoe = times[(mode, "smoe", base_impl)]
            sorted_t = times.get((mode, impl.variant, "sorted"))
            med = statistics.median(ts)
            flops = flops_per_token(impl.cfg).total * args.tokens * (3 if mode == "fwd+bwd" else 1)
            records.append({
                "variant": impl.variant, "impl": impl.impl, "dtype": dname, "mode": mode,
                "threads": args.threads, "median_ms": med * 1e3, "gflops": flops / med / 1e9,
                "ratio_to_smoe": statistics.median(a / b for a, b in zip(ts, smoe)),
                "ratio_to_sorted": statistics.median(a / b for a, b in zip(ts, sorted_t)) if sorted_t else None,
                "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts),
            })
    return records


def format_table(records: list[dict], dtype: str, mode: str) -> str:
    rows = [r for r in records if r["dtype"] == dtype and r["mode"] == mode]
    lines = [
        f"### {dtype}, {mode}",
        "",
        "| variant | impl | median ms | min-max ms | GFLOP/s | x smoe | x sorted |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = f"{r['ratio_to_sorted']:.2f}" if r["ratio_to_sorted"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['impl']} | {r['median_ms']:.1f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} | "
            f"{r['gflops']:.1f} | {r['ratio_to_smoe']:.2f} | {vs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (one iteration per impl and mode each)")
    p.add_argument("--warmup", type=int, default=0, help="extra warm-up iterations (the correctness check already runs each once)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]

    meta = {
        **hardware(), "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command_line(),
        "tokens": args.tokens, "dim": args.dim, "rounds": args.rounds,
        "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    if not args.json:
        for k in ("date", "command", "cpu", "cores", "torch", "python", "threads", "tokens", "dim", "rounds",
                  "loadavg_start"):
            print(f"# {k}: {meta[k]}")
        cfgs = variants(args.dim)
        for name, c in cfgs.items():
            desc = "dense" if c.kind == "dense" else f"{c.num_experts} x {c.hidden_dim} top-{c.top_k} h={c.heads}"
            print(f"# {name}: {desc}, {flops_per_token(c).total / 1e6:.2f} MFLOP/token fwd")
        print(flush=True)

    t0 = time.perf_counter()
    records = []
    for dtype in dtypes:
        records += bench_dtype(args, dtype, log)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())

    if args.json:
        print(json.dumps({"meta": meta, "records": records}, indent=1))
        return
    print()
    for dtype in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            print(format_table(records, str(dtype).removeprefix("torch."), mode))
            print()
    print(f"# wall: {meta['wall_s']} s, loadavg at end: {meta['loadavg_end']} (other processes slow the timings)")


if __name__ == "__main__":
    main()
