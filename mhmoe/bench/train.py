"""`mhmoe bench train`: whole-model optimizer steps of a preset's variants, each as `mhmoe train` runs it, in
shuffled rounds, sampled until the per-round comparisons' intervals are narrow (stats.py); optionally a profile of a
few steps per variant (profile.py)."""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from mhmoe.bench.device import peak_memory_mb, synchronizer
from mhmoe.bench.mfu import mfu
from mhmoe.bench.profile import profile_steps
from mhmoe.bench.stats import Ratio, sample_rounds, summarise
from mhmoe.complexity import model_flops_per_token
from mhmoe.distributed.parallel import Parallel
from mhmoe.model import Transformer
from mhmoe.profiling import OPTIMIZER, label
from mhmoe.training.config import TrainConfig, micro_batches
from mhmoe.training.compile import compile_model, resolve_compile
from mhmoe.training.optim import apply_schedule, build_optimizer, step_optimizer
from mhmoe.training.presets import preset
from mhmoe.training.routing_health import RoutingMonitor
from mhmoe.training.step import train_step

# `--compile`: "preset" = as `mhmoe train` runs the preset (its TrainConfig.compile), or a TrainConfig.compile mode.
COMPILE_MODES = ("preset", "auto", "off", "on", "cudagraphs")


def bench_config(cfg: TrainConfig, mode: str) -> TrainConfig:
    """The config a benchmarked step runs: the preset's, with TrainConfig.compile replaced unless mode="preset"."""
    return cfg if mode == "preset" else cfg.replace(compile=mode)


