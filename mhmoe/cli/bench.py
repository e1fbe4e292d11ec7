"""The `mhmoe bench` subcommand: flags, their checks, and printing; the measuring lives in layers.py and train.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import torch

from mhmoe.bench.device import DEVICES, bench_device
from mhmoe.bench.hardware import _meta
from mhmoe.bench.layers import MODES, bench_layers
from mhmoe.bench.mfu import peak_tflops
from mhmoe.bench.report import format_sampling, format_table, format_train_lines
from mhmoe.bench.stats import LEVEL
from mhmoe.bench.train import COMPILE_BACKENDS, COMPILE_MODES, bench_train
from mhmoe.bench.variants import PAPER_LAYERS, layer_variants
from mhmoe.errors import UserError
from mhmoe.fileio import atomic_write_text
from mhmoe.training.device import cpu_has_fast_bf16
from mhmoe.training.presets import PRESETS, preset_names

IMPLS = ("auto", "sorted", "grouped_mm", "scatter", "naive", "intra-op")
MAX_SECONDS = 300.0  # of timed rounds per sampling loop: a 1-thread d=768 layer run gets about 15 rounds


def default_impls(device: str) -> list[str]:
    """--impls by default: sorted (every ratio's base) on CPU; on CUDA also auto's pick there and grouped_mm."""
    return ["sorted"] if device != "cuda" else ["auto", "sorted", "grouped_mm"]


def _split(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise UserError(f"{flag}: expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
    return items


def _number(text: str | None, flag: str, ok: Callable[[float], bool], wanted: str) -> float | None:
    """A float flag read by hand, so that a bad value is our one-line error rather than argparse's usage block."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):  # NaN fails every comparison, so a non-number lands here too
        raise UserError(f"{flag}: expected {wanted}, got {text!r}")
    return value


def _sampling_flags(args: argparse.Namespace) -> None:
    args.target_ci = _number(args.target_ci, "--target-ci", lambda v: 0 < v <= 1,
                             "a fraction in (0, 1], e.g. 0.03 for +-3%")
    args.max_seconds = _number(args.max_seconds, "--max-seconds", lambda v: 0 <= v < float("inf"),
                               "seconds >= 0, e.g. 300 (0: exactly --rounds rounds)")
    peak = _number(args.peak_tflops, "--peak-tflops", lambda v: 0 < v < float("inf"),
                   "TFLOP/s > 0, e.g. 989 for an H100's dense bf16")
    args.peak, args.peak_from = peak_tflops(peak)
    bench_device(args.device)


def _profile_flags(args: argparse.Namespace) -> None:
    """--profile DIR, --profile-variants (a subset of --variants; default all), --profile-steps (>= 1)."""
    if args.profile_steps < 1:
        raise UserError(f"--profile-steps: must be >= 1, got {args.profile_steps}")
    if args.profile_variants is None:
        args.profile_variants = list(args.variants)
    else:
        args.profile_variants = _split(args.profile_variants, tuple(args.variants), "--profile-variants")
    if args.profile is not None and not args.profile.strip():
        raise UserError("--profile: expected a folder for trace.json, profile.md and profile.json, got ''")


def _cli(args: argparse.Namespace) -> int:
    for flag in ("tokens", "dim", "hidden_dim", "num_experts", "rounds"):
        if getattr(args, flag, 1) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if args.threads < 0:
        raise UserError(f"--threads: must be >= 0 (0 = torch's default), got {args.threads}")
    args.modes = _split(args.modes, MODES, "--modes") if args.what == "layers" else ["train"]
    _sampling_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    meta = _meta(args)
    meta.update(device=args.device, min_rounds=args.rounds, target_ci=args.target_ci, max_seconds=args.max_seconds,
                ci_level=LEVEL, ci_method="median of per-round ratios; distribution-free interval from binomial order "
                "statistics (mhmoe/bench/stats.py)", peak_tflops=args.peak, peak_tflops_from=args.peak_from)
    t0 = time.perf_counter()
    progress = None
    if args.json_out is not None:
        if not args.json_out.strip():
            raise UserError("--json-out: expected a file for the JSON, got ''")
        progress = _json_writer(args.json_out, meta, t0)
        try:
            progress([], {"stage": "started"})  # a path that cannot be written fails now, not after the timing
        except OSError as e:
            raise UserError(f"--json-out: cannot write {args.json_out!r} ({e.strerror or e}); pass a writable "
                            "file path") from None
    if args.what == "layers":
        if args.dtypes is None:  # bf16 only where the CPU has it natively: elsewhere one round takes minutes
            fast = args.device == "cuda" or cpu_has_fast_bf16()
            args.dtypes = "float32,bfloat16" if fast else "float32"
        args.dtypes = _split(args.dtypes, ("float32", "bfloat16"), "--dtypes")
        if args.impls is None:
            args.impls = ",".join(default_impls(args.device))
        args.impls = _split(args.impls, IMPLS, "--impls")
        if args.dim % 6:
            raise UserError(f"--dim: must be divisible by 2 and 3 (MH-MoE h=2 and h=3), got {args.dim}")
        try:
            layer_variants(args.dim, args.hidden_dim, args.num_experts)
        except ValueError as e:
            raise UserError(f"--dim/--hidden-dim/--num-experts: {e}") from None
        meta.update(tokens=args.tokens, dim=args.dim, hidden_dim=args.hidden_dim, num_experts=args.num_experts,
                    rounds=args.rounds)
        records, gemm, sampling = bench_layers(args, log, progress)
    else:
        if args.preset not in PRESETS:
            raise UserError(f"--preset: unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if args.dtypes is not None:
            args.dtypes = _split(args.dtypes, ("float32", "bfloat16"), "--dtypes")
        if args.compile not in COMPILE_MODES:
            raise UserError(f"--compile: expected one of {', '.join(COMPILE_MODES)} (bare --compile: on), "
                            f"got {args.compile!r}")
        if args.compile_backend not in COMPILE_BACKENDS:
            raise UserError(f"--compile-backend: expected one of {', '.join(COMPILE_BACKENDS)}, "
                            f"got {args.compile_backend!r}")
        _profile_flags(args)
        meta.update(preset=args.preset, rounds=args.rounds, compile=args.compile,
                    compile_backend=args.compile_backend, profile=args.profile)
        records, gemm, sampling = bench_train(args, log, progress)
    meta.update(sampling=sampling, target_reached=all(s["target_reached"] for s in sampling.values()),
                gemm_gflops=gemm, wall_s=round(time.perf_counter() - t0, 1),
                loadavg_end=" ".join(f"{v:.2f}" for v in os.getloadavg()), progress={"stage": "done",
                                                                                   "complete": True})
    if progress is not None:
        progress(records, {"stage": "done", "complete": True})
    if args.json:
        print(json.dumps({"meta": meta, "records": records}, indent=1))
        return 0
    for k, v in meta.items():
        if k != "sampling":
            print(f"# {k}: {v}")
    print(format_sampling(sampling, args.target_ci))
    print()
    for dname in sorted({r["dtype"] for r in records}):
        for mode in args.modes:
            print(format_table(records, dname, mode))
            print()
    if args.what == "train":
        print(format_train_lines(records))
    return 0


def _json_writer(path: str, meta: dict, t0: float) -> Callable[[list[dict], dict], None]:
    """progress(records, stage) for --json-out: {"meta": .., "records": [..]} rewritten atomically at each call,
    so the file always holds the last complete state (meta.progress: the stage, and complete: true at the end)."""

    def write(records: list[dict], stage: dict) -> None:
        stage = dict(stage)
        now = {k: stage.pop(k) for k in ("sampling", "gemm_gflops") if k in stage}
        if "sampling" in now:
            now["target_reached"] = all(s["target_reached"] for s in now["sampling"].values())
        state = {**meta, **now, "wall_s": round(time.perf_counter() - t0, 1),
                 "progress": {"complete": False, **stage}}
        atomic_write_text(path, json.dumps({"meta": state, "records": records}, indent=1) + "\n")

    return write


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed of the layers / whole-model training (median ms, GFLOP/s, vs SMoE)")
    what = p.add_subparsers(dest="what", required=True)
    lay = what.add_parser("layers", help="the five paper layers and transformers' Mixtral block, fwd and fwd+bwd")
    lay.add_argument("--tokens", type=int, default=4096, help="tokens per call (default 4096)")
    lay.add_argument("--dim", type=int, default=768, help="model dimension D (default 768)")
    lay.add_argument("--hidden-dim", type=int, default=2048, help="SMoE expert / dense hidden F (default 2048)")
    lay.add_argument("--num-experts", type=int, default=8, help="SMoE experts (default 8)")
    lay.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadiest A/B)")
    lay.add_argument("--dtypes", default=None,
                     help="float32 and/or bfloat16 (default: both where the CPU has native bf16, else float32)")
    lay.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    lay.add_argument("--impls", default=None,
                     help=f"our implementations: {', '.join(IMPLS)}; auto = what dispatch='auto' resolves to on "
                          "--device (default: sorted on CPU; auto, sorted and grouped_mm on CUDA)")
    lay.add_argument("--no-hf", action="store_true", help="leave out transformers' Mixtral block")
    tr = what.add_parser("train", help="whole-model training steps per second of the preset's five variants")
    tr.add_argument("--preset", default="tiny", help=f"{preset_names()} sizes (default tiny)")
    tr.add_argument("--variants", default=",".join(PAPER_LAYERS), help="comma-separated model variants")
    tr.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    tr.add_argument("--compile", nargs="?", const="on", default="preset", metavar="MODE",
                    help=f"{', '.join(COMPILE_MODES)}: compile each model as `mhmoe train` does for the preset "
                         "(default), or with that TrainConfig.compile mode (bare --compile: on); warm-up time in "
                         "warmup_s")
    tr.add_argument("--compile-backend", default="inductor", metavar="BACKEND",
                    help=f"{', '.join(COMPILE_BACKENDS)}: torch.compile's backend for the compiled models (default "
                         "inductor, as `mhmoe train`; aot_eager traces the same graphs without generating code, "
                         "e.g. to check the plumbing where no C++ or CUDA toolchain is at hand)")
    tr.add_argument("--profile", default=None, metavar="DIR",
                    help="after the warm-up, profile --profile-steps steps of each --profile-variants variant: "
                         "DIR/trace.json, DIR/profile.md, DIR/profile.json (the step split into its parts)")
    tr.add_argument("--profile-variants", default=None,
                    help="comma-separated subset of --variants to profile (default: all)")
    tr.add_argument("--profile-steps", type=int, default=2, help="optimizer steps per profiled variant (default 2)")
    tr.add_argument("--dtypes", default=None,
                    help="float32 and/or bfloat16 (default: the preset's); with both, each bfloat16 record has its "
                         "time x the float32 one's")
    for q in (lay, tr):
        q.add_argument("--rounds", type=int, default=6,
                       help="minimum timed rounds (default 6: the fewest with a 95%% interval for a median)")
        q.add_argument("--target-ci", default="0.03",
                       help="sample until every ratio's 95%% interval is within +-this fraction of its median "
                            "(default 0.03)")
        q.add_argument("--max-seconds", default=str(MAX_SECONDS),
                       help=f"time cap on the timed rounds of each sampling loop (default {MAX_SECONDS:g}; "
                            "0 = exactly --rounds rounds)")
        q.add_argument("--device", default="cpu", help=f"{' or '.join(DEVICES)} (default cpu)")
        q.add_argument("--peak-tflops", default=None,
                       help="the device's peak TFLOP/s for the dtype, for MFU "
                            "(default: $MHMOE_PEAK_TFLOPS, else no MFU)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
        q.add_argument("--json", action="store_true", help='print {"meta": .., "records": [..]}')
        q.add_argument("--json-out", default=None, metavar="FILE",
                       help="also write that JSON to FILE as the run goes, rewritten atomically after each model "
                            "timed alone (train), at each look at the intervals and at the end: a run cut short "
                            "leaves what it finished (meta.progress says how far it got)")
        q.set_defaults(func=_cli)
