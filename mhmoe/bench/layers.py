"""`mhmoe bench layers`: every implementation of the five layers, the transformers peer and a GEMM reference,
checked, then timed in shuffled rounds until the per-round comparisons' intervals are narrow (stats.py)."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from torch import nn

from mhmoe.bench.checks import check_against
from mhmoe.bench.device import device_memory, peak_memory_mb, synchronizer
from mhmoe.bench.impl import Impl, _run
from mhmoe.bench.mfu import mfu
from mhmoe.bench.peer import _batched_mm_bytes, _hf_grads_as_ours, hf_implementations, hf_mixtral_block
from mhmoe.bench.stats import Ratio, sample_rounds, summarise
from mhmoe.bench.variants import layer_variants, naive_forward
from mhmoe.complexity import flops_per_token
from mhmoe.layers.build import build_ffn
from mhmoe.layers.config import FFNConfig
from mhmoe.layers.experts import resolve_dispatch

MODES = ("fwd", "fwd+bwd")


NOT_DISPATCHES = ("auto", "sorted", "naive", "intra-op")  # --impls that are not an FFNConfig.dispatch to build


def build_layer_impls(args: argparse.Namespace, dtype: torch.dtype, x: torch.Tensor, g: torch.Tensor,
                      log: Callable[[str], None]) -> list[Impl]:
    """Our five layers (+ the requested alternative dispatches), the HF peers and the GEMM reference, each
    checked against our sorted layer on (x, g) before it is returned. "auto" in args.impls adds the dispatch
    dispatch="auto" resolves to for x (its device and dtype) and flags its Impl (and the dense layer's) `auto`."""
    impls: list[Impl] = []
    smoe_layer = None
    want_auto = "auto" in args.impls
    for i, (name, cfg) in enumerate(layer_variants(args.dim, args.hidden_dim, args.num_experts).items()):
        torch.manual_seed(args.seed + i)
        auto = resolve_dispatch("auto", x.device, cfg.head_dim, cfg.hidden_dim, dtype) if cfg.kind == "moe" else None
        # The `sorted` impl is sorted on every device (the default "auto" is scatter or grouped_mm on CUDA).
        if cfg.kind == "moe":
            cfg = cfg.replace(dispatch="sorted")
        layer = build_ffn(cfg).to(x.device, dtype)
        flops = flops_per_token(cfg).total * args.tokens
        if cfg.kind == "dense":
            impls.append(Impl(name, "dense", flops, layer, layer, auto=want_auto))
            continue
        smoe_layer = layer if name == "smoe" else smoe_layer
        impls.append(Impl(name, "sorted", flops, layer, layer, auto=want_auto and auto == "sorted"))
        others = [d for d in args.impls if d not in NOT_DISPATCHES]  # the alternative dispatches asked for
        if want_auto and auto not in others and auto != "sorted":
            others.append(auto)
        for dispatch in others:
            alt = _alternative(name, cfg, dispatch, layer, x, g, dtype, log)
            if alt is not None:
                impls.append(Impl(name, dispatch, flops, alt, alt, auto=want_auto and dispatch == auto))
        if "naive" in args.impls:
            naive = lambda t, layer=layer: naive_forward(layer, t)  # noqa: E731
            check_against(f"{name}/naive", naive, layer, layer, layer, x, g, dtype, lambda d: d)
            impls.append(Impl(name, "naive", flops, layer, naive))
        if "intra-op" in args.impls and torch.get_num_threads() > 1:
            ilayer = build_ffn(cfg.replace(threading="intra-op")).to(x.device, dtype)
            ilayer.load_state_dict(layer.state_dict())
            check_against(f"{name}/intra-op", ilayer, ilayer, layer, layer, x, g, dtype, lambda d: d)
            impls.append(Impl(name, "intra-op", flops, ilayer, ilayer))
    if not args.no_hf and smoe_layer is not None:
        names = hf_implementations(x.device)
        if not names:
            log("transformers is not installed: no hf-* peer (pip install 'mhmoe[hf]')")
        # The same function is checked in fp32: in bf16 Mixtral's router matmul runs in bf16 and ours in fp32,
        # so near-ties route differently by design.
        # Mixtral renormalises its top-k weights.
        ref = build_ffn(smoe_layer.cfg.replace(renormalize="always")).to(x.device)
        ref.load_state_dict(smoe_layer.state_dict())
        flops = flops_per_token(smoe_layer.cfg).total * args.tokens
        for name in names:
            need = _batched_mm_bytes(smoe_layer.cfg, args.tokens, dtype) if name == "batched_mm" else 0
            if need > device_memory(x.device) / 2:
                log(f"hf-{name}: skipped (it gathers a weight copy per token: ~{need / 2**30:.0f} GiB for "
                    f"fwd+bwd at {args.tokens} tokens, over half of the device's memory)")
                continue
            try:
                block = hf_mixtral_block(smoe_layer, name)
                block32 = copy.deepcopy(block).float()
                # A renormalised top-1 weight is p/p = 1: the router gets no gradient through the output.
                noise = ("router.weight",) if smoe_layer.cfg.top_k == 1 else ()
                check_against(f"hf-{name}", lambda t, b=block32: (b(t), None), block32, ref, ref, x.float(),
                              g.float(), torch.float32, _hf_grads_as_ours, ignore=noise)
            except AssertionError:  # it runs here but computes another function: a finding, never skipped
                raise
            # An implementation this device lacks. On CUDA its kernels may come from a package or hub download
            # that is missing or offline, and those fail with any error type: skip the peer, keep the benchmark.
            except Exception as e:  # noqa: BLE001
                log(f"hf-{name}: skipped ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})")
                continue
            impls.append(Impl(f"hf-{name}", name, flops, block, lambda t, block=block: (block(t), None)))
    w = torch.randn(args.dim, args.hidden_dim, generator=torch.Generator().manual_seed(args.seed)).to(x.device, dtype)
    gemm = nn.Module()
    gemm.w = nn.Parameter(w)
    impls.append(Impl("gemm", "gemm", 2 * args.tokens * args.dim * args.hidden_dim, gemm,
                      lambda t, gemm=gemm: (t.reshape(-1, t.shape[-1]) @ gemm.w, None)))
    return impls


def _alternative(name: str, cfg: FFNConfig, dispatch: str, layer: nn.Module, x: torch.Tensor, g: torch.Tensor,
                 dtype: torch.dtype, log: Callable[[str], None]) -> nn.Module | None:
    """`layer` rebuilt with `dispatch` and its weights, checked against it; None (with a log line) where the
    dispatch cannot run here. A check that fails (another function) raises."""
    try:
        alt = build_ffn(cfg.replace(dispatch=dispatch)).to(x.device, dtype)
    except ValueError as e:  # grouped_mm's alignment rule
        log(f"{name}/{dispatch}: skipped ({e})")
        return None
    alt.load_state_dict(layer.state_dict())
    try:
        check_against(f"{name}/{dispatch}", alt, alt, layer, layer, x, g, dtype, lambda d: d)
    except AssertionError:
        raise
    # torch's grouped_mm kernel lacks this device/dtype; no Triton, or its compiler fails on this device: a
    # skip the log names, the rest of the benchmark still runs.
    except Exception as e:  # noqa: BLE001
        log(f"{name}/{dispatch}: skipped ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})")
        return None
    return alt


def layer_ratios(impls: list[Impl], mode: str) -> dict[tuple[str, str, str], dict[str, Ratio]]:
    """The per-round comparisons of each timed implementation in `mode`, by record key and JSON name:
    ratio_to_smoe (time / SMoE sorted's), ratio_to_sorted (time / the same variant's sorted layer's, for our
    MoE variants), frac_of_gemm (rate / the GEMM's rate; the x3 of fwd+bwd cancels), and with an auto
    implementation ratio_to_smoe_auto (time / the time of SMoE on the dispatch auto picks) and ratio_to_dense
    (time / the dense layer's)."""
    gemm = next(im for im in impls if im.impl == "gemm")
    gemm_key = (mode, "gemm", "gemm")
    have = {(im.variant, im.impl) for im in impls}
    smoe_auto = next((im.impl for im in impls if im.variant == "smoe" and im.auto), None)
    out = {}
    for im in impls:
        if im.impl == "gemm":
            continue
        key = (mode, im.variant, im.impl)
        ratios = {"frac_of_gemm": Ratio(gemm_key, key, im.flops_fwd / gemm.flops_fwd),
                  "ratio_to_smoe": Ratio(key, (mode, "smoe", "sorted"))}
        if (im.variant, "sorted") in have:
            ratios["ratio_to_sorted"] = Ratio(key, (mode, im.variant, "sorted"))
        if smoe_auto is not None:
            ratios["ratio_to_smoe_auto"] = Ratio(key, (mode, "smoe", smoe_auto))
            if ("dense", "dense") in have:
                ratios["ratio_to_dense"] = Ratio(key, (mode, "dense", "dense"))
        out[key] = ratios
    return out


def bench_layers(args: argparse.Namespace, log: Callable[[str], None],
                 progress: Callable[[list[dict], dict], None] | None = None) -> tuple[list[dict], dict, dict]:
    """Time every implementation; returns (records, the GEMM reference rates by 'dtype/mode', the sampling per
    dtype: rounds, seconds, target_reached, widest half-width). progress(records, stage): the records so far, at
    each look at the intervals and after each dtype (a run cut short keeps the rounds it finished)."""
    device = torch.device(args.device)
    records: list[dict] = []
    gemm_rates: dict[str, float] = {}
    sampling: dict[str, dict] = {}
    report = progress or (lambda records, stage: None)
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        gen = torch.Generator().manual_seed(args.seed + 100)
        x = torch.randn(1, args.tokens, args.dim, generator=gen).to(device, dtype)  # [1, T, D]
        g = torch.randn(1, args.tokens, args.dim, generator=gen).to(device, dtype).contiguous()
        t0 = time.perf_counter()
        impls = build_layer_impls(args, dtype, x, g, log)
        g_gemm = torch.randn(args.tokens, args.hidden_dim, generator=gen).to(device, dtype)
        grad_of = {im.variant: (g_gemm if im.impl == "gemm" else g) for im in impls}
        for im in impls:  # warm-up (and memory), untimed
            for mode in args.modes:
                _run(im, mode, x, grad_of[im.variant])
        log(f"[{dname}] checks and warm-up: {time.perf_counter() - t0:.1f} s")
        peak = {}
        if not args.no_memory:
            for im in impls:
                for mode in args.modes:
                    peak[(im.variant, im.impl, mode)] = peak_memory_mb(
                        im.module, lambda im=im, mode=mode: _run(im, mode, x, grad_of[im.variant]))
        calls = {(m, im.variant, im.impl): (lambda im=im, m=m: _run(im, m, x, grad_of[im.variant]))
                 for m in args.modes for im in impls}
        by_record = {k: v for mode in args.modes for k, v in layer_ratios(impls, mode).items()}
        # SMoE sorted / itself is 1 in every round; it would only add a look at a constant.
        watched = [r for rs in by_record.values() for r in rs.values() if r.num != r.den]

        def looked(s, dname=dname, impls=impls, by_record=by_record, peak=peak) -> None:  # noqa: ANN001
            recs, _ = _records(args, dname, device, impls, s.times, by_record, peak)
            report(records + recs, {"stage": f"{dname}: rounds {s.rounds}",
                                    "sampling": {**sampling, dname: s.as_meta()}})

        got = sample_rounds(calls, watched, min_rounds=args.rounds, target=args.target_ci,
                            max_seconds=args.max_seconds, seed=args.seed, log=log, label=dname,
                            sync=synchronizer(device), on_look=looked)
        sampling[dname] = got.as_meta()
        recs, rates = _records(args, dname, device, impls, got.times, by_record, peak)
        records += recs
        gemm_rates.update(rates)
        report(records, {"stage": f"{dname} done", "sampling": sampling, "gemm_gflops": gemm_rates})
    return records, gemm_rates, sampling


def _records(args: argparse.Namespace, dname: str, device: torch.device, impls: list[Impl], times: dict,
             by_record: dict, peak: dict) -> tuple[list[dict], dict[str, float]]:
    """The records of one dtype's timings (every implementation and mode) and the GEMM's rates by 'dtype/mode'."""
    records, gemm_rates = [], {}
    for mode in args.modes:
        mult = 3 if mode == "fwd+bwd" else 1
        gemm_flops = next(im.flops_fwd for im in impls if im.impl == "gemm") * mult
        gemm_rates[f"{dname}/{mode}"] = gemm_flops / statistics.median(times[(mode, "gemm", "gemm")]) / 1e9
        for im in impls:
            if im.impl == "gemm":
                continue
            key = (mode, im.variant, im.impl)
            ts = times[key]
            med = statistics.median(ts)
            gflops = im.flops_fwd * mult / med / 1e9
            records.append({
                "variant": im.variant, "impl": im.impl, "auto": im.auto, "dtype": dname, "mode": mode,
                "device": device.type,
                "threads": torch.get_num_threads(), "median_ms": med * 1e3, "gflops": gflops,
                "mfu": mfu(gflops, args.peak), "peak_mem_mb": peak.get((im.variant, im.impl, mode)),
                "ratio_to_sorted": None, "ratio_to_sorted_ci": None,
                **summarise(times, by_record[key], args.target_ci),
                "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts),
            })
    return records, gemm_rates
