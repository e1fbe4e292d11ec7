"""CPU threading of the experts: T contiguous ranges of experts run concurrently on T worker threads.

With T > 1 torch threads, "inter-expert" runs T contiguous ranges of experts (about S'/T rows each) concurrently in T
worker threads of one intra-op thread each, instead of one expert after another with every matmul split T ways
("intra-op"). The small matmuls of many fine experts (MH-MoE h=3: 96 experts of [~384 x D/3] x [D/3 x F']) gain
little from intra-op threads. Each range adds into its own output buffer, summed after the join, so the result is
deterministic for a given T. "auto" picks inter-expert on CPU when every worker gets at least
`MIN_EXPERTS_PER_WORKER` experts.

Tools that watch ops are thread-local: a TorchDispatchMode (torch.utils.flop_counter.FlopCounterMode, the debug
modes), a TorchFunctionMode, and the autograd profiler (torch.profiler) see only the thread that entered them, so
work on the pool's threads would escape them (FlopCounterMode counted 2.42M of MH-MoE h=2's 9.50M FLOPs/token at
d=768 with 2 threads). While one is active the experts run on the caller's thread (`tools_watching`).

Shape legend: S' rows after capacity drops, T threads.
"""

from __future__ import annotations

import os
import threading as _threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode, is_in_torch_dispatch_mode

MIN_EXPERTS_PER_WORKER = 16  # "auto": inter-expert threading only when every worker gets at least this many experts
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = _threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has the pool objects but none of their threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of `workers` threads, each set to one intra-op thread (created once per size)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            caller_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix=f"mhmoe-experts{workers}")
            started = _threading.Barrier(workers)  # every init task on its own thread: all `workers` threads exist

            def init() -> None:
                # torch sets a thread's OpenMP/MKL thread count from the process default at its first op; take
                # that first (get_num_threads), then override it for this thread only.
                torch.get_num_threads()
                torch.set_num_threads(1)
                started.wait()

            for f in [pool.submit(init) for _ in range(workers)]:
                f.result()
            # set_num_threads also sets the default that threads created later start with: give it back.
            torch.set_num_threads(caller_threads)
            _POOLS[workers] = pool
        return pool


def expert_ranges(sizes: list[int], parts: int) -> list[list[tuple[int, int, int]]]:
    """Split the non-empty expert groups into <= `parts` contiguous ranges of about equal rows.

    sizes: rows per expert (sorted layout). Returns per range a list of (expert, first row, rows); one empty
    range when there are no rows at all.
    """
    total = sum(sizes)
    ranges: list[list[tuple[int, int, int]]] = [[]]
    start = 0
    for e, n in enumerate(sizes):
        if n == 0:
            continue
        # Open a new range once this one holds its share (the boundary that splits rows closest to even).
        if ranges[-1] and len(ranges) < parts and start + n / 2 > total * len(ranges) / parts:
            ranges.append([])
        ranges[-1].append((e, start, n))
        start += n
    return [r for r in ranges if r] or [[]]


def run_ranges(fn: Callable[[list[tuple[int, int, int]], int], None], ranges: list, device: torch.device,
                workers: int | None = None) -> None:
    """fn(range, i) for every range: inline when there is one, else concurrently on the pool of `workers`
    (default: one per range) threads."""
    if len(ranges) == 1:
        fn(ranges[0], 0)
        return
    # Grad mode, inference mode and autocast are per thread: workers start with autograd on, so carry the
    # caller's inference mode over (its buffers are inference tensors) and switch the rest off.
    inference = torch.is_inference_mode_enabled()

    def task(i: int) -> None:
        with torch.inference_mode(inference), torch.no_grad(), torch.autocast(device.type, enabled=False):
            fn(ranges[i], i)

    pool = _worker_pool(workers or len(ranges))
    for f in [pool.submit(task, i) for i in range(len(ranges))]:
        f.result()


def tools_watching() -> bool:
    """Whether a thread-local tool watches the caller's ops: a TorchDispatchMode (user or infra, e.g.
    FlopCounterMode, FakeTensorMode), a TorchFunctionMode (also `with torch.device(...)`), or the autograd profiler
    (torch.profiler / torch.autograd.profiler). Ops on other threads would escape it."""
    return (_get_current_dispatch_mode() is not None or is_in_torch_dispatch_mode()
            or torch._C._is_torch_function_mode_enabled() or torch._C._autograd._profiler_enabled())


def expert_workers(threading: str, device: torch.device, sizes: list[int]) -> int:
    """How many expert ranges run concurrently: 1 (intra-op threads only) or torch.get_num_threads().

    1 as well while `tools_watching()`, so that FLOP counters and profilers see every expert's matmuls.
    """
    if threading == "intra-op" or device.type != "cpu" or tools_watching():
        return 1
    t = torch.get_num_threads()
    if t <= 1:
        return 1
    if threading == "inter-expert":
        return t
    return t if sum(1 for n in sizes if n) >= MIN_EXPERTS_PER_WORKER * t else 1
