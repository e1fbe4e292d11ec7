"""`mhmoe bench train`: whole-model optimizer steps of a preset's variants in shuffled rounds."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from mhmoe.bench.impl import peak_memory_mb
from mhmoe.bench.stats import _median_ratio, paired_frac_of_gemm, timed_rounds
from mhmoe.complexity import model_flops_per_token


def bench_train(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """One AdamW step per variant of `args.preset` on random tokens, shuffled rounds; (records, gemm rates)."""
    from mhmoe.model import Transformer
    from mhmoe.presets import preset
    from mhmoe.train import build_optimizer

    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, tuple] = {}
    for i, variant in enumerate(args.variants):
        cfg = preset(args.preset, variant)
        torch.manual_seed(args.seed + i)
        model = Transformer(cfg.model)
        opt = build_optimizer(model, cfg.optim)
        net = torch.compile(model) if args.compile else model
        gen = torch.Generator().manual_seed(args.seed)
        idx = torch.randint(cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=gen)
        inp, tgt = idx[:, :-1], idx[:, 1:]  # [B, T]

        def step(net=net, opt=opt, inp=inp, tgt=tgt) -> None:
            opt.zero_grad(set_to_none=True)
            net(inp, tgt).loss.backward()
            opt.step()

        def fwd_bwd(net=net, model=model, inp=inp, tgt=tgt) -> None:
            model.zero_grad(set_to_none=True)
            net(inp, tgt).loss.backward()

        steps[variant] = step
        info[variant] = (cfg, model, fwd_bwd)
    t0 = time.perf_counter()
    warmup_s = {}
    for variant in args.variants:  # warm-up (and compilation: a second step catches the recompiles of step 2)
        t = time.perf_counter()
        for _ in range(2 if args.compile else 1):
            steps[variant]()
        warmup_s[variant] = time.perf_counter() - t
    peak = {}
    if args.compile and not args.no_memory:
        log("[train] --compile: no peak-memory pass (MemTracker does not follow compiled graphs)")
    if not args.no_memory and not args.compile:
        for variant, (_, model, fwd_bwd) in info.items():
            peak[variant] = peak_memory_mb(model, fwd_bwd)
    log(f"[train] warm-up: {time.perf_counter() - t0:.1f} s")
    d = info[args.variants[0]][0].model.dim
    tokens = info[args.variants[0]][0].batch_size * info[args.variants[0]][0].seq_len
    a = torch.randn(tokens, d, requires_grad=True)
    w = torch.randn(d, 4 * d, requires_grad=True)
    gb = torch.randn(tokens, 4 * d)

    def gemm() -> None:
        a.grad = w.grad = None
        (a @ w).backward(gb)

    steps["gemm"] = gemm
    times = timed_rounds(steps, args.rounds, args.seed, log, "train")
    gemm_flops = 6 * tokens * d * 4 * d
    gemm_rate = gemm_flops / statistics.median(times["gemm"]) / 1e9
    base = times.get("smoe")
    records = []
    for variant in args.variants:
        cfg, _, _ = info[variant]
        ts = times[variant]
        med = statistics.median(ts)
        n_tok = cfg.batch_size * cfg.seq_len
        gflops = 3 * model_flops_per_token(cfg.model, seq_len=cfg.seq_len) * n_tok / med / 1e9
        records.append({
            "variant": variant, "dtype": cfg.dtype, "mode": "train", "threads": torch.get_num_threads(),
            "median_ms": med * 1e3, "gflops": gflops,
            "frac_of_gemm": paired_frac_of_gemm(gflops * med, ts, gemm_flops / 1e9, times["gemm"]),
            "peak_mem_mb": peak.get(variant), "ratio_to_smoe": _median_ratio(ts, base) if base else None,
            "tok_per_s": n_tok / med, "tokens_per_step": n_tok, "preset": args.preset,
            "compiled": bool(args.compile), "warmup_s": warmup_s[variant],
            "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts),
        })
    return records, {"float32/train": gemm_rate}
