"""Compile the scatter experts' Triton kernels (mhmoe/layers/scatter_kernels.py) for a GPU target without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never builds them: this script sends every kernel,
in every constexpr combination the launchers use and every autotune config, through Triton's real compiler
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas Triton ships) for sm_90 (H100/H200) and prints, per build,
the shared memory, the registers and spills ptxas reports, whether the K loop was pipelined (async copies into
shared memory) and whether the dots became Hopper warp-group MMAs. The arguments are specialised as Triton's
launcher specialises real tensors (pointers and sizes divisible by 16, unit strides constant; experts and top-k
are never specialised), with 96 experts as MH-MoE h=3 at d=768.

    python scripts/compile_scatter_kernels.py [--dtype bfloat16|float32] [--first-config-only] [--arch 90]

Exit status 1 if any build fails for a reason other than running out of a resource (shared memory, registers),
which the autotuner skips at run time. Speed is not measured here.
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

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from mhmoe.layers import scatter_kernels as sk  # noqa: E402

TYPES = {"bfloat16": "bf16", "float32": "fp32"}
INDEX = {"order_ptr": "*i64", "starts_ptr": "*i32", "ends_ptr": "*i32", "weights_ptr": "*fp32", "dwp_ptr": "*fp32"}
ONES = {"stride_xk", "stride_1n", "stride_3n", "stride_ak", "stride_an", "stride_bk", "stride_bn", "stride_dyk",
        "stride_2d", "stride_1n", "stride_2n", "stride_on"}  # unit strides of contiguous tensors: constants at run time

# (kernel, constexpr arguments besides the config's) as the launchers call them.
BUILDS = [
    (sk._swiglu_up_kernel, {"STORE_A": True, "STORE_H": True}),  # training forward
    (sk._swiglu_up_kernel, {"STORE_A": True, "STORE_H": False}),  # no-grad forward
    (sk._scatter_mm_kernel, {"TWO": False, "SCALE": True}),  # forward down projection, weighted, scattered
    (sk._scatter_mm_kernel, {"TWO": True, "SCALE": False}),  # dx rows: gh1 W1^T + gh3 W3^T
    (sk._swiglu_down_bwd_kernel, {"MIN_BLOCK_N": sk.MIN_BLOCK_N}),
    (sk._group_xty_kernel, {"X_GATHER": True, "Y_GATHER": False, "DUAL": True}),  # dW1, dW3
    (sk._group_xty_kernel, {"X_GATHER": False, "Y_GATHER": True, "DUAL": False}),  # dW2
]


def build(kernel, consts: dict, config: triton.Config, dtype: str, arch: int):
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    common = {"UPCAST": False, "ROUND": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
              "E_P2": 128}  # 96 experts (MH-MoE h=3)
    consts = {**consts, **config.kwargs, **{n: v for n, v in common.items() if n in fn.arg_names},
              **{n: 1 for n in ONES if n in fn.arg_names}}
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


def registers(ptx: str, arch: int) -> str:
    """'R regs, S B spilled' from `ptxas -v` on the kernel's PTX (the numbers the GPU launch would get)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?':>3} regs {spill.group(1) if spill else '?':>3} B spilled"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(TYPES), default="bfloat16")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--first-config-only", action="store_true", help="one autotune config per kernel")
    args = p.parse_args(argv)
    dtype, failed = TYPES[args.dtype], 0
    builds = BUILDS + [(sk._sum_k_kernel, {"TOP_K": 3, "BLOCK_R": 16, "BLOCK_D": 128})]
    for kernel, consts in builds:
        configs = kernel.configs if hasattr(kernel, "configs") else [triton.Config({}, num_warps=4, num_stages=1)]
        for config in configs[:1] if args.first_config_only else configs:
            what = f"{kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel.__name__} {consts} {config}"
            t0 = time.perf_counter()
            try:
                k = build(kernel, consts, config, dtype, args.arch)
            except OutOfResources as e:
                print(f"skip (the autotuner would too)  {what}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - any other build failure is a bug
                failed += 1
                print(f"FAILED  {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            ttgir = k.asm["ttgir"]
            print(f"ok {time.perf_counter() - t0:4.1f}s shared {k.metadata.shared // 1024:3d} KiB "
                  f"{registers(k.asm['ptx'], args.arch)} "
                  f"async-copies {ttgir.count('async_copy_global_to_local'):2d} "
                  f"wgmma {ttgir.count('warp_group_dot '):2d}  {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
