"""Compile the scatter experts' Triton kernels (mhmoe/layers/scatter_kernels.py) for a GPU target without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never builds them: this script sends every kernel,
in every constexpr combination the launchers use and every autotune config the kernel's pruner keeps for the dtype
(mhmoe/layers/scatter_configs.py), through Triton's real compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
ptxas Triton ships) for sm_90 (H100/H200) and prints, per build, the shared memory, the registers and spills ptxas
reports, whether the K loop was pipelined (async copies into shared memory) and whether the dots became Hopper
warp-group MMAs. The arguments are specialised as Triton's launcher specialises the real tensors of each launch
(pointers and sizes divisible by 16, the strides that are 1 in that launch constant: the backward's dx launch
reads W1 and W3 transposed, so there the K stride of the weights is 1 and the N stride is not; experts and top-k
are never specialised), with 96 experts as MH-MoE h=3 at d=768.

    python scripts/compile_scatter_kernels.py [--dtype bfloat16|float32] [--first-config-only] [--arch 90]
                                              [--smem-limit 232448] [--max-spill 1024]

Each line: `ok` (a build that fits), `pruned` (a config the autotuner would not try: its reason), or `FAILED` (a
build that does not compile, or whose shared memory exceeds --smem-limit (default sm_90's 232,448 bytes: it would
compile and then fail to load), or that spills more than --max-spill bytes of registers (default 1024: a few
registers stored once to L1-cached local memory cost little; the whole-tile spills of fp32 FMA tiles, tens of KB,
cost every iteration), or whose spills ptxas did not report). Exit status 1 if any build FAILED: every build this
accepts fits. Speed is not measured here.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mhmoe.layers import scatter_kernels as sk  # noqa: E402
from mhmoe.layers.scatter_configs import (  # noqa: E402
    MAX_SPILL,
    SM90_SMEM_BYTES,
    build_problems,
    prune,
    rejection,
)

TYPES = {"bfloat16": "bf16", "float32": "fp32"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INDEX = {"order_ptr": "*i64", "starts_ptr": "*i32", "ends_ptr": "*i32", "weights_ptr": "*fp32", "dwp_ptr": "*fp32"}

# The strides that are 1 in each launch (Triton makes an argument of value 1 a constant): the tensors' unit strides.
UP_ONES = {"stride_xk", "stride_1n", "stride_3n"}  # x [N, Din] (a view), W1/W3 [E, Din, F]
MM_FWD_ONES = {"stride_ak", "stride_an", "stride_bk", "stride_bn"}  # a [S, F], W2 [E, F, Din] (b = a)
MM_DX_ONES = {"stride_ak", "stride_ak2", "stride_bk", "stride_bk2"}  # gh1/gh3 [S, F], W1^T/W3^T: [E, F, Din] views
BWD_ONES = {"stride_dyk", "stride_2d"}  # dY [N, Din], W2 [E, F, Din]
XTY_ONES = {"stride_xk", "stride_1n", "stride_2n", "stride_on"}  # X, Y, Y2 row-major; out [E, MX, NY]

# (kernel, constexpr arguments besides the config's, unit strides, its tiles) as the launchers call them.
BUILDS = [
    (sk._swiglu_up_kernel, {"STORE_A": True, "STORE_H": True}, UP_ONES, sk.UP_TILES),  # training forward
    (sk._swiglu_up_kernel, {"STORE_A": True, "STORE_H": False}, UP_ONES, sk.UP_TILES),  # no-grad forward
    (sk._scatter_mm_kernel, {"TWO": False, "SCALE": True}, MM_FWD_ONES, sk.MM_TILES),  # down projection, scattered
    (sk._scatter_mm_kernel, {"TWO": True, "SCALE": False}, MM_DX_ONES, sk.MM_TILES),  # dx rows: gh1 W1^T + gh3 W3^T
    (sk._swiglu_down_bwd_kernel, {"MIN_BLOCK_N": sk.MIN_BLOCK_N}, BWD_ONES, sk.BWD_TILES),
    (sk._group_xty_kernel, {"X_GATHER": True, "Y_GATHER": False, "DUAL": True}, XTY_ONES, sk.XTY_TILES),  # dW1, dW3
    (sk._group_xty_kernel, {"X_GATHER": False, "Y_GATHER": True, "DUAL": False}, XTY_ONES, sk.XTY_TILES),  # dW2
]


class _Operand:
    """What the pruner reads of a launch's operand: its dtype (and that no GPU holds it)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.device = dtype, torch.device("cpu")


