"""BitNet b1.58 benchmark (issue 5): artefact size and CPU forward latency of the packed integer path vs fp32/bf16.

    python benchmarks/bitnet.py [--variants dense,smoe,mhmoe-h3] [--preset demo] [--threads 1] [--rounds 7]
                                [--batch 16] [--json]

For each variant, the `demo` preset's model (mhmoe.training.presets.demo(variant).model, d=96, 4 layers, vocab 2048) is
built with seed 0 in four forms that run the same architecture:
    fp32        the full-precision model (ModelConfig.bitnet=false), float32 weights
    bf16        the same model with every parameter and buffer cast to bfloat16 (routers still run in float32)
    fake-quant  its BitNet twin (bitnet=true: same init + sub-norms), the training forward in float32
    int8        the fake-quant model packed with mhmoe.export (2-bit ternary + fp32 scales + fp tensors) and
                reloaded with mhmoe.export.integer_model: int8 activations x int8 weights -> int32 (torch._int_mm)
Sizes: the packed safetensors file vs the BitNet model's checkpoint (model.safetensors as `mhmoe train` writes it)
in fp32 and in bf16, all serialised in memory with safetensors.
Latency: forward passes under torch.no_grad() in eval mode, three shapes:
    batch     [--batch, seq_len] tokens (the preset's eval batch: 16 x 128)
    sequence  [1, seq_len]
    decode    one new token after seq_len/2 cached positions (KV cache restored after every call)
Projection: one projection at the paper's size (--proj-tokens rows, 768 -> 2048 and 2048 -> 768 with its sub-norm)
as nn.Linear in fp32 and bf16, BitLinear (fake-quant) and IntBitLinear (int8, including the per-token activation
quantisation and the rescale), to separate the kernels from the small model's fixed costs (LM head, attention).
Method: all forms live in one process at --threads threads; each is warmed up, then --rounds rounds run every
(form, shape) once in a fresh random order; the tables report the fastest round (the machine may be shared: the
minimum is the least disturbed measurement; --json also gives the medians of the model forwards). Agreement: max |int8 - fake-quant| /
max |fake-quant| over the logits of the batch shape (the integer path is meant to be exact; the acceptance bound is
1e-4).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch
from safetensors.torch import save

from mhmoe.bench import hardware, timed_rounds
from mhmoe.bitnet.integer import IntBitLinear
from mhmoe.bitnet.modules import BitLinear
from mhmoe.bitnet.ternary import integer_model, ternary_state
from mhmoe.layers.attention import KVCache
from mhmoe.model import Transformer
from mhmoe.training.presets import PRESETS

FORMS = ("fp32", "bf16", "fake-quant", "int8")
SHAPES = ("batch", "sequence", "decode")


def checkpoint_bytes(model: Transformer, dtype: torch.dtype) -> int:
    """Size of the model's safetensors checkpoint (tied LM head once) with floating tensors in `dtype`."""
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
          if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    return len(save(sd))


def build(preset: str, variant: str) -> tuple[dict[str, Transformer], dict]:
    cfg = PRESETS[preset](variant)
    torch.manual_seed(0)
    fp = Transformer(cfg.model).eval()
    torch.manual_seed(0)
    fake = Transformer(cfg.model.replace(bitnet=True)).eval()
    with torch.no_grad():  # trained-looking sub-norm gains (1 at init), so the agreement check covers them
        gen = torch.Generator().manual_seed(1)
        for name, p in fake.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
    tensors, meta = ternary_state(fake)
    packed = save(tensors, metadata=meta)
    ternary = {k[: -len(".packed")] for k in tensors if k.endswith(".packed")}
    info = {
        "seq_len": cfg.seq_len,
        "params_fp_model": sum(p.numel() for p in fp.parameters()),
        "ternary_weights": sum(tensors[f"{k}.packed"].numel() * 4 for k in ternary),  # padded to 4
        "bytes": {"packed": len(packed), "bf16": checkpoint_bytes(fake, torch.bfloat16),
                  "fp32": checkpoint_bytes(fake, torch.float32),
                  "packed_ternary_part": sum(tensors[f"{k}.packed"].numel() for k in ternary)},
    }
    from safetensors.torch import load

    int_model = integer_model(fake.cfg, load(packed), meta)
    models = {"fp32": fp, "bf16": copy.deepcopy(fp).to(torch.bfloat16), "fake-quant": fake, "int8": int_model}
    return models, info


