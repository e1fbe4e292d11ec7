"""`mhmoe bench`: the speed of the layer family and of whole-model training, against the peer users would pick.

    mhmoe bench layers [--json] [--tokens 4096] [--dim 768] [--hidden-dim 2048] [--num-experts 8] [--threads 1]
                       [--rounds 4] [--dtypes float32,bfloat16] [--impls sorted,grouped_mm,naive,intra-op] [--no-hf]
    mhmoe bench train  [--json] [--preset tiny] [--variants dense,smoe,...] [--rounds 4] [--threads 0] [--compile]

Layers: the paper's five FFNs, FLOPs-matched by the section 2.3 calculator (at d=768: SMoE 8 x 2048 top-1,
fine-grained 16 x 1024 top-2, MH-MoE h=2 40 x 768 top-2, h=3 96 x 512 top-3, dense SwiGLU 2048), and Hugging
Face transformers' own Mixtral sparse MoE block of the SMoE's sizes (top-1, 8 experts) under every
`experts_implementation` it runs on this device (variant `hf-<implementation>`). The peer is loaded with our SMoE's
weights and checked to compute the same function before anything is timed (Mixtral renormalises its top-k
weights, which at top-1 is a weight of 1: compared against our layer with `renormalize="always"`).

Implementations of our MoE variants (`--impls`): `sorted` (dispatch="sorted", threading="auto"), `grouped_mm`
(the same parameters with dispatch="grouped_mm"), `naive` (`naive_forward`: the common per-expert loop that
indexes W[e]) and `intra-op` (threading="intra-op": the expert loop never split across threads; only at
--threads > 1, where "auto" runs MH-MoE's ranges of experts concurrently). Every one is checked against `sorted`
(outputs and all gradients) before timing.

Method (the machines are noisy): everything lives in one process at `--threads` threads; after the checks and one
warm-up, `--rounds` rounds run every (implementation, mode) once in a fresh random order; we report medians, and
ratios are medians of per-round ratios. fwd = forward under no_grad; fwd+bwd = forward, then y.backward(g) for a
contiguous random g with x.requires_grad (dX included), gradients set to None between iterations. GFLOP/s use the
analytic matmul FLOPs of `mhmoe.complexity` (x3 for fwd+bwd). `frac_of_gemm` compares with one plain
[T, D] x [D, F] matmul (fwd: 1 matmul; fwd+bwd: its 3) timed in the same rounds: the median over rounds of the
layer's rate / the GEMM's rate in that round, so a slow stretch of the shared machine hits both alike. It is the
layer's whole work, head, router and dispatch included, as a fraction of what the machine's GEMM does.
`peak_mem_mb` is the peak of live tensor memory (parameters included) during one untimed pass, from torch's
MemTracker.

Train: one optimizer step (forward, backward, AdamW) of the preset's model per variant on random tokens, in
shuffled rounds like the layers; tokens/s = batch tokens / median step time. `--compile` wraps each model in
torch.compile (the experts' dispatch stays eager, see `Experts.forward`); `warmup_s` records the untimed warm-up
steps (two when compiling, one otherwise), which is where the compilation happens.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, N = T*H sub-tokens.
"""

from __future__ import annotations

import argparse
import copy
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
from torch import nn

from mhmoe.complexity import fine_grained, flops_per_token, model_flops_per_token, solve_parity
from mhmoe.errors import UserError
from mhmoe.layers.build import build_ffn
from mhmoe.layers.config import FFNConfig, MoEAux
from mhmoe.layers.moe import MoELayer
from mhmoe.layers.router import load_balancing_loss, router_entropy, z_loss

PAPER_LAYERS = ("dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3")
MODES = ("fwd", "fwd+bwd")
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")


def layer_variants(dim: int = 768, hidden_dim: int = 2048, num_experts: int = 8) -> dict[str, FFNConfig]:
    """The paper's five layers around an SMoE (dim, hidden_dim, num_experts, top-1); MH-MoE sizes by the calculator."""
    smoe = FFNConfig(kind="moe", dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=1)
    return {
        "dense": FFNConfig(kind="dense", dim=dim, hidden_dim=hidden_dim),
        "smoe": smoe,
        "fine-grained": fine_grained(smoe, 2),
        "mhmoe-h2": solve_parity(dim, hidden_dim, num_experts, 1, heads=2).mhmoe,
        "mhmoe-h3": solve_parity(dim, hidden_dim, num_experts, 1, heads=3).mhmoe,
    }


