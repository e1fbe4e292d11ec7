"""`mhmoe bench train`: whole-model optimizer steps of a preset's variants, each as `mhmoe train` runs it, in
shuffled rounds, sampled until the per-round comparisons' intervals are narrow (stats.py); optionally a profile of a
few steps per variant (profile.py).

The work is ordered so that a run cut off (a time limit, a killed process) keeps the most: each model is built,
warmed up (compiled, when compiling) and timed alone for ALONE_STEPS steps before the next one is built, and its
record reaches `progress` at once (`timing: "alone"`: tokens/s and MFU, no comparison); then the shuffled rounds of
all of them, whose records (`timing: "rounds"`, the paired comparisons) reach `progress` at each look at the
intervals; the profile comes last."""

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
# `--compile-backend`: torch.compile backends a benchmark may name (inductor is what `mhmoe train` compiles with).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# Steps of each model timed alone after its warm-up (the median of 3 is robust to one slow step).
ALONE_STEPS = 3
Progress = Callable[[list[dict], dict], None]  # (the records so far, what stage they come from)


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


def bench_train(args: argparse.Namespace, log: Callable[[str], None],
                progress: Progress | None = None) -> tuple[list[dict], dict, dict]:
    """Optimizer steps of each (variant, dtype) of `args.preset` on random tokens, each model timed alone after its
    warm-up, then all in shuffled rounds (module docstring); (records, gemm rates, sampling). args.dtypes: the
    dtypes to train in (None: the preset's); bfloat16 runs under autocast, as `mhmoe train` runs it.
    args.compile: COMPILE_MODES. Each record compares with SMoE in the same dtype (time and tokens/s) and, for
    bfloat16, with float32. args.profile: a folder for profile.py's files of the args.profile_variants,
    args.profile_steps steps each, taken after the timing. progress(records, stage): the records so far, after
    each model's steps alone and at each look of the rounds."""
    device = torch.device(args.device)
    steps: dict[str, Callable[[], object]] = {}
    info: dict[str, tuple[TrainConfig, Transformer]] = {}
    dtypes = getattr(args, "dtypes", None) or [preset(args.preset, args.variants[0]).dtype]
    mode = getattr(args, "compile", "preset")
    report = progress or (lambda records, stage: None)
    resolved: dict[str, str] = {}  # what TrainConfig.compile means on this device, per model
    warmup_s: dict[str, float] = {}
    alone: list[dict] = []
    sync = synchronizer(device)
    keys = [_key(v, dt) for v in args.variants for dt in dtypes]
    t0 = time.perf_counter()
    for i, variant in enumerate(args.variants):
        for dtype in dtypes:
            cfg = bench_config(preset(args.preset, variant).replace(dtype=dtype), mode)
            torch.manual_seed(args.seed + i)
            model = Transformer(cfg.model).to(device)
            net = compile_model(model, cfg, device, backend=getattr(args, "compile_backend", "inductor"))
            key = _key(variant, dtype)
            resolved[key] = resolve_compile(cfg, device)
            steps[key] = training_step(cfg, model, net, device, args.seed, resolved[key])
            info[key] = (cfg, model)
            # Warm-up (and compilation: a second step catches the recompiles of step 2), then ALONE_STEPS alone.
            t = time.perf_counter()
            for _ in range(2 if resolved[key] != "off" else 1):
                steps[key]()
            if sync is not None:
                sync()
            warmup_s[key] = time.perf_counter() - t
            ts = [_timed(steps[key], sync) for _ in range(ALONE_STEPS)]
            alone.append(_alone_record(key, cfg, ts, resolved[key], warmup_s[key], args.peak))
            log(f"[train] {key}: warm-up {warmup_s[key]:.1f} s, then {statistics.median(ts) * 1e3:.1f} ms/step "
                f"alone ({len(alone)}/{len(keys)})")
            report(alone, {"stage": f"alone {len(alone)}/{len(keys)}"})
    compiled = {k: m != "off" for k, m in resolved.items()}
    peak = {}
    if any(compiled.values()) and not args.no_memory:
        log("[train] compiled: no peak-memory pass (MemTracker does not follow compiled graphs)")
    if not args.no_memory and not any(compiled.values()):
        for key, (_, model) in info.items():
            peak[key] = peak_memory_mb(model, steps[key])
    log(f"[train] warm-up and steps alone: {time.perf_counter() - t0:.1f} s")
    cfg0 = info[keys[0]][0]
    micro0, _ = micro_batches(cfg0, 1)
    d, tokens = cfg0.model.dim, micro0 * cfg0.seq_len
    gemm_flops = 6 * tokens * d * 4 * d
    calls = dict(steps)
    for dtype in dtypes:  # the same-run GEMM of each dtype (autocast's matmuls run in bfloat16)
        gdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        a = torch.randn(tokens, d).to(device, gdtype).requires_grad_(True)
        w = torch.randn(d, 4 * d).to(device, gdtype).requires_grad_(True)
        gb = torch.randn(tokens, 4 * d).to(device, gdtype)

        def gemm(a=a, w=w, gb=gb) -> None:
            a.grad = w.grad = None
            (a @ w).backward(gb)

        calls[f"gemm/{dtype}"] = gemm
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
    alone_ms = {_key(r["variant"], r["dtype"]): r["median_ms"] for r in alone}

    def records_of(times: dict) -> list[dict]:
        out = []
        for k in keys:
            cfg, _ = info[k]
            ts = times[k]
            med = statistics.median(ts)
            micro, accum = micro_batches(cfg, 1)
            gflops = flops[k] / med / 1e9
            out.append({
                "variant": k.split("/")[0], "dtype": k.split("/")[1], "mode": "train", "device": device.type,
                "threads": torch.get_num_threads(), "median_ms": med * 1e3, "gflops": gflops,
                "mfu": mfu(gflops, args.peak), "peak_mem_mb": peak.get(k), "ratio_to_smoe": None, "ratio_ci": None,
                **summarise(times, ratios[k], args.target_ci),
                "tok_per_s": cfg.tokens_per_step / med, "tokens_per_step": cfg.tokens_per_step, "micro_batch": micro,
                "accum": accum, "preset": args.preset, "compiled": compiled[k], "compile": resolved[k],
                "warmup_s": warmup_s[k], "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts),
                "timing": "rounds", "alone_ms": alone_ms[k],
            })
        return out

    got = sample_rounds(calls, watched, min_rounds=args.rounds, target=args.target_ci, max_seconds=args.max_seconds,
                        seed=args.seed, log=log, label="train", sync=sync,
                        on_look=lambda s: report(records_of(s.times), {"stage": f"rounds {s.rounds}",
                                                                       "sampling": {"train": s.as_meta()}}))
    records = records_of(got.times)
    gemm_rates = {f"{dt}/train": gemm_flops / statistics.median(got.times[f"gemm/{dt}"]) / 1e9 for dt in dtypes}
    sampling = {"train": got.as_meta()}
    report(records, {"stage": "rounds done", "sampling": sampling, "gemm_gflops": gemm_rates})
    profile_dir = getattr(args, "profile", None)
    if profile_dir:
        pkeys = [k for k in keys if k.split("/")[0] in args.profile_variants]
        profile_steps({k: steps[k] for k in pkeys}, profile_dir, device, args.profile_steps, log,
                      meta={"preset": args.preset,
                            "compile": {k: resolved[k] for k in pkeys},
                            "tokens_per_step": {k: info[k][0].tokens_per_step for k in pkeys}})
    return records, gemm_rates, sampling