def build(kernel, consts: dict, ones: set[str], config: triton.Config, dtype: str, arch: int):
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    common = {"UPCAST": False, "ROUND": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
              "E_P2": 128}  # 96 experts (MH-MoE h=3)
    consts = {**consts, **config.kwargs, **{n: v for n, v in common.items() if n in fn.arg_names},
              **{n: 1 for n in ones if n in fn.arg_names}}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        signature[name] = INDEX.get(name, f"*{dtype}" if name.endswith("_ptr") else "i32")
        if name not in fn.do_not_specialize and i not in fn.do_not_specialize:  # the rest: divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def registers(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, bytes of spill stores) from `ptxas -v` on the kernel's PTX (the numbers the GPU launch would
    get); None for a number ptxas did not print."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(TYPES), default="bfloat16")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--first-config-only", action="store_true", help="one autotune config per kernel (the first kept)")
    p.add_argument("--smem-limit", type=int, default=SM90_SMEM_BYTES,
                   help=f"shared memory per block in bytes (default {SM90_SMEM_BYTES:,}: sm_90's opt-in maximum)")
    p.add_argument("--max-spill", type=int, default=MAX_SPILL,
                   help=f"bytes of register spill stores a build may have (default {MAX_SPILL})")
    args = p.parse_args(argv)
    dtype, failed = TYPES[args.dtype], 0
    builds = BUILDS + [(sk._sum_k_kernel, {"TOP_K": 3, "BLOCK_R": 16, "BLOCK_D": 128}, set(), None)]
    for kernel, consts, ones, tiles in builds:
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        configs = kernel.configs if hasattr(kernel, "configs") else [triton.Config({}, num_warps=4, num_stages=1)]
        kept = configs
        if tiles is not None:  # what the autotuner would try on a GPU with --smem-limit of shared memory
            operand = {tiles.dtype_arg: _Operand(DTYPES[dtype])}
            kept = prune(tiles, configs, operand, budget=args.smem_limit, **consts)
            for config in configs:
                if config not in kept:
                    print(f"pruned ({rejection(tiles, config, consts, DTYPES[dtype], args.smem_limit)})  "
                          f"{name} {consts} {config}")
        for config in kept[:1] if args.first_config_only else kept:
            what = f"{name} {consts} {config}"
            t0 = time.perf_counter()
            try:
                k = build(kernel, consts, ones, config, dtype, args.arch)
            except Exception as e:  # noqa: BLE001 - any build failure is a bug
                failed += 1
                print(f"FAILED  {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            regs, spilled = registers(k.asm["ptx"], args.arch)
            ttgir = k.asm["ttgir"]
            problems = build_problems(k.metadata, spilled, args.smem_limit, args.max_spill)
            failed += bool(problems)
            print(f"{'FAILED' if problems else 'ok'} {time.perf_counter() - t0:4.1f}s shared "
                  f"{k.metadata.shared // 1024:3d} KiB {regs if regs is not None else '?':>3} regs "
                  f"{spilled if spilled is not None else '?':>5} B spilled "
                  f"async-copies {ttgir.count('async_copy_global_to_local'):2d} "
                  f"wgmma {ttgir.count('warp_group_dot '):2d}  {what}"
                  + (f": {'; '.join(problems)}" if problems else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
