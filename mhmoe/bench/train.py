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
    """One AdamW step per (variant, dtype) of `args.preset` on random tokens, shuffled rounds; (records, gemm rates,
    sampling). args.dtypes: the dtypes to train in (None: the preset's); bfloat16 runs under autocast, as `mhmoe
    train` runs it. Each record compares with SMoE in the same dtype and, for bfloat16, with float32."""
    from mhmoe.model import Transformer
    from mhmoe.training.optim import build_optimizer
    from mhmoe.training.presets import preset

    device = torch.device(args.device)
    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, tuple] = {}
    dtypes = getattr(args, "dtypes", None) or [preset(args.preset, args.variants[0]).dtype]
    for i, variant in enumerate(args.variants):
        for dtype in dtypes:
            cfg = preset(args.preset, variant).replace(dtype=dtype)
            torch.manual_seed(args.seed + i)
            model = Transformer(cfg.model).to(device)
            opt = build_optimizer(model, cfg.optim)
            net = torch.compile(model) if args.compile else model
            gen = torch.Generator().manual_seed(args.seed)
            idx = torch.randint(cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=gen).to(device)
            inp, tgt = idx[:, :-1], idx[:, 1:]  # [B, T]
            bf16 = dtype == "bfloat16"

            def fwd_bwd(net=net, model=model, inp=inp, tgt=tgt, bf16=bf16) -> None:
                model.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                    loss = net(inp, tgt).loss
                loss.backward()

            def step(opt=opt, fwd_bwd=fwd_bwd) -> None:
                fwd_bwd()
                opt.step()

            key = _key(variant, dtype)
            steps[key] = step
            info[key] = (cfg, model, fwd_bwd)
    t0 = time.perf_counter()
    warmup_s = {}
    sync = synchronizer(device)
    for key in info:  # warm-up (and compilation: a second step catches the recompiles of step 2)
        t = time.perf_counter()
        for _ in range(2 if args.compile else 1):
            steps[key]()
        if sync is not None:
            sync()
        warmup_s[key] = time.perf_counter() - t
    peak = {}
    if args.compile and not args.no_memory:
        log("[train] --compile: no peak-memory pass (MemTracker does not follow compiled graphs)")
    if not args.no_memory and not args.compile:
        for key, (_, model, fwd_bwd) in info.items():
            peak[key] = peak_memory_mb(model, fwd_bwd)
    log(f"[train] warm-up: {time.perf_counter() - t0:.1f} s")
    cfg0 = info[_key(args.variants[0], dtypes[0])][0]
    d, tokens = cfg0.model.dim, cfg0.batch_size * cfg0.seq_len
    gflops_of: dict[str, float] = {}
    gemm_flops = 6 * tokens * d * 4 * d
    for dtype in dtypes:  # the same-run GEMM of each dtype (autocast's matmuls run in bfloat16)
        gdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        a = torch.randn(tokens, d).to(device, gdtype).requires_grad_(True)
        w = torch.randn(d, 4 * d).to(device, gdtype).requires_grad_(True)
        gb = torch.randn(tokens, 4 * d).to(device, gdtype)

        def gemm(a=a, w=w, gb=gb) -> None:
            a.grad = w.grad = None
            (a @ w).backward(gb)

        steps[f"gemm/{dtype}"] = gemm
    flops = {k: 3 * model_flops_per_token(c.model, seq_len=c.seq_len) * c.batch_size * c.seq_len
             for k, (c, _, _) in info.items()}
    ratios: dict[str, dict[str, Ratio]] = {}
    for variant in args.variants:
        for dtype in dtypes:
            k = _key(variant, dtype)
            ratios[k] = {"frac_of_gemm": Ratio(f"gemm/{dtype}", k, flops[k] / gemm_flops)}
            if "smoe" in args.variants:
                ratios[k]["ratio_to_smoe"] = Ratio(k, _key("smoe", dtype))
            if dtype == "bfloat16" and "float32" in dtypes:
                ratios[k]["ratio_to_float32"] = Ratio(k, _key(variant, "float32"))
    watched = [r for rs in ratios.values() for r in rs.values() if r.num != r.den]
    got = sample_rounds(steps, watched, min_rounds=args.rounds, target=args.target_ci, max_seconds=args.max_seconds,
                        seed=args.seed, log=log, label="train", sync=sync)
    times = got.times
    gemm_rates = {f"{dt}/train": gemm_flops / statistics.median(times[f"gemm/{dt}"]) / 1e9 for dt in dtypes}
    records = []
    for variant in args.variants:
        for dtype in dtypes:
            k = _key(variant, dtype)
            cfg, _, _ = info[k]
            ts = times[k]
            med = statistics.median(ts)
            n_tok = cfg.batch_size * cfg.seq_len
            gflops = flops[k] / med / 1e9
            records.append({
                "variant": variant, "dtype": dtype, "mode": "train", "device": device.type,
                "threads": torch.get_num_threads(), "median_ms": med * 1e3, "gflops": gflops,
                "mfu": mfu(gflops, args.peak), "peak_mem_mb": peak.get(k), "ratio_to_smoe": None, "ratio_ci": None,
                **summarise(times, ratios[k], args.target_ci),
                "tok_per_s": n_tok / med, "tokens_per_step": n_tok, "preset": args.preset,
                "compiled": bool(args.compile), "warmup_s": warmup_s[k],
                "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts),
            })
    return records, gemm_rates, {"train": got.as_meta()}


def _key(variant: str, dtype: str) -> str:
    return f"{variant}/{dtype}"
