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

Implementations of our MoE variants (`--impls`): `sorted` (the layer as built, threading="auto"), `grouped_mm`
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

# The names that tests, benchmarks/*.py and `mhmoe.cli` import from `mhmoe.bench`.
from mhmoe.bench.checks import check_against
from mhmoe.bench.command import add_cli
from mhmoe.bench.hardware import MALLOC_ENV, hardware
from mhmoe.bench.impl import Impl, peak_memory_mb
from mhmoe.bench.layers import MODES, bench_layers, build_layer_impls
from mhmoe.bench.peer import hf_implementations, hf_mixtral_block
from mhmoe.bench.report import format_table
from mhmoe.bench.stats import paired_frac_of_gemm, timed_rounds
from mhmoe.bench.train import bench_train
from mhmoe.bench.variants import PAPER_LAYERS, layer_variants, naive_forward

__all__ = ["MALLOC_ENV", "MODES", "PAPER_LAYERS", "Impl", "add_cli", "bench_layers", "bench_train", "build_layer_impls",
           "check_against", "format_table", "hardware", "hf_implementations", "hf_mixtral_block", "layer_variants",
           "naive_forward", "paired_frac_of_gemm", "peak_memory_mb", "timed_rounds"]
