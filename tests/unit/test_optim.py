"""AdamW's implementation per parameter set (fused on CUDA, foreach on CPU, a loop over tensor subclasses), and
switching a loaded optimizer to it; the slow reference is torch's foreach AdamW."""

import copy

import pytest
import torch
from torch import nn

from mhmoe.training.config import OptimConfig
from mhmoe.training.optim import adamw_implementation, build_optimizer, choose_adamw, set_adamw_implementation


@pytest.mark.parametrize("devices, plain, want", [
    ({"cuda"}, True, "fused"),
    ({"cpu"}, True, "foreach"),
    ({"cuda", "cpu"}, True, "foreach"),  # fused takes one device type
    ({"cuda"}, False, "for-loop"),  # FSDP2's DTensors (alone or beside plain expert shards)
    ({"cpu"}, False, "for-loop"),
])
def test_choice_per_device_and_tensor_kind(devices, plain, want):
    assert choose_adamw(devices, plain) == want


class _Sharded(torch.Tensor):
    """A stand-in for DTensor: any tensor subclass."""


def test_choice_from_parameters_and_build_optimizer_flags():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert adamw_implementation(model.parameters()) == "foreach"
    opt = build_optimizer(model, OptimConfig())
    assert all(g["foreach"] is True and g["fused"] is False for g in opt.param_groups)
    mixed = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2)).as_subclass(_Sharded)]
    assert adamw_implementation(mixed) == "for-loop"


def _steps(opt, params, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_a_loaded_foreach_state_continues_under_another_implementation():
    """A checkpoint written by foreach AdamW (all CPU runs, GPU runs before fused) resumes under the implementation
    the run chooses now: flags and step counts follow it, and the updates equal foreach's (CPU has a fused kernel
    too, so the switch itself is exercised here)."""
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))]
    params = [nn.Parameter(p.detach().clone()) for p in ref]
    o = OptimConfig(lr=1e-2)
    opt_ref = torch.optim.AdamW(ref, lr=o.lr, foreach=True)
    _steps(opt_ref, ref, 3, seed=1)
    saved = opt_ref.state_dict()
    for p, q in zip(params, ref):
        p.data.copy_(q.data)
    for impl in ("fused", "for-loop", "foreach"):
        opt = torch.optim.AdamW(params, lr=o.lr, foreach=True)
        opt.load_state_dict(copy.deepcopy(saved))  # as from torch.load: no tensor shared with another optimizer
        set_adamw_implementation(opt, impl)
        g = opt.param_groups[0]
        assert (g["fused"], g["foreach"]) == (impl == "fused", impl == "foreach")
        assert all(s["step"].dtype == torch.float32 and s["step"].device.type == "cpu" for s in opt.state.values())
        before = [p.detach().clone() for p in params]
        _steps(opt, params, 2, seed=2)
        assert all(s["step"].item() == 5 for s in opt.state.values())  # 3 loaded + 2
        after = [p.detach().clone() for p in params]
        for p, b in zip(params, before):  # rewind for the next implementation
            p.data.copy_(b)
        ref_now = [nn.Parameter(b.clone()) for b in before]
        opt_cont = torch.optim.AdamW(ref_now, lr=o.lr, foreach=True)
        opt_cont.load_state_dict(copy.deepcopy(saved))
        _steps(opt_cont, ref_now, 2, seed=2)
        for a, r in zip(after, ref_now):
            torch.testing.assert_close(a, r.detach(), rtol=1e-6, atol=1e-7, msg=impl)