def _timed(step: Callable[[], object], sync: Callable[[], None] | None) -> float:
    t = time.perf_counter()
    step()
    if sync is not None:
        sync()
    return time.perf_counter() - t


def _alone_record(key: str, cfg: TrainConfig, ts: list[float], compile_mode: str, warmup_s: float,
                  peak: float | None) -> dict:
    """A model's steps timed alone, right after its warm-up: its speed, no comparison (module docstring)."""
    med = statistics.median(ts)
    micro, accum = micro_batches(cfg, 1)
    gflops = 3 * model_flops_per_token(cfg.model, seq_len=cfg.seq_len) * cfg.tokens_per_step / med / 1e9
    variant, dtype = key.split("/")
    return {"variant": variant, "dtype": dtype, "mode": "train", "timing": "alone", "median_ms": med * 1e3,
            "gflops": gflops, "mfu": mfu(gflops, peak), "tok_per_s": cfg.tokens_per_step / med,
            "tokens_per_step": cfg.tokens_per_step, "micro_batch": micro, "accum": accum, "preset": cfg.preset,
            "compiled": compile_mode != "off", "compile": compile_mode, "warmup_s": warmup_s,
            "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts), "ratio_to_smoe": None,
            "ratio_ci": None, "peak_mem_mb": None}


def _key(variant: str, dtype: str) -> str:
    return f"{variant}/{dtype}"
