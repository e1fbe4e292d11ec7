"""The experts' two seams: the dispatcher (sorting, capacity) and the implementation registry keyed by dispatch;
"auto" per device; the paths auto takes on CUDA (scatter; grouped_mm without Triton) have no host sync, checked on
CPU."""

import pytest
import torch
from helpers import VARIANTS, D, _make, assert_close_scaled
from reference import reference_forward
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import mhmoe.layers.experts as experts_mod
from mhmoe import FFNConfig
from mhmoe.layers import scatter_experts
from mhmoe.bitnet.modules import BitExperts
from mhmoe.layers.experts import (
    EXPERT_IMPLEMENTATIONS,
    Experts,
    drop_over_capacity,
    gathered_experts,
    resolve_dispatch,
    sort_assignments,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU needed to resolve for it


def test_auto_resolves_per_device(monkeypatch):
    bf16, fp32 = torch.bfloat16, torch.float32
    assert resolve_dispatch("auto", CPU, 384, 768, bf16) == "sorted"  # measured best on CPU, numbers unchanged
    assert resolve_dispatch("auto", CPU, 384, 768, fp32) == "sorted"
    assert scatter_experts.TRITON_AVAILABLE  # the test environment has Triton (requirements.txt)
    assert resolve_dispatch("auto", CUDA, 384, 768, bf16) == "scatter"
    assert resolve_dispatch("auto", CUDA, 12, 20, torch.float16) == "scatter"  # any width: masked tile loads
    # float32 on CUDA: cuBLAS's matmuls (sorted), not Triton's fp32 FMA kernels, until a measurement says otherwise.
    assert resolve_dispatch("auto", CUDA, 256, 512, fp32) == "sorted"
    for explicit in ("sorted", "grouped_mm", "scatter"):  # existing configs keep their choice on every device
        assert resolve_dispatch(explicit, CPU, 384, 768, fp32) == explicit
        assert resolve_dispatch(explicit, CUDA, 12, 20, fp32) == explicit
    # Without Triton, what auto picked before scatter existed.
    monkeypatch.setattr(scatter_experts, "TRITON_AVAILABLE", False)
    assert resolve_dispatch("auto", CPU, 384, 768, bf16) == "sorted"
    assert resolve_dispatch("auto", CUDA, 384, 768, bf16) == "grouped_mm"  # autocast training on a GPU
    assert resolve_dispatch("auto", torch.device("cuda", 1), 256, 512, bf16) == "grouped_mm"
    assert resolve_dispatch("auto", CUDA, 384, 768, fp32) == "sorted"  # torch's grouped GEMM would sync there
    assert resolve_dispatch("auto", CUDA, 12, 768, bf16) == "sorted"  # 24-byte rows: not 16-byte aligned
    assert resolve_dispatch("auto", CUDA, 384, 20, bf16) == "sorted"
    assert resolve_dispatch("auto", torch.device("meta"), 384, 768, bf16) == "sorted"
    for explicit in ("sorted", "grouped_mm"):  # existing configs keep their choice on every device
        assert resolve_dispatch(explicit, CPU, 384, 768, fp32) == explicit
        assert resolve_dispatch(explicit, CUDA, 12, 20, fp32) == explicit
    assert FFNConfig().dispatch == "auto"
    assert FFNConfig(dispatch="sorted").dispatch == "sorted"


def test_registry_is_keyed_by_dispatch_and_subclasses_declare_theirs():
    assert set(EXPERT_IMPLEMENTATIONS) == {"sorted", "grouped_mm", "scatter"}
    assert Experts.implementations is EXPERT_IMPLEMENTATIONS
    assert dict(BitExperts.implementations) == {"sorted": gathered_experts, "grouped_mm": gathered_experts}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_choice_is_made_at_forward_time_for_the_inputs_device(device, monkeypatch):
    """A model built on CPU and moved to CUDA runs scatter there: the resolution sees the input's device at every
    call (the device is faked by handing resolve_dispatch `cuda`; the tensors stay on CPU, where scatter runs
    its torch twin)."""
    layer = _make(VARIANTS["mhmoe-h2"]).to(torch.bfloat16)
    assert layer.experts.dispatch == "auto"
    real = experts_mod.resolve_dispatch
    fake_device = torch.device(device)
    monkeypatch.setattr(experts_mod, "resolve_dispatch",
                        lambda dispatch, _device, *a: real(dispatch, fake_device, *a))
    ran = []
    for name, impl in list(EXPERT_IMPLEMENTATIONS.items()):
        monkeypatch.setitem(EXPERT_IMPLEMENTATIONS, name,
                            lambda *args, impl=impl, name=name: ran.append(name) or impl(*args))
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    y, _ = layer(x)
    assert ran == ["sorted" if device == "cpu" else "scatter"]
    assert_close_scaled(y, reference_forward(layer, x), 2e-2, "output")


def test_drop_over_capacity_keeps_the_earliest_assignments_of_each_expert():
    flat = torch.tensor([2, 0, 2, 2, 1, 0, 2, 1, 0, 0])
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=4)
    keep, kept, dropped = drop_over_capacity(flat[order], counts, 2)
    slow = []  # an assignment survives when fewer than 2 earlier assignments went to its expert
    for i in order.tolist():
        slow.append(sum(1 for j in range(i) if flat[j] == flat[i]) < 2)
    assert keep.tolist() == slow
    assert kept.tolist() == [2, 2, 2, 0] and dropped.item() == 4
    a = sort_assignments(flat.view(5, 2), 4, capacity=2)
    assert torch.equal(a.compacted(), order[keep]) and torch.equal(a.kept_counts, kept)
    dropless = sort_assignments(flat.view(5, 2), 4)
    assert torch.equal(dropless.compacted(), order) and dropless.dropped.item() == 0
    assert torch.equal(dropless.counts, counts) and dropless.keep.all()


