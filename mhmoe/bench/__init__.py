"""`mhmoe bench`: the speed of the layer family and of whole-model training, against the peer users would pick.

    mhmoe bench layers [--json] [--json-out FILE] [--tokens 4096] [--dim 768] [--hidden-dim 2048]
                       [--num-experts 8] [--threads 1] [--dtypes float32,bfloat16]
                       [--impls auto,sorted,grouped_mm,naive,intra-op] [--no-hf]
                       [--rounds 6] [--target-ci 0.03] [--max-seconds 300] [--device cpu] [--peak-tflops X]
    mhmoe bench train  [--json] [--json-out FILE] [--preset tiny] [--variants dense,smoe,...] [--threads 0]
                       [--compile [MODE]] [--profile DIR] [--profile-variants smoe,...] [--profile-steps 2]
                       [--rounds 6] [--target-ci 0.03] [--max-seconds 300] [--device cpu] [--peak-tflops X]

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

Method (the machines are noisy): everything lives in one process at `--threads` threads on `--device`; after the
checks and one warm-up, rounds run every (implementation, mode) once in a fresh random order. Every comparison is
formed inside a round, from two timings taken seconds apart, and summarised by the median over rounds with a
distribution-free 95% interval (stats.py): `ratio_to_smoe` / `ratio_ci`, `ratio_to_sorted` /
`ratio_to_sorted_ci`, `frac_of_gemm` / `frac_of_gemm_ci`. At least `--rounds` rounds run; more follow in batches
until every interval lies within +-`--target-ci` of its median or `--max-seconds` of rounds have passed; each
record says how many rounds it got and whether its intervals met the target (`target_reached`), and the meta
says so per sampling loop. fwd = forward under no_grad; fwd+bwd = forward, then y.backward(g) for a contiguous
random g with x.requires_grad (dX included), gradients set to None between iterations. On CUDA each call is
followed by a synchronize before the clock is read. GFLOP/s use the analytic matmul FLOPs of `mhmoe.complexity`
(x3 for fwd+bwd); `mfu` divides them by `--peak-tflops` (mfu.py). `frac_of_gemm` compares with one plain
[T, D] x [D, F] matmul (fwd: 1 matmul; fwd+bwd: its 3) timed in the same rounds: the layer's rate / the GEMM's
rate in each round, so a slow stretch of the shared machine hits both alike. It is the layer's whole work, head,
router and dispatch included, as a fraction of what the machine's GEMM does. `peak_mem_mb` is the peak of live
tensor memory (parameters included) during one untimed pass (device.py).

`--impls auto` adds, for each MoE layer, the implementation dispatch="auto" picks on this device and dtype (on
CUDA in bf16: grouped_mm; on CPU: sorted), flags those records (and the dense layer's) `auto`, and gives every
record `ratio_to_smoe_auto` (time / SMoE-on-auto's) and `ratio_to_dense` (time / the dense layer's), with intervals.

Train: optimizer steps of the preset's model per variant on random tokens, each as `mhmoe train` runs it
(`train.training_step`: the schedule's learning rate, every micro-batch of tokens_per_step under the run's autocast,
gradient clipping, the routing monitor and the step's one host transfer, then AdamW), sampled like the layers;
tokens/s = tokens_per_step / median step time, `tok_s_x_smoe` its ratio to SMoE's in the same rounds. The tokens
are drawn on the device (no corpus, no host copy). `--compile` is the preset's compile mode by default (as `mhmoe
train`), `off`, or `on` (bare `--compile`); `warmup_s` records the untimed warm-up steps (two when compiling, one
otherwise), which is where the compilation happens. Models are built, warmed up and timed alone for 3 steps one
after another (records with `timing: "alone"`: tokens/s and MFU, no comparison), before the shuffled rounds of all
of them (`timing: "rounds"`, with `alone_ms`); so a run cut short, or one whose compilation outlasts its time,
still has the models it reached. `--profile DIR`: after the timing, `--profile-steps` steps of each
`--profile-variants` variant under torch.profiler, their time split into attention, norms, router, MoE
permutation, expert GEMMs, dense FFN, head/merge, LM head + loss, optimizer and other (profile.py, with the rules
for what no label covers): DIR/profile.md, DIR/profile.json, DIR/trace.json.

`--json-out FILE` (both): the JSON of `--json`, written to FILE as the run goes and rewritten atomically after
each model timed alone, at each look at the intervals, after each dtype and at the end; `meta.progress` says how
far it got (`stage`) and whether it finished (`complete`). A run killed at any point leaves a valid file with what
it had measured; stdout is free for whatever a library prints there.

Files: stats.py (rounds, intervals, sampling), layers.py and train.py (what is timed), profile.py (a step's time
by part), variants.py (the layers and the naive loop), peer.py (transformers' Mixtral block), checks.py (equal
outputs and gradients), impl.py (a timed callable), device.py, mfu.py, hardware.py (what ran it), report.py
(tables); the flags live in mhmoe/cli/bench.py; the labels in the model code in mhmoe/profiling.py.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, N = T*H sub-tokens.
"""

# The names that tests, benchmarks/*.py and `mhmoe.cli` import from `mhmoe.bench`.
from mhmoe.bench.checks import check_against
from mhmoe.bench.device import peak_memory_mb
from mhmoe.bench.hardware import MALLOC_ENV, hardware
from mhmoe.bench.impl import Impl
from mhmoe.bench.layers import MODES, bench_layers, build_layer_impls
from mhmoe.bench.mfu import mfu, peak_tflops, run_throughput
from mhmoe.bench.peer import hf_implementations, hf_mixtral_block
from mhmoe.bench.profile import PARTS, profile_steps
from mhmoe.bench.report import format_table
from mhmoe.bench.stats import (
                               MedianCI,
                               Ratio,
                               median_ci,
                               order_statistic_indices,
                               paired_frac_of_gemm,
                               sample_rounds,
                               timed_rounds,
)
from mhmoe.bench.train import bench_train
from mhmoe.bench.variants import PAPER_LAYERS, layer_variants, naive_forward

__all__ = ["MALLOC_ENV", "MODES", "PAPER_LAYERS", "PARTS", "Impl", "MedianCI", "Ratio", "bench_layers",
           "bench_train", "build_layer_impls", "check_against", "format_table", "hardware", "hf_implementations",
           "hf_mixtral_block", "layer_variants", "median_ci", "mfu", "naive_forward", "order_statistic_indices",
           "paired_frac_of_gemm", "peak_memory_mb", "peak_tflops", "profile_steps", "run_throughput",
           "sample_rounds", "timed_rounds"]
