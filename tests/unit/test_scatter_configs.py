"""Which autotune configs the scatter kernels try (mhmoe/layers/scatter_configs.py), and the compile script's verdict
on a build, without a GPU: the shared-memory estimate bounds what Triton's compiler allocated (measured by
scripts/compile_scatter_kernels.py), the pruners drop every config over the budget and the spilling fp32 tiles and
never return nothing, the autotuners use them, and a build over 232,448 bytes or with large spills is refused."""

from types import SimpleNamespace

import pytest
import torch
import triton

from mhmoe.layers import scatter_kernels as sk
from mhmoe.layers.scatter_configs import (
    FP32_MAX_TILE,
    MAX_SPILL,
    SM90_SMEM_BYTES,
    build_problems,
    prune,
    smem_bytes,
)

KIB = 1024
# (tiles, constexprs, configs) of each launch variant, as scripts/compile_scatter_kernels.py builds them.
LAUNCHES = {
    "swiglu_up": (sk.UP_TILES, {"STORE_H": True}, sk.DUAL_CONFIGS),
    "scatter_mm": (sk.MM_TILES, {"TWO": False}, sk.ROW_CONFIGS),
    "scatter_mm-dx": (sk.MM_TILES, {"TWO": True}, sk.ROW_CONFIGS),
    "swiglu_down_bwd": (sk.BWD_TILES, {}, sk.BWD_CONFIGS),
    "group_xty-dual": (sk.XTY_TILES, {"DUAL": True}, sk.XTY_CONFIGS),
    "group_xty": (sk.XTY_TILES, {"DUAL": False}, sk.XTY_CONFIGS),
}
# Shared memory (KiB) Triton 3.6 allocated for sm_90, by scripts/compile_scatter_kernels.py (2026-12-07): launch,
# dtype, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) -> KiB. The fp32 dx builds over 227 KiB are the ones that
# compiled and then failed to load on the GPU (measured before the script built the dx launch with its real
# strides; the tiles set the shared memory, the strides only the address arithmetic: the bf16 dx builds allocate
# the same with either).
MEASURED = {
    ("swiglu_up", "bf16", (128, 128, 64, 8, 3)): 144, ("swiglu_up", "bf16", (64, 64, 64, 4, 4)): 96,
    ("swiglu_up", "fp32", (128, 128, 64, 8, 3)): 192, ("swiglu_up", "fp32", (64, 64, 64, 4, 4)): 144,
    ("scatter_mm", "bf16", (128, 64, 64, 4, 4)): 96, ("scatter_mm", "fp32", (128, 64, 64, 4, 4)): 144,
    ("scatter_mm-dx", "bf16", (128, 128, 64, 8, 3)): 192, ("scatter_mm-dx", "bf16", (128, 64, 64, 4, 4)): 192,
    ("scatter_mm-dx", "fp32", (128, 128, 64, 8, 3)): 256, ("scatter_mm-dx", "fp32", (128, 64, 64, 4, 4)): 288,
    ("scatter_mm-dx", "fp32", (64, 128, 64, 4, 4)): 288, ("scatter_mm-dx", "fp32", (64, 64, 64, 4, 3)): 128,
    ("swiglu_down_bwd", "bf16", (128, 64, 64, 8, 3)): 72, ("swiglu_down_bwd", "fp32", (64, 64, 64, 4, 4)): 96,
    ("group_xty-dual", "bf16", (128, 128, 64, 8, 3)): 96, ("group_xty-dual", "fp32", (64, 64, 64, 4, 3)): 48,
    ("group_xty", "bf16", (128, 128, 64, 8, 3)): 64,
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _config(m, n, k, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)


def _shape(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def _operand(dtype):
    return {name: SimpleNamespace(dtype=dtype, device=torch.device("cpu")) for name in ("x_ptr", "a1_ptr", "dy_ptr")}


@pytest.mark.parametrize("key", sorted(MEASURED))
def test_the_estimate_bounds_what_the_compiler_allocated(key):
    launch, dtype, shape = key
    tiles, consts, _ = LAUNCHES[launch]
    m, n, k, _, stages = shape
    assert smem_bytes(tiles, m, n, k, stages, consts, DTYPES[dtype].itemsize) >= MEASURED[key] * KIB


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_pruning_keeps_only_configs_within_the_budget(launch, dtype):
    tiles, consts, shapes = LAUNCHES[launch]
    configs = [_config(*s) for s in shapes]
    kept = prune(tiles, configs, _operand(DTYPES[dtype]), budget=SM90_SMEM_BYTES, **consts)
    assert kept and all(c in configs for c in kept)
    for c in kept:
        m, n, k, _, stages = _shape(c)
        assert smem_bytes(tiles, m, n, k, stages, consts, DTYPES[dtype].itemsize) <= SM90_SMEM_BYTES
        assert dtype == "bf16" or m * n <= FP32_MAX_TILE
    # Every config the compiler was measured to put over sm_90's budget is dropped before it is compiled.
    over = [s for (la, dt, s), kib in MEASURED.items() if (la, dt) == (launch, dtype) and kib * KIB > SM90_SMEM_BYTES]
    assert not {_shape(c) for c in kept} & set(over)
    if dtype == "bf16":  # the configs were chosen for bf16 on Hopper: all fit
        assert len(kept) == len(configs)


def test_pruning_by_dtype_and_budget_drops_what_it_says():
    tiles, consts, shapes = LAUNCHES["scatter_mm-dx"]
    configs = [_config(*s) for s in shapes]
    fp32 = [_shape(c) for c in prune(tiles, configs, _operand(torch.float32), budget=SM90_SMEM_BYTES, **consts)]
    assert fp32 == [(64, 64, 64, 4, 3)]  # the 256-288 KiB builds and the spilling 128-wide tiles are gone
    # A device with less shared memory (an A100's 163 KiB) drops the 192 KiB bf16 configs too.
    a100 = [_shape(c) for c in prune(tiles, configs, _operand(torch.bfloat16), budget=166_912, **consts)]
    assert a100 == [(64, 64, 64, 4, 3), (128, 128, 32, 8, 4)]
    # Nothing fits: the least demanding config is left (the autotuner refuses an empty list).
    none = prune(tiles, configs, _operand(torch.bfloat16), budget=1024, **consts)
    assert [_shape(c) for c in none] == [(64, 64, 64, 4, 3)]


def test_the_autotuners_prune_with_their_kernel_tiles():
    """Each kernel's autotuner calls its pruner (on a GPU; under the interpreter it has one config and never does),
    with the launch's constexprs: the dx launch's two products count."""
    for kernel, tiles in ((sk._swiglu_up_kernel, sk.UP_TILES), (sk._scatter_mm_kernel, sk.MM_TILES),
                          (sk._swiglu_down_bwd_kernel, sk.BWD_TILES), (sk._group_xty_kernel, sk.XTY_TILES)):
        assert kernel.early_config_prune is not None, kernel.fn.__name__
        assert tiles.dtype_arg in kernel.arg_names
    configs = [_config(*s) for s in sk.ROW_CONFIGS]
    nargs = _operand(torch.float32)
    one = sk._scatter_mm_kernel.early_config_prune(configs, nargs, TWO=False, SCALE=True)
    two = sk._scatter_mm_kernel.early_config_prune(configs, nargs, TWO=True, SCALE=False)
    assert [_shape(c) for c in one] == [_shape(c) for c in two] == [(64, 64, 64, 4, 3)]
    assert len(sk._scatter_mm_kernel.early_config_prune(configs, _operand(torch.bfloat16), TWO=True)) == 5


def test_build_problems_of_a_fake_compiled_kernel():
    fits = SimpleNamespace(shared=SM90_SMEM_BYTES)
    assert build_problems(fits, 0) == [] and build_problems(fits, MAX_SPILL) == []
    over = build_problems(SimpleNamespace(shared=SM90_SMEM_BYTES + 1), 0)
    assert over == ["shared memory 232,449 bytes > 232,448 (it would fail to load)"]
    assert build_problems(SimpleNamespace(shared=288 * KIB), 41_776) == [
        "shared memory 294,912 bytes > 232,448 (it would fail to load)",
        "41,776 bytes of registers spilled > 1,024"]
    assert build_problems(fits, None) == ["ptxas reported no spill count"]
    assert build_problems(SimpleNamespace(shared=100_000), 0, smem_limit=99_000)  # another device's budget