# Ops that wait for the device (or have a data-dependent output size) on CUDA.
SYNCING = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.bincount",
           "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.histc", "aten.equal", "aten.is_nonzero"}


class _FailOnSync(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops.add(name)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_") and any(
            t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])  # x[mask]: nonzero inside
        if name in SYNCING or bool_index or (name == "aten.repeat_interleave" and "output_size" not in (kwargs or {})):
            raise AssertionError(f"{func} syncs with the host on CUDA")
        return func(*args, **(kwargs or {}))


def _train_step(layer, x, params=None):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if params is None:
            y, aux = layer(x)
        else:
            y, aux = torch.func.functional_call(layer, params, (x,))
    (y.float().square().mean() + aux.loss + aux.dropped_fraction).backward()
    return y


@pytest.mark.parametrize("dispatch, op", [("grouped_mm", "aten._grouped_mm"),
                                          ("scatter", "mhmoe.scatter_experts_fwd")])
@pytest.mark.parametrize("name", ["smoe", "mhmoe-h2", "mhmoe-h3-shared"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_the_cuda_path_has_no_host_sync(name, capacity_factor, dispatch, op):
    """What auto runs on CUDA (scatter, or grouped_mm without Triton; bf16 autocast), forward and backward with
    the router and the aux losses, run on CPU (1) under a dispatch mode that fails on every syncing op, (2) on
    fake tensors, which have no data: any .item(), .tolist(), .cpu() read or data-dependent shape raises.
    scatter's custom ops are one op each here (their CUDA kernels' launchers: test_scatter_experts.py)."""
    cfg = VARIANTS[name].replace(dispatch=dispatch, capacity_factor=capacity_factor)
    layer = _make(cfg).train()
    with _FailOnSync() as mode:
        _train_step(layer, torch.randn(2, 6, D, requires_grad=True))
    assert op in mode.ops
    with FakeTensorMode():
        x = torch.randn(2, 6, D, requires_grad=True)
        params = {n: torch.empty(p.shape, requires_grad=True) for n, p in layer.named_parameters()}
        y = _train_step(layer, x, params)
        assert y.shape == x.shape and all(p.grad is not None for p in params.values())


def test_the_sync_checks_catch_the_sorted_path():
    """The checks above have teeth: the sorted path (one .tolist() per call) fails both."""
    layer = _make(VARIANTS["mhmoe-h2"].replace(dispatch="sorted")).train()
    with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)), FakeTensorMode():
        params = {n: torch.empty(p.shape, requires_grad=True) for n, p in layer.named_parameters()}
        _train_step(layer, torch.randn(2, 6, D), params)
    with pytest.raises(AssertionError, match="syncs with the host"), _FailOnSync():
        _train_step(_make(VARIANTS["mhmoe-h2"].replace(dispatch="sorted", capacity_factor=0.5)).train(),
                    torch.randn(2, 6, D))
