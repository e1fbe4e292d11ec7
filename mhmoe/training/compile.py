"""How the training forward (model + loss) runs: eagerly, under torch.compile, or compiled into CUDA graphs.

TrainConfig.compile names the mode; `resolve_compile` decides what it means for a device, `compile_model` applies
it. The one rule behind both: a step is *sync-free* when its forward traces as one graph, with no host sync and no
data-dependent shape, which holds unless an MoE layer's expert dispatch runs eagerly:
    sorted      (auto's choice on CPU, and on CUDA outside bfloat16) reads the expert group sizes on the host
                once per layer and runs eagerly under torch.compile (layers/compile_boundary.py)
    grouped_mm  sync-free in bfloat16 only: in other dtypes torch's grouped GEMM syncs and runs eagerly
    scatter     sync-free by its design (the Triton experts' dispatch, layers/scatter_experts.py); listed here
                ahead of it, so FFNConfig.dispatch="scatter" gets fullgraph and CUDA graphs once it exists
    BitNet's experts run through `gathered_experts`, eager whatever the dispatch.
Dense models are always sync-free. A sync-free step compiles with fullgraph=True on one process (a graph break
would then be an error, not a silent slowdown); under torchrun DDP and FSDP2 split the graph themselves.

    "auto"        "on" on CUDA; "off" on CPU, where the sorted experts stay eager and compiling costs about a
                  minute per model shape for +3-9% (benchmarks/RESULTS.md)
    "off"         eager
    "on"          torch.compile, static shapes (dynamic=False: every micro-batch has the same shape)
    "cudagraphs"  torch.compile mode "reduce-overhead": the compiled forward and backward replay as CUDA graphs.
                  Valid only for a sync-free step on one CUDA process (a one-line ConfigError otherwise). The
                  step keeps nothing a later replay overwrites: mhmoe.training.step marks each micro-batch as a
                  new CUDA-graph step, reduces the outputs it keeps into tensors of its own before the next one, and
                  keeps the gradients allocated (zeroed, not freed) so that they accumulate in place instead of
                  aliasing the backward graph's output buffers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mhmoe.errors import ConfigError
from mhmoe.layers.experts import resolve_dispatch
from mhmoe.training.config import TrainConfig

CompileMode = Literal["off", "on", "cudagraphs"]  # what TrainConfig.compile resolves to

# The expert implementations that trace whole, in the compute dtypes they do it in (None: every dtype).
SYNC_FREE_DISPATCH: dict[str, torch.dtype | None] = {"grouped_mm": torch.bfloat16, "scatter": None}


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the training forward's matmuls run in: bfloat16 under autocast (dtype=bfloat16), else float32."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def sync_break(cfg: TrainConfig, device: torch.device | str) -> str | None:
    """Why the training forward of `cfg` on `device` is not sync-free (one graph, no host sync), with the fix;
    None when it is."""
    ffn = cfg.model.moe_ffn
    if ffn.kind != "moe":
        return None
    if cfg.model.bitnet:
        return "model.bitnet=true runs its experts eagerly (gathered_experts)"
    dtype = compute_dtype(cfg)
    impl = resolve_dispatch(ffn.dispatch, torch.device(device), ffn.head_dim, ffn.hidden_dim, dtype)
    if impl not in SYNC_FREE_DISPATCH:
        return (f"model.moe_ffn.dispatch={ffn.dispatch!r} runs the {impl!r} experts here, which sync with the host "
                "once per MoE layer (set model.moe_ffn.dispatch=grouped_mm and dtype=bfloat16)")
    needs = SYNC_FREE_DISPATCH[impl]
    if needs is not None and dtype != needs:
        return (f"model.moe_ffn.dispatch={impl!r} is sync-free in {str(needs).removeprefix('torch.')} only, and "
                f"dtype={cfg.dtype} (set dtype={str(needs).removeprefix('torch.')})")
    return None


def resolve_compile(cfg: TrainConfig, device: torch.device | str, world: int = 1) -> CompileMode:
    """What TrainConfig.compile means on `device` for a run of `world` processes: "auto" -> "on" on CUDA, "off"
    elsewhere; "cudagraphs" is checked (CUDA, one process, a sync-free step: ConfigError naming the field and the
    fix otherwise); "off" and "on" as given."""
    device = torch.device(device)
    mode = cfg.compile
    if mode == "auto":
        return "on" if device.type == "cuda" else "off"
    if mode == "cudagraphs":
        if device.type != "cuda":
            raise ConfigError(f"TrainConfig.compile: 'cudagraphs' needs a CUDA device, this run is on {device.type}; "
                              "use compile=on")
        if world > 1:
            raise ConfigError(f"TrainConfig.compile: 'cudagraphs' runs on one process, this run has {world}; use "
                              "compile=on under torchrun")
        reason = sync_break(cfg, device)
        if reason is not None:
            raise ConfigError(f"TrainConfig.compile: 'cudagraphs' needs a sync-free step, but {reason}; or use "
                              "compile=on")
    return mode


def compile_model(model: nn.Module, cfg: TrainConfig, device: torch.device | str, world: int = 1,
                  backend: str = "inductor") -> nn.Module:
    """`model` as TrainConfig.compile says for `device` (`resolve_compile`): itself ("off"), or torch.compile'd
    with static shapes, fullgraph=True when the step is sync-free on one process, mode "reduce-overhead" for
    "cudagraphs". backend: torch.compile's (tests use "aot_eager", which needs no C++ toolchain)."""
    mode = resolve_compile(cfg, device, world)
    if mode == "off":
        return model
    fullgraph = world == 1 and sync_break(cfg, device) is None
    return torch.compile(model, fullgraph=fullgraph, dynamic=False, backend=backend,
                         mode="reduce-overhead" if mode == "cudagraphs" else None)
