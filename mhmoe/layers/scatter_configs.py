"""Which autotune configs of the scatter kernels (scatter_kernels.py) are tried, by dtype and shared memory.

Triton's autotuner compiles every config of a kernel before it times it, and a config whose pipeline buffers do not
fit the GPU's shared memory compiles in full (seconds each) and only then fails to load. `pruner` gives each kernel
an `early_config_prune` that drops, before anything is compiled:
  * configs whose shared memory exceeds the device's budget (`smem_bytes`: an upper bound, below);
  * in float32, tiles of more than 64 x 64 outputs. At torch's default matmul precision the fp32 dots are FMA
    loops whose operand fragments live in registers; built for sm_90 the larger fp32 tiles spill up to 44 KB
    (128 x 128 swiglu_up, group_xty) and the 64 x 64 ones at most 132 B (scripts/compile_scatter_kernels.py,
    2026-12-07). dispatch="auto" runs no fp32 scatter kernel (layers/experts.py); fp32 is for dispatch="scatter"
    and the tests, which then compile one or two configs per kernel instead of five.
The 16-bit dtypes keep every config that fits: the configs were chosen for bf16 on Hopper.

Shared memory: each loop iteration (a stage) loads one BLOCK_K-deep tile of every operand into shared memory, and
the pipeline holds at most num_stages stages, so the estimate is num_stages x the bytes of one stage's tiles.
Triton 3.6 allocates exactly that for the tensor-core (wgmma) loops on sm_90, and less for the FMA loops of
float32 (num_stages - 1) and for group_xty's loop over an expert's rows (two stages): measured against the real
compiler by scripts/compile_scatter_kernels.py, which builds every config this keeps and fails on any build over
the budget. The epilogues reuse the pipeline's buffers.

The budget is the device's opt-in maximum per block (what Triton checks at load: `max_shared_mem`); without a
GPU (the compile script, the tests), sm_90's: 232,448 bytes (227 KiB, H100/H200). `build_problems` is the compile
script's verdict on one real build: over the budget, or spilling more than MAX_SPILL bytes of registers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

SM90_SMEM_BYTES = 232_448  # shared memory one block may use on sm_90 (227 KiB, opt-in): H100, H200
FP32_MAX_TILE = 64 * 64  # BLOCK_M x BLOCK_N outputs of a float32 config (module docstring)
# Register spill stores a build may have: a few registers stored once to L1-cached local memory cost little; the
# whole-tile spills of fp32 FMA tiles (tens of KB) cost every loop iteration.
MAX_SPILL = 1024


@dataclass(frozen=True)
class Tiles:
    """What one pipeline stage of a kernel loads: `stage(BLOCK_M, BLOCK_N, BLOCK_K, constexprs)` elements of the
    dtype of the pointer argument `dtype_arg` (the kernels load every operand in that one dtype)."""

    dtype_arg: str
    stage: Callable[[int, int, int, dict], int]


def smem_bytes(tiles: Tiles, block_m: int, block_n: int, block_k: int, num_stages: int, consts: dict,
               itemsize: int) -> int:
    """Upper bound on the shared memory of one config's build (module docstring): num_stages x one stage."""
    return max(1, num_stages) * tiles.stage(block_m, block_n, block_k, consts) * itemsize


def rejection(tiles: Tiles, config, consts: dict, dtype: torch.dtype, budget: int) -> str | None:  # noqa: ANN001
    """Why `config` (a triton.Config) is not tried for operands of `dtype`, or None when it is."""
    kw = config.kwargs
    m, n, k = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    need = smem_bytes(tiles, m, n, k, config.num_stages, consts, dtype.itemsize)
    if need > budget:
        return f"shared memory: up to {need:,} bytes > {budget:,}"
    if dtype == torch.float32 and m * n > FP32_MAX_TILE:
        return f"float32 tile {m} x {n} over 64 x 64: FMA dots spill"
    return None


@functools.lru_cache(maxsize=None)
def smem_budget(device_index: int | None) -> int:
    """The budget on CUDA device `device_index`, or sm_90's without one (None): the number Triton itself compares
    a loaded kernel's shared memory with before it raises OutOfResources."""
    if device_index is None:
        return SM90_SMEM_BYTES
    from triton.compiler.compiler import max_shared_mem

    return int(max_shared_mem(device_index))


def prune(tiles: Tiles, configs: list, nargs: dict, budget: int | None = None, **consts) -> list:
    """The configs to try for a launch (nargs: the kernel's arguments by name; consts: its constexpr keywords).
    Never empty: when none is kept, the one with the least shared memory (the autotuner refuses an empty list,
    and a launch that cannot run should fail on its own terms)."""
    t = nargs[tiles.dtype_arg]
    if budget is None:
        budget = smem_budget(t.device.index if t.device.type == "cuda" else None)
    kept = [c for c in configs if rejection(tiles, c, consts, t.dtype, budget) is None]
    if kept:
        return kept
    kw = lambda c: c.kwargs  # noqa: E731
    return [min(configs, key=lambda c: smem_bytes(tiles, kw(c)["BLOCK_M"], kw(c)["BLOCK_N"], kw(c)["BLOCK_K"],
                                                  c.num_stages, consts, t.dtype.itemsize))]


def pruner(tiles: Tiles) -> dict:
    """`prune_configs_by` for triton.autotune: `prune` with this kernel's tiles."""
    return {"early_config_prune": lambda configs, nargs, **consts: prune(tiles, configs, nargs, **consts)}


def build_problems(metadata, spilled: int | None, smem_limit: int = SM90_SMEM_BYTES,  # noqa: ANN001
                   max_spill: int = MAX_SPILL) -> list[str]:
    """Why a compiled kernel would not be accepted, [] when it fits: `metadata` is its compiled metadata (`shared`:
    bytes of shared memory), `spilled` the bytes of spill stores ptxas reported (None: ptxas printed no count, so
    nothing vouches for its registers)."""
    problems = []
    if metadata.shared > smem_limit:
        problems.append(f"shared memory {metadata.shared:,} bytes > {smem_limit:,} (it would fail to load)")
    if spilled is None:
        problems.append("ptxas reported no spill count")
    elif spilled > max_spill:
        problems.append(f"{spilled:,} bytes of registers spilled > {max_spill:,}")
    return problems
