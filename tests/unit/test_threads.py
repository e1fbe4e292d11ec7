"""CPU threading of the expert loop: inter-expert ranges on worker threads equal the serial loop and the reference;
thread-local tools (dispatch and function modes, FLOP counter, profiler) see every expert."""

import contextlib
import threading

import pytest
import torch
from helpers import VARIANTS, D, _grads, _make, assert_close_scaled
from reference import reference_forward
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mhmoe import ConfigError, FFNConfig, build_ffn
from mhmoe.layers.sorted_experts import sorted_experts_rows
from mhmoe.layers.threads import (
    MIN_EXPERTS_PER_WORKER,
    _worker_pool,
    expert_ranges,
    expert_workers,
    run_ranges,
    tools_watching,
)

MOE = [n for n in VARIANTS if VARIANTS[n].kind == "moe"]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("name", MOE)
def test_inter_expert_threads_equal_reference_and_serial_loop(name, recompute, two_threads):
    cfg = VARIANTS[name].replace(recompute=recompute)
    x = torch.randn(3, 7, D, requires_grad=True)
    results = {}
    for mode in ("intra-op", "inter-expert"):
        torch.manual_seed(0)
        layer = _make(cfg.replace(threading=mode))
        y, _ = layer(x)
        g = torch.ones_like(y).normal_(generator=torch.Generator().manual_seed(1))
        results[mode] = (y.detach(), _grads(layer, x, y, g))
        if mode == "inter-expert":
            y_ref = reference_forward(layer, x)
            ref = _grads(layer, x, y_ref, g)
            assert_close_scaled(y, y_ref, 1e-6, "output vs reference")
            for n, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], results[mode][1], ref):
                assert_close_scaled(a, b, 1e-5, f"grad {n} vs reference")
    # Against the serial loop only the order of the per-range partial sums differs.
    assert_close_scaled(results["inter-expert"][0], results["intra-op"][0], 1e-6, "output vs intra-op")
    for a, b in zip(results["inter-expert"][1], results["intra-op"][1]):
        assert_close_scaled(a, b, 1e-6, "grad vs intra-op")