class RandomTokens:
    """`TrainSampler.batch(step, micro)` on uniform random tokens drawn on the device (no corpus, no host copy):
    throughput only. Every call draws a new batch, so the routing sees fresh tokens at each step."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, device: torch.device, seed: int) -> None:
        self.shape = (batch_size, seq_len + 1)
        self.vocab_size, self.device = vocab_size, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.vocab_size, self.shape, device=self.device, generator=self.gen)  # [B, T+1]
        return idx[:, :-1], idx[:, 1:]


def training_step(cfg: TrainConfig, model: Transformer, net: nn.Module, device: torch.device,
                  seed: int, compile_mode: str = "off") -> Callable[[], dict]:
    """One optimizer step of `mhmoe train` (mhmoe.training.loop) on random tokens: the schedule's learning rate
    and weight decay, `train_step` (every micro-batch's forward and backward under the run's autocast, gradient
    clipping, the routing monitor, the step's one host transfer), then AdamW's step and zero_grad. Consecutive
    calls are consecutive steps from step 0 (the warm-up's learning rates)."""
    micro, accum = micro_batches(cfg, 1)
    par = Parallel(1, 0, 1, 1, device)
    opt = build_optimizer(model, cfg.optim)
    routing = RoutingMonitor(model, cfg, device)
    sampler = RandomTokens(cfg.model.vocab_size, micro, cfg.seq_len, device, seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    done = [0]

    def step() -> dict:
        s = done[0]
        apply_schedule(opt, s, cfg)
        m = train_step(s, net, model, sampler, accum, par, cfg.optim.grad_clip, autocast, routing, compile_mode)
        with label(OPTIMIZER):
            step_optimizer(opt, compile_mode)
        done[0] += 1
        return m

    return step


def bench_train(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[list[dict], dict, dict]:
    """Optimizer steps of each (variant, dtype) of `args.preset` on random tokens in shuffled rounds; (records, gemm
    rates, sampling). args.dtypes: the dtypes to train in (None: the preset's); bfloat16 runs under autocast, as
    `mhmoe train` runs it. args.compile: COMPILE_MODES. Each record compares with SMoE in the same dtype (time
    and tokens/s) and, for bfloat16, with float32. args.profile: a folder for profile.py's files of the
    args.profile_variants, args.profile_steps steps each, taken after the warm-up."""
    device = torch.device(args.device)
    steps: dict[str, Callable[[], object]] = {}
    info: dict[str, tuple[TrainConfig, Transformer]] = {}
    dtypes = getattr(args, "dtypes", None) or [preset(args.preset, args.variants[0]).dtype]
    mode = getattr(args, "compile", "preset")
    resolved: dict[str, str] = {}  # what TrainConfig.compile means on this device, per model
    for i, variant in enumerate(args.variants):
        for dtype in dtypes:
            cfg = bench_config(preset(args.preset, variant).replace(dtype=dtype), mode)
            torch.manual_seed(args.seed + i)
            model = Transformer(cfg.model).to(device)
            net = compile_model(model, cfg, device)  # as the loop compiles it
            key = _key(variant, dtype)
            resolved[key] = resolve_compile(cfg, device)
            steps[key] = training_step(cfg, model, net, device, args.seed, resolved[key])
            info[key] = (cfg, model)
    compiled = {k: m != "off" for k, m in resolved.items()}
    t0 = time.perf_counter()
    warmup_s = {}
    sync = synchronizer(device)
    for key in info:  # warm-up (and compilation: a second step catches the recompiles of step 2)
        t = time.perf_counter()
        for _ in range(2 if compiled[key] else 1):
            steps[key]()
        if sync is not None:
            sync()
        warmup_s[key] = time.perf_counter() - t
    peak = {}
    if any(compiled.values()) and not args.no_memory:
        log("[train] compiled: no peak-memory pass (MemTracker does not follow compiled graphs)")
    if not args.no_memory and not any(compiled.values()):
        for key, (_, model) in info.items():
            peak[key] = peak_memory_mb(model, steps[key])
    log(f"[train] warm-up: {time.perf_counter() - t0:.1f} s")
    profile_dir = getattr(args, "profile", None)
    if profile_dir:
        keys = [k for k in info if k.split("/")[0] in args.profile_variants]
        profile_steps({k: steps[k] for k in keys}, profile_dir, device, args.profile_steps, log,
                      meta={"preset": args.preset,
                            "compile": {k: resolved[k] for k in keys},
                            "tokens_per_step": {k: info[k][0].tokens_per_step for k in keys}})
    cfg0 = info[_key(args.variants[0], dtypes[0])][0]
    micro0, _ = micro_batches(cfg0, 1)
    d, tokens = cfg0.model.dim, micro0 * cfg0.seq_len
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
    flops = {k: 3 * model_flops_per_token(c.model, seq_len=c.seq_len) * c.tokens_per_step
             for k, (c, _) in info.items()}
    ratios: dict[str, dict[str, Ratio]] = {}
    for variant in args.variants:
        for dtype in dtypes:
            k = _key(variant, dtype)
            ratios[k] = {"frac_of_gemm": Ratio(f"gemm/{dtype}", k, flops[k] / gemm_flops)}
            if "smoe" in args.variants:
                ratios[k]["ratio_to_smoe"] = Ratio(k, _key("smoe", dtype))
                ratios[k]["tok_s_x_smoe"] = Ratio(_key("smoe", dtype), k)  # tokens/s over SMoE's, per round
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
            cfg, _ = info[k]
            ts = times[k]
            med = statistics.median(ts)
            n_tok = cfg.tokens_per_step
            micro, accum = micro_batches(cfg, 1)
            gflops = flops[k] / med / 1e9
            records.append({
                "variant": variant, "dtype": dtype, "mode": "train", "device": device.type,
                "threads": torch.get_num_threads(), "median_ms": med * 1e3, "gflops": gflops,
                "mfu": mfu(gflops, args.peak), "peak_mem_mb": peak.get(k), "ratio_to_smoe": None, "ratio_ci": None,
                **summarise(times, ratios[k], args.target_ci),
                "tok_per_s": n_tok / med, "tokens_per_step": n_tok, "micro_batch": micro, "accum": accum,
                "preset": args.preset, "compiled": compiled[k], "compile": resolved[k],
                "warmup_s": warmup_s[k], "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts),
            })
    return records, gemm_rates, {"train": got.as_meta()}


def _key(variant: str, dtype: str) -> str:
    return f"{variant}/{dtype}"