def naive_forward(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    """The same function as `layer(x)`, computed with the common per-expert loop.

    For each expert: a boolean mask over the [N, K] routing choices, `nonzero` for its (sub-)tokens, a gather,
    the SwiGLU with the stacked weights indexed as W[e] inside the loop, and an index_add_ of the weighted result.
    Indexing W[e] makes autograd build a full-size [E, ...] zero gradient per expert: the cost we avoid.
    """
    cfg, ex = layer.cfg, layer.experts
    shape = x.shape
    tokens = x.reshape(-1, cfg.dim)  # [T, D]
    h = layer.head(tokens) if layer.head is not None else tokens
    sub = h.reshape(-1, cfg.head_dim)  # [N, D/H], the sub-tokens of a token adjacent, as the layer splits
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
    aux = MoEAux(
        loss=cfg.lb_coef * lb + cfg.z_coef * z, lb_loss=lb, z_loss=z,
        router_entropy=router_entropy(routing.logits).detach(),
        tokens_per_expert=torch.bincount(routing.indices.reshape(-1), minlength=cfg.num_experts),
        dropped_fraction=torch.zeros((), device=x.device),
    )
    return y.reshape(shape), aux


# ----------------------------------------------------------------------------------------------------------
# The transformers peer


def hf_implementations(device: torch.device) -> list[str]:
    """The `experts_implementation`s of transformers that run on `device` ([] without transformers)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return []
    gpu_only = {"deepgemm", "sonicmoe"}  # CUDA kernels
    names = ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]
    return [n for n in names if device.type == "cuda" or n not in gpu_only]


def hf_mixtral_block(smoe: MoELayer, implementation: str) -> nn.Module:
    """transformers' MixtralSparseMoeBlock with the sizes and weights of our top-1 SMoE layer `smoe`.

    Ours stores w1, w3: [E, D, F] and w2: [E, F, D]; Mixtral stores gate_up_proj = [W1^T; W3^T]: [E, 2F, D] and
    down_proj = W2^T: [E, D, F]. The router weight [E, D] is the same in both.
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = smoe.cfg
    if c.heads != 1 or c.head_layer or c.merge_layer or c.shared_hidden_dim:
        raise ValueError("hf_mixtral_block: the peer is a plain SMoE (heads=1, no head/merge/shared expert)")
    hf_cfg = MixtralConfig(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_local_experts=c.num_experts,
                           num_experts_per_tok=c.top_k, hidden_act="silu", router_jitter_noise=0.0,
                           experts_implementation=implementation)
    block = MixtralSparseMoeBlock(hf_cfg)
    ex = smoe.experts
    with torch.no_grad():
        block.gate.weight.copy_(smoe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ex.w1.transpose(1, 2), ex.w3.transpose(1, 2)], dim=1))
        block.experts.down_proj.copy_(ex.w2.transpose(1, 2))
    return block.to(ex.w1.dtype)


def _batched_mm_bytes(cfg: FFNConfig, tokens: int, dtype: torch.dtype) -> int:
    """Memory transformers' batched_mm needs: gate_up_proj[ids] and down_proj[ids] are [S, 3 F D] copies, and
    their gradients as much again."""
    return 2 * tokens * cfg.top_k * 3 * cfg.hidden_dim * cfg.dim * torch.finfo(dtype).bits // 8


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


# ----------------------------------------------------------------------------------------------------------
# Timing machinery


@dataclass
class Impl:
    """One timed callable: `fn(x)` returns (y, aux or None) for a [1, T, D] input."""

    variant: str
    impl: str  # sorted | grouped_mm | naive | dense | <hf implementation> | gemm
    flops_fwd: int  # forward matmul FLOPs of one call
    module: nn.Module
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, MoEAux | None]]