def test_inter_expert_threads_in_bf16_and_with_capacity(two_threads):
    cfg = VARIANTS["mhmoe-h3-shared"]
    x = torch.randn(2, 6, D, dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for mode in ("intra-op", "inter-expert"):
        torch.manual_seed(0)
        layer = _make(cfg.replace(threading=mode), torch.bfloat16)
        y, _ = layer(x)
        outs.append((y.detach(), _grads(layer, x, y, torch.ones_like(y))))
    assert outs[1][0].dtype == torch.bfloat16
    assert_close_scaled(outs[1][0], outs[0][0], 1e-2, "bf16 output")
    for a, b in zip(outs[1][1], outs[0][1]):
        assert_close_scaled(a, b, 1e-2, "bf16 grad")
    layer = _make(cfg.replace(threading="inter-expert", capacity_factor=0.5)).train()
    x32 = torch.randn(2, 6, D)
    y, aux = layer(x32)
    assert aux.dropped_fraction.item() > 0
    n_assign = 2 * 6 * cfg.heads * cfg.top_k
    cap = -(-n_assign // (2 * cfg.num_experts))  # ceil(0.5 * N*K / E)
    assert_close_scaled(y, reference_forward(layer, x32, capacity=cap), 1e-6, "dropping output")


def test_uncombined_rows_path_with_workers_equals_one_worker(two_threads):
    """mode="rows" (the path of `_run_sorted`, used by expert parallelism): outputs and gradients."""
    torch.manual_seed(0)
    S, E, Din, Fh = 60, 9, 8, 12
    sizes = [7, 0, 11, 5, 9, 0, 13, 6, 9]
    res = []
    for workers in (1, 2):
        torch.manual_seed(1)
        xs = torch.randn(S, Din, requires_grad=True)
        ws = [torch.randn(E, Din, Fh, requires_grad=True), torch.randn(E, Din, Fh, requires_grad=True),
              torch.randn(E, Fh, Din, requires_grad=True)]
        y = sorted_experts_rows(xs, *ws, sizes, workers=workers)
        y.backward(torch.ones_like(y))
        res.append([y.detach(), xs.grad] + [w.grad for w in ws])
    for a, b in zip(*res):
        assert torch.equal(a, b)  # every row and every expert's gradient is written by exactly one thread
    assert torch.count_nonzero(res[1][2][1]) == 0 and torch.count_nonzero(res[1][4][5]) == 0  # empty experts


@pytest.mark.parametrize("sizes, parts", [
    ([5, 0, 5, 5, 5, 0, 5, 5], 2), ([100, 1, 1, 1], 2), ([0, 0, 3], 4), ([1] * 96, 8), ([0, 0, 0], 2),
    ([384] * 96, 2), ([7, 3, 9, 2, 8, 4, 6, 1, 5], 3),
])
def test_expert_ranges_are_contiguous_cover_every_group_and_balance_rows(sizes, parts):
    ranges = expert_ranges(sizes, parts)
    flat = [grp for r in ranges for grp in r]
    assert [e for e, _, _ in flat] == [e for e, n in enumerate(sizes) if n]  # in order, non-empty only, once
    start = 0
    for e, s, n in flat:  # each group starts where the previous one ended: the rows tile the sorted layout
        assert n == sizes[e] and s == start
        start = s + n
    assert start == sum(sizes)
    if not flat:
        assert ranges == [[]]  # nothing to run: one empty range
        return
    assert len(ranges) <= parts and all(ranges)
    share, biggest = sum(sizes) / parts, max(sizes)
    # A range can only overshoot its share by less than the group that crossed the boundary.
    assert all(sum(n for _, _, n in r) < share + biggest for r in ranges)
    if sizes == [384] * 96:
        assert [len(r) for r in ranges] == [48, 48]


def test_expert_workers_rule(two_threads):
    cpu = torch.device("cpu")
    many, few = [3] * (MIN_EXPERTS_PER_WORKER * 2), [3] * (MIN_EXPERTS_PER_WORKER * 2 - 1) + [0]
    assert expert_workers("auto", cpu, many) == 2
    assert expert_workers("auto", cpu, few) == 1
    assert expert_workers("inter-expert", cpu, few) == 2
    assert expert_workers("intra-op", cpu, many) == 1
    assert expert_workers("inter-expert", torch.device("cuda"), many) == 1  # CUDA ops are asynchronous already
    torch.set_num_threads(1)
    assert expert_workers("inter-expert", cpu, many) == 1


def test_worker_pool_threads_use_one_intra_op_thread_and_leave_the_callers_setting(two_threads):
    seen = {}
    both = threading.Barrier(2, timeout=60)  # passes only if the two ranges run at the same time

    def fn(groups, i):
        seen[i] = (threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled())
        both.wait()

    run_ranges(fn, [[(0, 0, 1)], [(1, 1, 1)]], torch.device("cpu"))
    assert sorted(seen) == [0, 1]
    assert all(name.startswith("mhmoe-experts2") and n == 1 and not grad for name, n, grad in seen.values())
    assert len({name for name, _, _ in seen.values()}) == 2  # two distinct workers
    assert torch.get_num_threads() == 2
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [2]  # the default for new threads is the caller's again
    assert _worker_pool(2) is _worker_pool(2)


def test_inter_expert_threads_under_inference_mode(two_threads):
    torch.manual_seed(0)
    layer = _make(VARIANTS["mhmoe-h3-shared"].replace(threading="inter-expert"))
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        y = layer(x)[0]
    with torch.inference_mode():  # the output and dX buffers are inference tensors, written in the workers
        y_inf = layer(x)[0]
    assert torch.equal(y_inf, y)


@pytest.mark.parametrize("mode", ["intra-op", "inter-expert"])
def test_an_empty_batch_gives_an_empty_output_and_gradient(mode, two_threads):
    layer = _make(VARIANTS["mhmoe-h3-shared"].replace(threading=mode))
    x = torch.randn(0, 5, D, requires_grad=True)
    y, aux = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert aux.tokens_per_expert.tolist() == [0] * 12 and aux.dropped_fraction.item() == 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in layer.experts.parameters())


def test_worker_errors_reach_the_caller(two_threads):
    def fn(groups, i):
        if i == 1:
            raise ValueError("boom in range 1")

    with pytest.raises(ValueError, match="boom in range 1"):
        run_ranges(fn, [[(0, 0, 1)], [(1, 1, 1)]], torch.device("cpu"))


def test_bad_threading_value_names_the_field():
    with pytest.raises(ConfigError, match=r"FFNConfig\.threading: 'many' is not allowed; use one of 'auto', "
                                          r"'intra-op', 'inter-expert'"):
        FFNConfig(threading="many")
    assert build_ffn(FFNConfig(dim=D, hidden_dim=8, threading="intra-op")).experts.threading == "intra-op"


class _Recorder(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tool", ["none", "dispatch-mode", "function-mode", "flop-counter", "profiler"])
def test_workers_fall_back_to_the_callers_thread_while_a_tool_watches(tool, two_threads):
    many = [3] * (MIN_EXPERTS_PER_WORKER * 2)
    ctx = {"none": contextlib.nullcontext, "dispatch-mode": _Recorder, "function-mode": _Passthrough,
           "flop-counter": lambda: FlopCounterMode(display=False), "profiler": torch.profiler.profile}[tool]
    with ctx():
        assert tools_watching() == (tool != "none")
        assert expert_workers("inter-expert", torch.device("cpu"), many) == (2 if tool == "none" else 1)
    assert not tools_watching()


def _mm_events(prof) -> int:
    return sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm"))


@pytest.mark.parametrize("recompute", [False, True])
def test_profiler_sees_every_expert_matmul_at_two_threads(recompute, two_threads):
    layer = _make(VARIANTS["mhmoe-h3-shared"].replace(threading="inter-expert", recompute=recompute))
    ex = layer.experts
    sub = torch.randn(40, ex.in_dim, requires_grad=True)
    with torch.no_grad():  # the router's own matmuls stay out of the profile
        routing = layer.router(sub)
    weights = routing.weights.clone().requires_grad_()
    nonempty = int((routing.indices.reshape(-1).bincount(minlength=ex.num_experts) > 0).sum())
    assert nonempty >= 2  # two ranges, so the unwatched layer would use the workers
    with torch.profiler.profile() as prof:
        y, _ = ex(sub, routing.indices, weights)
    assert _mm_events(prof) == 3 * nonempty  # x W1, x W3, h W2 per expert
    g = torch.randn_like(y)
    with torch.profiler.profile() as prof:
        y.backward(g)
    # dA = dY W2^T, dW2, dW1, dW3, dX = dH1 W1^T (+ dH3 W3^T, addmm); recompute adds x W1, x W3 again.
    assert _mm_events(prof) == (8 if recompute else 6) * nonempty


def test_flop_counter_around_the_backward_alone_sees_the_expert_matmuls(two_threads):
    layer = _make(VARIANTS["mhmoe-h3-shared"].replace(threading="inter-expert"))
    ex = layer.experts
    sub = torch.randn(40, ex.in_dim, requires_grad=True)
    with torch.no_grad():
        routing = layer.router(sub)
    weights = routing.weights.clone().requires_grad_()
    with FlopCounterMode(display=False) as fwd:
        ex(sub, routing.indices, weights)
    y2, _ = ex(sub, routing.indices, weights)  # forward unwatched: it may use the workers
    with FlopCounterMode(display=False) as bwd:
        y2.backward(torch.randn_like(y2))
    assert fwd.get_total_flops() == 2 * 3 * 40 * 3 * ex.in_dim * ex.hidden_dim  # 2 * 3 matmuls * S * Din * F
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()  # dX and dW for each of the 3 matmuls
