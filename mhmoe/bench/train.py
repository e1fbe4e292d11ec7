"""`mhmoe bench train`: whole-model optimizer steps of a preset's variants in shuffled rounds, sampled until the
per-round comparisons' intervals are narrow (stats.py)."""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch

from mhmoe.bench.device import peak_memory_mb, synchronizer
from mhmoe.bench.mfu import mfu
from mhmoe.bench.stats import Ratio, sample_rounds, summarise
from mhmoe.complexity import model_flops_per_token


def bench_train(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[list[dict], dict, dict]:
    """One AdamW step per variant of `args.preset` on random tokens, shuffled rounds; (records, gemm rates,
    sampling). bf16 presets run under autocast, as `mhmoe train` runs them."""
    from mhmoe.model import Transformer
    from mhmoe.training.optim import build_optimizer
    from mhmoe.training.presets import preset

    device = torch.device(args.device)
    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, tuple] = {}
    for i, variant in enumerate(args.variants):
        cfg = preset(args.preset, variant)
        torch.manual_seed(args.seed + i)
        model = Transformer(cfg.model).to(device)
        opt = build_optimizer(model, cfg.optim)
        net = torch.compile(model) if args.compile else model
        gen = torch.Generator().manual_seed(args.seed)
        idx = torch.randint(cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=gen).to(device)
        inp, tgt = idx[:, :-1], idx[:, 1:]  # [B, T]
        bf16 = cfg.dtype == "bfloat16"

        def fwd_bwd(net=net, model=model, inp=inp, tgt=tgt, bf16=bf16) -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                loss = net(inp, tgt).loss
            loss.backward()

        def step(opt=opt, fwd_bwd=fwd_bwd) -> None:
            fwd_bwd()
            opt.step()

        steps[variant] = step
        info[variant] = (cfg, model, fwd_bwd)
    t0 = time.perf_counter()
    warmup_s = {}
    sync = synchronizer(device)
    for variant in args.variants:  # warm-up (and compilation: a second step catches the recompiles of step 2)
        t = time.perf_counter()
        for _ in range(2 if args.compile else 1):
            steps[variant]()
        if sync is not None:
            sync()
        warmup_s[variant] = time.perf_counter() - t
    peak = {}
    if args.compile and not args.no_memory:
        log("[train] --compile: no peak-memory pass (MemTracker does not follow compiled graphs)")
    if not args.no_memory and not args.compile:
        for variant, (_, model, fwd_bwd) in info.items():
            peak[variant] = peak_memory_mb(model, fwd_bwd)
    log(f"[train] warm-up: {time.perf_counter() - t0:.1f} s")
    cfg0 = info[args.variants[0]][0]
    d, tokens = cfg0.model.dim, cfg0.batch_size * cfg0.seq_len
    gdtype = torch.bfloat16 if cfg0.dtype == "bfloat16" else torch.float32  # the dtype autocast's matmuls run in
    a = torch.randn(tokens, d).to(device, gdtype).requires_grad_(True)
    w = torch.randn(d, 4 * d).to(device, gdtype).requires_grad_(True)
    gb = torch.randn(tokens, 4 * d).to(device, gdtype)

    def gemm() -> None:
        a.grad = w.grad = None
        (a @ w).backward(gb)

    steps["gemm"] = gemm
    gemm_flops = 6 * tokens * d * 4 * d
    flops = {v: 3 * model_flops_per_token(c.model, seq_len=c.seq_len) * c.batch_size * c.seq_len
             for v, (c, _, _) in info.items()}
    ratios = {v: {"frac_of_gemm": Ratio("gemm", v, flops[v] / gemm_flops)} for v in args.variants}
    if "smoe" in steps:
        for v in args.variants:
            ratios[v]["ratio_to_smoe"] = Ratio(v, "smoe")
    watched = [r for rs in ratios.values() for r in rs.values() if r.num != r.den]
    got = sample_rounds(steps, watched, min_rounds=args.rounds, target=args.target_ci, max_seconds=args.max_seconds,
                        seed=args.seed, log=log, label="train", sync=sync)
    times = got.times
    gemm_rate = gemm_flops / statistics.median(times["gemm"]) / 1e9
    records = []
    for variant in args.variants:
        cfg, _, _ = info[variant]
        ts = times[variant]
        med = statistics.median(ts)
        n_tok = cfg.batch_size * cfg.seq_len
        gflops = flops[variant] / med / 1e9
        records.append({
            "variant": variant, "dtype": cfg.dtype, "mode": "train", "device": device.type,
            "threads": torch.get_num_threads(), "median_ms": med * 1e3, "gflops": gflops,
            "mfu": mfu(gflops, args.peak), "peak_mem_mb": peak.get(variant), "ratio_to_smoe": None, "ratio_ci": None,
            **summarise(times, ratios[variant], args.target_ci),
            "tok_per_s": n_tok / med, "tokens_per_step": n_tok, "preset": args.preset,
            "compiled": bool(args.compile), "warmup_s": warmup_s[variant],
            "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts),
        })
    return records, {f"{cfg0.dtype}/train": gemm_rate}, {"train": got.as_meta()}