def _fwd(impl: Impl, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return impl.fn(x)[0]


def _fwd_bwd(impl: Impl, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    impl.module.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_(True)
    y = impl.fn(xg)[0]
    y.backward(g)
    return y


def _run(impl: Impl, mode: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _fwd(impl, x) if mode == "fwd" else _fwd_bwd(impl, x, g)


def peak_memory_mb(module: nn.Module, run: Callable[[], object]) -> float:
    """Peak live tensor memory (MiB, parameters included) while `run()` executes, via torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module)
    with tracker:
        run()
    peak = tracker.get_tracker_snapshot("peak")
    return max((snap["Total"] for snap in peak.values()), default=0) / 2**20


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """allclose scaled by the reference's magnitude (bf16 sums in a different order per implementation), with an
    absolute floor for gradients that are zero in exact arithmetic (a renormalised top-1 weight is p/p = 1)."""
    tol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (3e-2, 1e-4)
    scale = ref.float().abs().max()
    err = (got.float() - ref.float()).abs().max()
    if not err <= tol * scale + atol:
        raise AssertionError(f"{name}: max abs diff {err.item():.3e} > {tol} * max|ref| ({scale.item():.3e}) + {atol}")


def _grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor, fn: Callable) -> tuple[torch.Tensor, dict]:
    module.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    y = fn(xg)[0]
    y.backward(g)
    out = {"x": xg.grad.detach().clone()}
    out.update({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})
    module.zero_grad(set_to_none=True)
    return y.detach(), out


def check_against(name: str, impl_fn: Callable, impl_module: nn.Module, ref_fn: Callable, ref_module: nn.Module,
                  x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, grad_map: Callable[[dict], dict],
                  ignore: tuple[str, ...] = ()) -> None:
    """Outputs and gradients of impl equal ref's; grad_map turns impl's gradients into ref's names/layout.
    ignore: gradients that are zero in exact arithmetic, so both sides hold only rounding noise."""
    y_ref, g_ref = _grads(ref_module, x, g, ref_fn)
    y, gr = _grads(impl_module, x, g, impl_fn)
    _close(f"{name} output", y, y_ref, dtype)
    gr = grad_map(gr)
    for n in ignore:
        g_ref.pop(n, None)
        gr.pop(n, None)
    if set(gr) != set(g_ref):
        raise AssertionError(f"{name}: gradients for {sorted(gr)} vs {sorted(g_ref)}")
    for n in g_ref:
        _close(f"{name} grad {n}", gr[n], g_ref[n], dtype)


def _hf_grads_as_ours(gr: dict) -> dict:
    """Mixtral's gradient names/layout -> ours (see hf_mixtral_block)."""
    g13 = gr.pop("experts.gate_up_proj")
    f = g13.shape[1] // 2
    out = {"x": gr.pop("x"), "router.weight": gr.pop("gate.weight"),
           "experts.w1": g13[:, :f].transpose(1, 2), "experts.w3": g13[:, f:].transpose(1, 2),
           "experts.w2": gr.pop("experts.down_proj").transpose(1, 2)}
    out.update(gr)
    return out


def hardware() -> dict[str, str]:
    """CPU model, core layout and the matmul ISA extensions (lscpu); the GPU's name when CUDA is available."""
    model, cores = platform.processor() or "?", str(os.cpu_count())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
        model = fields.get("Model name", model)
        cores = (f"{fields.get('CPU(s)', cores)} CPUs ({fields.get('Core(s) per socket', '?')} cores/socket x "
                 f"{fields.get('Socket(s)', '?')} sockets, {fields.get('Thread(s) per core', '?')} threads/core)")
        flags = fields.get("Flags", "").split()
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
        cores += f", {' '.join(isa) or 'no avx2'}"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    info = {"cpu": model, "cores": cores}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _meta(args: argparse.Namespace) -> dict:
    from mhmoe import runtime

    env = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ)
    # The command as typed: the console script, or `python benchmarks/layers.py` (which adds the subcommand).
    prog = f"python {sys.argv[0]}" if sys.argv and sys.argv[0].endswith(".py") else "mhmoe"
    cmd = " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])
    return {
        **hardware(), "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": f"{env} {cmd}".strip(), "threads": torch.get_num_threads(), "malloc_tuned": runtime.MALLOC_TUNED,
        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def timed_rounds(calls: dict, rounds: int, seed: int, log: Callable[[str], None] | None = None,
                 label: str = "") -> dict:
    """Run every callable once per round, in a fresh random order each round; {key: [seconds per round]}.

    Shuffled rounds in one process spread the other tenants' load over every implementation alike.
    """
    times: dict = {key: [] for key in calls}
    rng = random.Random(seed)
    for r in range(rounds):
        t_round = time.perf_counter()
        order = list(calls)
        rng.shuffle(order)
        for key in order:
            t = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - t)
        if log is not None:
            log(f"[{label}] round {r + 1}/{rounds}: {time.perf_counter() - t_round:.1f} s")
    return times


def _median_ratio(ts: list[float], base: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(ts, base))


def paired_frac_of_gemm(flops: float, ts: list[float], gemm_flops: float, gemm_ts: list[float]) -> float:
    """Median over rounds of (flops / ts[r]) / (gemm_flops / gemm_ts[r]): each round's rate against the GEMM's
    rate in the same round, so a slow stretch of a shared machine slows the numerator and denominator alike."""
    return statistics.median((flops / t) / (gemm_flops / gt) for t, gt in zip(ts, gemm_ts))


# ----------------------------------------------------------------------------------------------------------
# mhmoe bench layers


def build_layer_impls(args: argparse.Namespace, dtype: torch.dtype, x: torch.Tensor, g: torch.Tensor,
                      log: Callable[[str], None]) -> list[Impl]:
    """Our five layers (+ the requested alternative dispatches), the HF peers and the GEMM reference, each
    checked against our sorted layer on (x, g) before it is returned."""
    impls: list[Impl] = []
    smoe_layer = None
    for i, (name, cfg) in enumerate(layer_variants(args.dim, args.hidden_dim, args.num_experts).items()):
        torch.manual_seed(args.seed + i)
        if cfg.kind == "moe":  # the `sorted` impl is sorted on every device (the default "auto" is grouped_mm on CUDA)
            cfg = cfg.replace(dispatch="sorted")
        layer = build_ffn(cfg).to(dtype)
        flops = flops_per_token(cfg).total * args.tokens
        if cfg.kind == "dense":
            impls.append(Impl(name, "dense", flops, layer, layer))
            continue
        smoe_layer = layer if name == "smoe" else smoe_layer
        impls.append(Impl(name, "sorted", flops, layer, layer))
        if "grouped_mm" in args.impls:
            try:
                glayer = build_ffn(cfg.replace(dispatch="grouped_mm")).to(dtype)
            except ValueError as e:  # grouped_mm's alignment rule
                log(f"{name}/grouped_mm: skipped ({e})")
                glayer = None
        if "grouped_mm" in args.impls and glayer is not None:
            glayer.load_state_dict(layer.state_dict())
            check_against(f"{name}/grouped_mm", glayer, glayer, layer, layer, x, g, dtype, lambda d: d)
            impls.append(Impl(name, "grouped_mm", flops, glayer, glayer))
        if "naive" in args.impls:
            naive = lambda t, layer=layer: naive_forward(layer, t)  # noqa: E731
            check_against(f"{name}/naive", naive, layer, layer, layer, x, g, dtype, lambda d: d)
            impls.append(Impl(name, "naive", flops, layer, naive))
        if "intra-op" in args.impls and torch.get_num_threads() > 1:
            ilayer = build_ffn(cfg.replace(threading="intra-op")).to(dtype)
            ilayer.load_state_dict(layer.state_dict())
            check_against(f"{name}/intra-op", ilayer, ilayer, layer, layer, x, g, dtype, lambda d: d)
            impls.append(Impl(name, "intra-op", flops, ilayer, ilayer))
    if not args.no_hf and smoe_layer is not None:
        names = hf_implementations(x.device)
        if not names:
            log("transformers is not installed: no hf-* peer (pip install 'mhmoe[hf]')")
        # The same function is checked in fp32: in bf16 Mixtral's router matmul runs in bf16 and ours in fp32,
        # so near-ties route differently by design.
        ref = build_ffn(smoe_layer.cfg.replace(renormalize="always"))  # Mixtral renormalises its top-k weights
        ref.load_state_dict(smoe_layer.state_dict())
        flops = flops_per_token(smoe_layer.cfg).total * args.tokens
        for name in names:
            need = _batched_mm_bytes(smoe_layer.cfg, args.tokens, dtype) if name == "batched_mm" else 0
            if need > _physical_memory() / 2:
                log(f"hf-{name}: skipped (it gathers a weight copy per token: ~{need / 2**30:.0f} GiB for "
                    f"fwd+bwd at {args.tokens} tokens, over half of this machine's memory)")
                continue
            block = hf_mixtral_block(smoe_layer, name)
            fn = lambda t, block=block: (block(t), None)  # noqa: E731
            try:
                block32 = copy.deepcopy(block).float()
                # A renormalised top-1 weight is p/p = 1: the router gets no gradient through the output.
                noise = ("router.weight",) if smoe_layer.cfg.top_k == 1 else ()
                check_against(f"hf-{name}", lambda t, b=block32: (b(t), None), block32, ref, ref, x.float(),
                              g.float(), torch.float32, _hf_grads_as_ours, ignore=noise)
            except (RuntimeError, NotImplementedError, KeyError) as e:  # an implementation this device lacks
                log(f"hf-{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                continue
            impls.append(Impl(f"hf-{name}", name, flops, block, fn))
    w = torch.randn(args.dim, args.hidden_dim, generator=torch.Generator().manual_seed(args.seed)).to(dtype)
    gemm = nn.Module()
    gemm.w = nn.Parameter(w)
    impls.append(Impl("gemm", "gemm", 2 * args.tokens * args.dim * args.hidden_dim, gemm,
                      lambda t, gemm=gemm: (t.reshape(-1, t.shape[-1]) @ gemm.w, None)))
    return impls


def bench_layers(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Time every implementation; returns (records, the GEMM reference rates by 'dtype/mode')."""
    records: list[dict] = []
    gemm_rates: dict[str, float] = {}
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        gen = torch.Generator().manual_seed(args.seed + 100)
        x = torch.randn(1, args.tokens, args.dim, generator=gen).to(dtype)  # [1, T, D]
        g = torch.randn(1, args.tokens, args.dim, generator=gen).to(dtype).contiguous()
        t0 = time.perf_counter()
        impls = build_layer_impls(args, dtype, x, g, log)
        g_gemm = torch.randn(args.tokens, args.hidden_dim, generator=gen).to(dtype)
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
        times = timed_rounds(calls, args.rounds, args.seed, log, dname)
        for mode in args.modes:
            mult = 3 if mode == "fwd+bwd" else 1
            gemm_t = times[(mode, "gemm", "gemm")]
            gemm_flops = next(im.flops_fwd for im in impls if im.impl == "gemm") * mult
            gemm_rate = gemm_flops / statistics.median(gemm_t) / 1e9
            gemm_rates[f"{dname}/{mode}"] = gemm_rate
            smoe_t = times[(mode, "smoe", "sorted")]
            for im in impls:
                if im.impl == "gemm":
                    continue
                ts = times[(mode, im.variant, im.impl)]
                med = statistics.median(ts)
                gflops = im.flops_fwd * mult / med / 1e9
                sorted_t = times.get((mode, im.variant, "sorted"))
                records.append({
                    "variant": im.variant, "impl": im.impl, "dtype": dname, "mode": mode,
                    "threads": torch.get_num_threads(), "median_ms": med * 1e3, "gflops": gflops,
                    "frac_of_gemm": paired_frac_of_gemm(im.flops_fwd * mult, ts, gemm_flops, gemm_t),
                    "peak_mem_mb": peak.get((im.variant, im.impl, mode)),
                    "ratio_to_smoe": _median_ratio(ts, smoe_t),
                    "ratio_to_sorted": _median_ratio(ts, sorted_t) if sorted_t else None,
                    "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "rounds": len(ts),
                })
    return records, gemm_rates


# ----------------------------------------------------------------------------------------------------------
# mhmoe bench train


def bench_train(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """One AdamW step per variant of `args.preset` on random tokens, shuffled rounds; (records, gemm rates)."""
    from mhmoe.model import Transformer
    from mhmoe.training.optim import build_optimizer
    from mhmoe.training.presets import preset

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


# ----------------------------------------------------------------------------------------------------------
# Report and CLI


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


def _split(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise UserError(f"{flag}: expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
    return items


def _cli(args: argparse.Namespace) -> int:
    for flag in ("tokens", "dim", "hidden_dim", "num_experts", "rounds"):
        if getattr(args, flag, 1) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if args.threads < 0:
        raise UserError(f"--threads: must be >= 0 (0 = torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.modes = _split(args.modes, MODES, "--modes") if args.what == "layers" else ["train"]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    meta = _meta(args)
    t0 = time.perf_counter()
    if args.what == "layers":
        if args.dtypes is None:  # bf16 only where the CPU has it natively: elsewhere one round takes minutes
            from mhmoe.training.device import cpu_has_fast_bf16

            args.dtypes = "float32,bfloat16" if cpu_has_fast_bf16() else "float32"
        args.dtypes = _split(args.dtypes, ("float32", "bfloat16"), "--dtypes")
        args.impls = _split(args.impls, ("sorted", "grouped_mm", "naive", "intra-op"), "--impls")
        if args.dim % 6:
            raise UserError(f"--dim: must be divisible by 2 and 3 (MH-MoE h=2 and h=3), got {args.dim}")
        try:
            layer_variants(args.dim, args.hidden_dim, args.num_experts)
        except ValueError as e:
            raise UserError(f"--dim/--hidden-dim/--num-experts: {e}") from None
        meta.update(tokens=args.tokens, dim=args.dim, hidden_dim=args.hidden_dim, num_experts=args.num_experts,
                    rounds=args.rounds)
        records, gemm = bench_layers(args, log)
    else:
        from mhmoe.training.presets import PRESETS

        if args.preset not in PRESETS:
            raise UserError(f"--preset: unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        meta.update(preset=args.preset, rounds=args.rounds)
        records, gemm = bench_train(args, log)
    meta["gemm_gflops"] = gemm
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if args.json:
        print(json.dumps({"meta": meta, "records": records}, indent=1))
        return 0
    for k, v in meta.items():
        print(f"# {k}: {v}")
    print()
    for dname in sorted({r["dtype"] for r in records}):
        for mode in args.modes:
            print(format_table(records, dname, mode))
            print()
    if args.what == "train":
        for r in records:
            print(f"{r['variant']:<14} {r['tok_per_s']:8.0f} tokens/s  x smoe {r['ratio_to_smoe'] or 0:.2f}  "
                  f"warm-up {r['warmup_s']:.1f} s")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed of the layers / whole-model training (median ms, GFLOP/s, vs SMoE)")
    what = p.add_subparsers(dest="what", required=True)
    lay = what.add_parser("layers", help="the five paper layers and transformers' Mixtral block, fwd and fwd+bwd")
    lay.add_argument("--tokens", type=int, default=4096, help="tokens per call (default 4096)")
    lay.add_argument("--dim", type=int, default=768, help="model dimension D (default 768)")
    lay.add_argument("--hidden-dim", type=int, default=2048, help="SMoE expert / dense hidden F (default 2048)")
    lay.add_argument("--num-experts", type=int, default=8, help="SMoE experts (default 8)")
    lay.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadiest A/B)")
    lay.add_argument("--rounds", type=int, default=4, help="timed rounds (default 4)")
    lay.add_argument("--dtypes", default=None,
                     help="float32 and/or bfloat16 (default: both where the CPU has native bf16, else float32)")
    lay.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    lay.add_argument("--impls", default="sorted",
                     help="our implementations: sorted, grouped_mm, naive, intra-op (default sorted)")
    lay.add_argument("--no-hf", action="store_true", help="leave out transformers' Mixtral block")
    tr = what.add_parser("train", help="whole-model training steps per second of the preset's five variants")
    tr.add_argument("--preset", default="tiny", help="smoke, demo, tiny, gpu or paper sizes (default tiny)")
    tr.add_argument("--variants", default=",".join(PAPER_LAYERS), help="comma-separated model variants")
    tr.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    tr.add_argument("--rounds", type=int, default=4, help="timed rounds (default 4)")
    tr.add_argument("--compile", action="store_true", help="torch.compile each model (warm-up time in warmup_s)")
    for q in (lay, tr):
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
        q.add_argument("--json", action="store_true", help='print {"meta": .., "records": [..]}')
        q.set_defaults(func=_cli)
