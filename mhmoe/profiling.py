"""Profiler labels: named ranges in the model code that let torch.profiler split a training step into its parts.

    with label(ATTENTION):
        y = ...

`label(name)` is `torch.profiler.record_function(name)` while a profiler records eager code, and one shared
`nullcontext` otherwise:
  * no profiler: one C call (is the profiler on?) and no record is made; torch's own record_function would enter
    and leave a dispatcher op (about 5 us) even with no profiler running;
  * under torch.compile: `torch.compiler.is_compiling()` is a constant True while dynamo traces, so the traced
    branch is the nullcontext: no graph break, no guard on the profiler's state (switching the profiler on or off
    never recompiles). Dynamo itself would not break on a bare record_function either (torch 2.13 treats it as a
    nullcontext unless torch._dynamo.config.capture_profiler_record_function is set, and inductor drops the
    captured ops), so compiled regions carry no labels either way; `mhmoe.bench.profile` attributes their kernels
    by name.
The labels are always in place: no setting switches them on, and nothing accumulates between calls.

Which label names which part of a step (`PARTS`, `LABEL_PART`) and the rules for what no label covers are
`mhmoe.bench.profile`'s: this module only names the ranges, so that every layer can import it (the bottom of the
layering, beside mhmoe.errors).
"""

from __future__ import annotations

import contextlib

import torch

# Ranges in the model (mhmoe.model, mhmoe.layers).
BLOCK = "mhmoe.block"  # one Transformer block; what no finer label covers in it (the residual adds) is "other"
ATTENTION = "mhmoe.attention"  # qkv projection, RoPE, scaled-dot-product attention, output projection
NORM = "mhmoe.norm"  # every RMSNorm (pre-attention, pre-FFN, final)
DENSE_FFN = "mhmoe.dense_ffn"  # the dense SwiGLU FFN of a block
SHARED_EXPERT = "mhmoe.shared_expert"  # the always-on SwiGLU beside the routed experts (counted as dense FFN)
HEAD_MERGE = "mhmoe.head_merge"  # MH-MoE's head projection and split, the concat and merge projection
ROUTER = "mhmoe.router"  # gate matmul, scoring, top-k
ROUTER_AUX = "mhmoe.router_aux"  # the aux losses and routing statistics of a MoE layer (counted as router)
EXPERTS = "mhmoe.experts"  # dispatch (sort, gathers), expert GEMMs, combine: split by op (mhmoe.bench.profile)
# Ranges around the model (mhmoe.training.step, mhmoe.bench).
MODEL = "mhmoe.model"  # one forward of the whole model: what no finer label covers is the LM head and loss
OPTIMIZER = "mhmoe.optimizer"  # gradient clipping and the optimizer's step and zero_grad
STEP = "mhmoe.step"  # one optimizer step of the profiled training loop

LABELS = (BLOCK, ATTENTION, NORM, DENSE_FFN, SHARED_EXPERT, HEAD_MERGE, ROUTER, ROUTER_AUX, EXPERTS, MODEL,
          OPTIMIZER, STEP)

_OFF = contextlib.nullcontext()
_profiler_on = getattr(torch.autograd, "_profiler_enabled", None) or torch._C._autograd._profiler_enabled


def label(name: str) -> contextlib.AbstractContextManager:
    """A profiler range named `name` when a profiler records eager code, else a no-op (module docstring)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()  # what dynamo traces: a fresh nullcontext, no global to guard on
    if not _profiler_on():
        return _OFF
    return torch.profiler.record_function(name)