def make_call(model: Transformer, shape: str, idx: torch.Tensor, seq_len: int):  # noqa: ANN201
    if shape == "batch":
        return lambda: model(idx)
    if shape == "sequence":
        return lambda: model(idx[:1])
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        model(idx[:1, : seq_len // 2], cache=cache)
    k, v, pos = list(cache.k), list(cache.v), cache.pos
    step = idx[:1, seq_len // 2 : seq_len // 2 + 1]

    def decode():  # noqa: ANN202
        out = model(step, cache=cache)
        cache.k, cache.v, cache.pos = list(k), list(v), pos
        return out

    return decode


def bench_variant(args: argparse.Namespace, variant: str, log) -> dict:  # noqa: ANN001
    models, info = build(args.preset, variant)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, models["fp32"].cfg.vocab_size, (args.batch, info["seq_len"]), generator=gen)
    with torch.no_grad():
        ref = models["fake-quant"](idx).logits
        got = models["int8"](idx).logits
    info["agreement_rel"] = float((got - ref).abs().max() / ref.abs().max())
    info["agreement_bitwise"] = bool(torch.equal(got, ref))
    calls = {(f, s): make_call(models[f], s, idx, info["seq_len"]) for f in FORMS for s in SHAPES}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            for _ in range(args.warmup):
                fn()
        times = timed_rounds(calls, args.rounds, seed=0)
    info["ms"] = {f"{f}/{s}": min(times[(f, s)]) * 1e3 for f, s in calls}
    info["ms_median"] = {f"{f}/{s}": statistics.median(times[(f, s)]) * 1e3 for f, s in calls}
    log(f"  {variant}: done ({args.rounds} rounds)")
    return info


def bench_projection(args: argparse.Namespace, d_in: int, d_out: int) -> dict[str, float]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out, bias=False)
    bit = BitLinear.from_linear(lin, sub_norm=d_in > d_out)
    forms = {"fp32": lin, "bf16": copy.deepcopy(lin).to(torch.bfloat16), "fake-quant": bit,
             "int8": IntBitLinear(*bit.ternary(), 1, bit.norm)}
    x = torch.randn(args.proj_tokens, d_in)
    inputs = {f: x.to(torch.bfloat16) if f == "bf16" else x for f in forms}
    with torch.no_grad():
        for f in forms:
            for _ in range(args.warmup):
                forms[f](inputs[f])
        times = timed_rounds({f: (lambda f=f: forms[f](inputs[f])) for f in forms}, args.rounds, seed=1)
    return {f: min(t) * 1e3 for f, t in times.items()}


def format_report(results: dict[str, dict], args: argparse.Namespace, proj: dict[str, dict]) -> str:
    lines = ["## Artefact size (bytes; BitNet model; fp32/bf16 = its safetensors checkpoint)", "",
             "| variant | ternary weights | packed file | of which 2-bit codes | bf16 ckpt | fp32 ckpt | "
             "bf16 / packed | fp32 / packed |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in results.items():
        b = r["bytes"]
        lines.append(f"| {v} | {r['ternary_weights']:,} | {b['packed']:,} | {b['packed_ternary_part']:,} | "
                     f"{b['bf16']:,} | {b['fp32']:,} | {b['bf16'] / b['packed']:.2f} | {b['fp32'] / b['packed']:.2f} |")
    for shape in SHAPES:
        desc = {"batch": f"[{args.batch}, seq_len]", "sequence": "[1, seq_len]",
                "decode": "1 token, seq_len/2 cached"}[shape]
        lines += ["", f"## Forward latency, {shape} {desc} (ms, best of {args.rounds}; ratio = int8 / form)", "",
                  "| variant | fp32 | bf16 | fake-quant | int8 | int8/fp32 | int8/bf16 | int8/fake-quant |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v, r in results.items():
            ms = {f: r["ms"][f"{f}/{shape}"] for f in FORMS}
            lines.append(f"| {v} | " + " | ".join(f"{ms[f]:.2f}" for f in FORMS) + " | "
                         + " | ".join(f"{ms['int8'] / ms[f]:.2f}" for f in ("fp32", "bf16", "fake-quant")) + " |")
    lines += ["", f"## One projection, {args.proj_tokens} tokens (ms, best of {args.rounds}; ratio = int8 / form)", "",
              "| projection | fp32 | bf16 | fake-quant | int8 | int8/fp32 | int8/bf16 | int8/fake-quant |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ms in proj.items():
        lines.append(f"| {name} | " + " | ".join(f"{ms[f]:.2f}" for f in FORMS) + " | "
                     + " | ".join(f"{ms['int8'] / ms[f]:.2f}" for f in ("fp32", "bf16", "fake-quant")) + " |")
    lines += ["", "## Integer path vs fake-quant logits (batch shape)", "", "| variant | max rel. diff | bitwise equal |",
              "|---|---:|---|"]
    for v, r in results.items():
        lines.append(f"| {v} | {r['agreement_rel']:.2e} | {r['agreement_bitwise']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="dense,smoe,mhmoe-h3")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--proj-tokens", type=int, default=2048, help="rows of the single-projection benchmark (0 = skip)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {
        **hardware(), "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "preset": args.preset,
        "load_avg_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = {v: bench_variant(args, v, log) for v in args.variants.split(",") if v}
    proj = {}
    if args.proj_tokens:
        for d_in, d_out in ((768, 2048), (2048, 768)):
            proj[f"{d_in} -> {d_out}" + (" (+ sub-norm)" if d_in > d_out else "")] = bench_projection(args, d_in, d_out)
        log("  projections: done")
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps({"meta": meta, "results": results, "projection_ms": proj}, indent=1))
        return
    for k in ("date", "command", "cpu", "cores", "torch", "python", "threads", "preset", "load_avg_before", "wall_s"):
        print(f"# {k}: {meta[k]}")
    print()
    print(format_report(results, args, proj))


if __name__ == "__main__":
    main()
