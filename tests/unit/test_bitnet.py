"""BitNet b1.58 (issue 5): quantisers, straight-through gradients, module swap, 2-bit packing, integer inference
equal to the fake-quant model, the two-stage schedule, and a BitNet smoke run trained, exported and evaluated."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_data_root

from mhmoe import ConfigError
from mhmoe.bitnet.integer import IntBitExperts, IntBitLinear, to_integer
from mhmoe.bitnet.modules import BitExperts, BitLinear, BitRouter, convert
from mhmoe.bitnet.quant import dequant, int8_matmul, quantize_act, quantize_weight
from mhmoe.bitnet.ternary import (
    integer_model,
    is_export_dir,
    pack_ternary,
    read_ternary,
    ternary_state,
    unpack_ternary,
)
from mhmoe.cli import main
from mhmoe.data.sampler import eval_windows
from mhmoe.errors import CheckpointError
from mhmoe.layers.router import TopKRouter
from mhmoe.model import Transformer
from mhmoe.training.config import TrainConfig
from mhmoe.training.evaluate import evaluate_run
from mhmoe.training.loop import train
from mhmoe.training.optim import lr_at, weight_decay_at
from mhmoe.training.presets import Base, model_config, preset
from mhmoe.training.rundir import load_run

BASE = Base(dim=48, n_layers=4, n_heads=4, hidden_dim=128, num_experts=4)
VARIANTS = ["dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3-shared", "smoe-hm", "mhmoe-h2-nohead"]
ROOT = shared_data_root()


def _cfg(variant, **kw):
    return model_config(BASE, variant, 97, 32).replace(**{"bitnet": True, **kw})


# ----------------------------------------------------------------------------------------------------------
# Quantisers


@pytest.mark.parametrize("shape, groups", [((7, 5), 1), ((12, 8), 3), ((4, 6, 9), 4)])
def test_weights_are_ternary_with_absmean_scale(shape, groups):
    w = torch.randn(shape) * 0.05
    levels, gamma = quantize_weight(w, groups)
    assert set(levels.unique().tolist()) <= {-1.0, 0.0, 1.0} and len(levels.unique()) == 3
    blocks = w.reshape(groups, -1)
    torch.testing.assert_close(gamma, blocks.abs().mean(1))
    expected = (blocks / blocks.abs().mean(1, keepdim=True)).round().clamp(-1, 1).reshape(shape)
    assert torch.equal(levels, expected)
    zero_levels, zero_gamma = quantize_weight(torch.zeros(3, 4))  # gamma clamped at eps, no 0/0
    assert torch.equal(zero_levels, torch.zeros(3, 4)) and zero_gamma.item() == pytest.approx(1e-5)


def test_activation_levels_are_integers_in_int8_range_per_token():
    x = torch.randn(3, 5, 16)
    x[0, 0, 3] = 40.0  # an outlier only changes its own token's scale
    x[1, 2] = 0.0
    q, s = quantize_act(x)
    assert torch.equal(q, q.round()) and q.abs().max() <= 127
    assert s.shape == (3, 5, 1)
    torch.testing.assert_close(s, 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5))
    nonzero = x.abs().amax(-1) > 0
    assert torch.equal(q.abs().amax(-1)[nonzero], torch.full_like(q.abs().amax(-1)[nonzero], 127.0))  # absmax
    assert torch.equal(q[1, 2], torch.zeros(16))
    assert torch.equal(quantize_act(-x)[0], -q)  # symmetric, no zero point
    torch.testing.assert_close(q / s, x, atol=(x.abs().amax(-1, keepdim=True) / 254).max().item(), rtol=0)


def test_per_expert_scales_are_independent():
    ex = BitExperts(3, 8, 16)
    with torch.no_grad():
        ex.w1[1].mul_(10.0)
    t = ex.ternary()
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(t[name][1], getattr(ex, name).detach().abs().mean((1, 2)))
    assert t["w1"][1][1] > 5 * t["w1"][1][0]
    x = torch.randn(12, 8)
    idx = torch.tensor([0, 1, 2] * 4).unsqueeze(1)
    w = torch.ones(12, 1)
    y = ex(x, idx, w)[0]
    with torch.no_grad():  # rescaling expert 1 again changes only the rows routed to expert 1
        ex.w1[1].mul_(3.0)
    y2 = ex(x, idx, w)[0]
    other = idx[:, 0] != 1
    assert torch.equal(y[other], y2[other]) and not torch.allclose(y[~other], y2[~other])


def test_ste_gradient_equals_the_gradient_of_the_quantised_forward():
    lin = BitLinear(16, 24, groups=3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    levels, gamma = quantize_weight(lin.weight.detach(), 3)
    w_q = levels * gamma.repeat_interleave(8)[:, None]  # [24, 16]
    qx, s = quantize_act(x.detach())
    x_q = qx / s
    torch.testing.assert_close(y, x_q @ w_q.t(), rtol=1e-5, atol=1e-6)
    # Unquantised gradients of y = x_q W_q^T: dX = g W_q, dW = g^T x_q (nothing flows through the scales).
    torch.testing.assert_close(x.grad, g @ w_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, g.flatten(0, 1).t() @ x_q.flatten(0, 1), rtol=1e-5, atol=1e-6)


def test_expert_gradients_equal_the_textbook_ste_form():
    torch.manual_seed(1)
    ex = BitExperts(2, 8, 12)
    with torch.no_grad():
        ex.w2_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 8, requires_grad=True)
    y, _ = ex(x, torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1))  # all rows to expert 0
    g = torch.randn_like(y)
    y.backward(g)
    got = [t.grad.clone() for t in (x, ex.w1, ex.w3, ex.w2)]

    def ste(v, q):  # x + (q(x) - x).detach()
        return v + (q - v).detach()

    def wq(w):
        gamma = w.detach().abs().mean()
        return ste(w, gamma * (w.detach() / gamma).round().clamp(-1, 1))

    def aq(v):
        s = 127 / v.detach().abs().amax(-1, keepdim=True)
        return ste(v, (v.detach() * s).round().clamp(-127, 127) / s)

    for t in (x, ex.w1, ex.w3, ex.w2):
        t.grad = None
    xq = aq(x)
    h = F.silu(xq @ wq(ex.w1[0])) * (xq @ wq(ex.w3[0]))
    h = F.rms_norm(h, (12,), None, 1e-5) * ex.w2_norm.weight[0]
    (aq(h) @ wq(ex.w2[0])).backward(g)
    for a, b in zip(got, (x.grad, ex.w1.grad, ex.w3.grad, ex.w2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_quantisation_runs_in_fp32_under_autocast():
    lin = BitLinear(32, 16, sub_norm=True)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16
    xn = F.rms_norm(x.bfloat16().float(), (32,), lin.norm.weight, 1e-5)
    qx, s = quantize_act(xn)
    qw, gamma = quantize_weight(lin.weight)
    expected = dequant(F.linear(qx.bfloat16(), qw.bfloat16()).float(), gamma, s).bfloat16()
    assert torch.equal(y, expected)


# ----------------------------------------------------------------------------------------------------------
# The module swap


@pytest.mark.parametrize("variant", VARIANTS)
def test_conversion_keeps_init_and_full_precision_parts(variant):
    torch.manual_seed(3)
    fp = Transformer(_cfg(variant, bitnet=False))
    after_fp = torch.get_rng_state()
    torch.manual_seed(3)
    bit = Transformer(_cfg(variant))
    assert torch.equal(torch.get_rng_state(), after_fp)  # the swap draws nothing
    params = dict(bit.named_parameters())
    for name, p in fp.named_parameters():
        assert torch.equal(p, params.pop(name)), name  # identical init
    assert all(n.endswith("norm.weight") and torch.equal(p, torch.ones_like(p)) for n, p in params.items())
    assert type(bit.lm_head) is torch.nn.Linear and type(bit.embed) is torch.nn.Embedding
    for i, block in enumerate(bit.blocks):
        assert isinstance(block.attn.qkv, BitLinear) and block.attn.qkv.groups == 3 and block.attn.qkv.norm is None
        assert block.attn.out.norm is not None
        ffn = block.ffn
        if not block.is_moe:
            assert ffn.ffn.w1.norm is None and ffn.ffn.w3.norm is None and ffn.ffn.w2.norm is not None
            continue
        assert type(ffn.router) is TopKRouter  # the router stays full precision by default
        assert isinstance(ffn.experts, BitExperts)
        assert ffn.experts.w2_norm.weight.shape == (ffn.cfg.num_experts, ffn.cfg.hidden_dim)
        assert (ffn.experts.in_norm is not None) == ffn.cfg.head_layer
        assert ffn.head is None or (isinstance(ffn.head, BitLinear) and ffn.head.norm is None)
        assert ffn.merge is None or ffn.merge.norm is not None
        assert ffn.shared is None or (isinstance(ffn.shared.w1, BitLinear) and ffn.shared.w2.norm is not None)
    # Weight decay: the sub-norm gains fall in the no-decay group like the other norms.
    from mhmoe.training.config import OptimConfig
    from mhmoe.training.optim import build_optimizer

    decay = {id(p) for p in build_optimizer(bit, OptimConfig()).param_groups[0]["params"]}
    assert not any(id(p) in decay for n, p in bit.named_parameters() if "norm" in n)


def test_router_option_and_config_checks():
    m = Transformer(_cfg("mhmoe-h2", bitnet_router=True))
    assert isinstance(m.blocks[1].ffn.router, BitRouter)
    with pytest.raises(ConfigError, match="bitnet_router: only applies with bitnet=true"):
        _cfg("smoe", bitnet=False, bitnet_router=True)
    cfg = preset("smoke", "mhmoe-h3").override("model.bitnet", "true")
    assert cfg.model.bitnet and TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    old = json.loads(preset("smoke", "smoe").to_json())
    for key in ("bitnet", "bitnet_router"):
        del old["model"][key]  # configs of runs made before the fields existed read back equal
    assert TrainConfig.from_dict(old) == preset("smoke", "smoe")
    block = Transformer(_cfg("dense", bitnet=False)).blocks[0]
    block.extra = torch.nn.Linear(4, 4, bias=False)
    with pytest.raises(NotImplementedError, match="no BitNet rule for nn.Linear 'extra'"):
        convert(block)


def test_bitnet_model_trains_on_a_batch():
    torch.manual_seed(0)
    m = Transformer(_cfg("mhmoe-h3-shared"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    idx = torch.randint(0, 97, (4, 24))
    losses = []
    for _ in range(25):
        out = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert all(p.grad is not None for p in m.parameters())
    assert losses[-1] < losses[0] - 1.0


# ----------------------------------------------------------------------------------------------------------
# Packing and integer kernels


def test_pack_unpack_every_byte_and_odd_sizes():
    codes = torch.arange(256, dtype=torch.uint8)
    for byte in codes:
        fields = [(int(byte) >> s) & 3 for s in (0, 2, 4, 6)]
        if 3 in fields:
            with pytest.raises(ValueError, match="code 3"):
                unpack_ternary(byte.reshape(1), (4,))
            continue
        levels = unpack_ternary(byte.reshape(1), (4,))
        assert levels.tolist() == [f - 1 for f in fields]  # element i in bits 2i, 2i+1
        assert torch.equal(pack_ternary(levels), byte.reshape(1))
    assert pack_ternary(torch.tensor([-1, 0, 1, 1])).item() == 0b10100100
    for n in list(range(1, 14)) + [4097]:
        for shape in ((n,), (n, 3)):
            levels = torch.randint(-1, 2, shape, dtype=torch.int8)
            packed = pack_ternary(levels)
            assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(levels.numel() / 4)
            assert torch.equal(unpack_ternary(packed, shape), levels)
    assert pack_ternary(torch.tensor([1.0, -1.0, 0.0])).tolist() == [0b01_01_00_10]  # codes 2, 0, 1 + padding code 1
    with pytest.raises(ValueError, match="levels must be in"):
        pack_ternary(torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="expected uint8 \\[2\\]"):
        unpack_ternary(torch.zeros(3, dtype=torch.uint8), (5,))


@pytest.mark.parametrize("shape", [(0, 16, 8), (1, 1, 1), (5, 7, 3), (17, 48, 144), (33, 130, 9)])
def test_int8_matmul_is_exact_with_and_without_int_mm(shape, monkeypatch):
    N, K, M = shape
    a = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    b = torch.randint(-1, 2, (M, K), dtype=torch.int8).t()  # the transposed view IntBitLinear passes
    ref = (a.long() @ b.long()).to(torch.int32)
    assert torch.equal(int8_matmul(a, b, 1), ref)

    def refuse(*args):
        raise RuntimeError("_int_mm: refused")

    monkeypatch.setattr(torch, "_int_mm", refuse)
    out = int8_matmul(a, b, 1)
    assert out.dtype == torch.int32 and torch.equal(out, ref)


def test_int8_matmul_fallback_beyond_float32_range(monkeypatch):
    monkeypatch.setattr(torch, "_int_mm", lambda *a: (_ for _ in ()).throw(RuntimeError("refused")))
    K = 140_000  # 127 * K > 2^24: the float32 path would round, float64 does not
    a = torch.full((2, K), 127, dtype=torch.int8)
    b = torch.ones(K, 1, dtype=torch.int8)
    assert int8_matmul(a, b, 1).tolist() == [[127 * K], [127 * K]]


# ----------------------------------------------------------------------------------------------------------
# Integer model = fake-quant model


@pytest.mark.parametrize("variant, kw", [(v, {}) for v in VARIANTS] + [
    ("mhmoe-h2", {"bitnet_router": True}), ("mhmoe-h2", {"merge_after_residual": True}),
    ("smoe", {"moe_ffn.dispatch": "grouped_mm"}),
    ("mhmoe-h2", {"moe_ffn.dispatch": "scatter"}),  # BitExperts keep their own path (rows_dispatch)
])
def test_integer_model_matches_fake_quant(variant, kw, tmp_path):
    cfg = _cfg(variant, **{k: v for k, v in kw.items() if "." not in k})
    if "moe_ffn.dispatch" in kw:
        cfg = cfg.override("moe_ffn.dispatch", kw["moe_ffn.dispatch"])
    torch.manual_seed(0)
    fake = Transformer(cfg)
    with torch.no_grad():  # trained-looking sub-norm gains, so a swapped or dropped gain would show
        for n, p in fake.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    fake.eval()
    idx = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        ref = fake(idx).logits
    tensors, meta = ternary_state(fake)
    assert not any(k.startswith("lm_head") for k in tensors)  # tied: stored once
    router_keys = [k for k in tensors if k.endswith("router.weight")]
    if variant != "dense" and not kw.get("bitnet_router"):
        assert router_keys and all(tensors[k].dtype == torch.float32 for k in router_keys)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "m.safetensors"), metadata=meta)
    loaded = integer_model(cfg, *read_ternary(tmp_path / "m.safetensors"))
    assert any(isinstance(m, IntBitLinear) for m in loaded.modules())
    assert (variant == "dense") or any(isinstance(m, IntBitExperts) for m in loaded.modules())
    assert not any(isinstance(m, BitLinear) for m in loaded.modules())
    with torch.no_grad():
        out = loaded(idx).logits
        in_memory = to_integer(copy.deepcopy(fake))(idx).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(out, in_memory)
    # Incremental decoding with the KV cache works on the integer model, greedy continuations agree.
    g_int = loaded.generate(idx[:, :5], 8, temperature=0.0)
    assert torch.equal(g_int, loaded.generate(idx[:, :5], 8, temperature=0.0, use_cache=False))
    assert torch.equal(g_int, fake.generate(idx[:, :5], 8, temperature=0.0))


def test_export_file_checks(tmp_path):
    cfg = _cfg("smoe")
    tensors, meta = ternary_state(Transformer(cfg))
    with pytest.raises(CheckpointError, match="format_version '9' is not supported"):
        integer_model(cfg, tensors, {**meta, "format_version": "9"})
    bad = dict(tensors)
    bad["blocks.1.ffn.experts.w1.packed"] = torch.full_like(bad["blocks.1.ffn.experts.w1.packed"], 255)
    with pytest.raises(CheckpointError, match="code 3"):
        integer_model(cfg, bad, meta)
    with pytest.raises(CheckpointError, match="does not fit"):
        integer_model(_cfg("dense"), tensors, meta)
    with pytest.raises(ValueError, match="no BitNet modules"):
        ternary_state(Transformer(cfg.replace(bitnet=False)))


# ----------------------------------------------------------------------------------------------------------
# Schedule


def test_two_stage_schedule_and_weight_decay_switch():
    base = preset("smoke", "dense").replace(steps=100)
    cos = base.override("optim.warmup_steps", 10)
    two = cos.override("optim.schedule", "two_stage").override("optim.min_lr_ratio", 0.0)
    lr = two.optim.lr
    for s in range(0, 50):  # stage 1 is the cosine (with min_lr 0) of the whole run
        assert lr_at(s, two) == pytest.approx(lr_at(s, cos.override("optim.min_lr_ratio", 0.0)))
    assert lr_at(49, two) > 0.5 * lr and lr_at(50, two) == pytest.approx(0.33 * lr)  # the drop at mid-training
    assert all(lr_at(s, two) >= lr_at(s + 1, two) for s in range(50, 99)) and lr_at(99, two) < 0.01 * lr
    # Defaults: weight decay never switched off, the other schedules unchanged.
    assert {weight_decay_at(s, cos) for s in range(100)} == {cos.optim.weight_decay}
    off = cos.override("optim.wd_off_at", 0.5)
    assert [weight_decay_at(s, off) for s in (0, 49, 50, 99)] == [0.1, 0.1, 0.0, 0.0]
    p = (20 - 10) / 90
    assert lr_at(20, cos) == lr * (0.1 + (1 - 0.1) * (0.5 * (1 + math.cos(math.pi * p))))
    with pytest.raises(ConfigError, match="stage2_lr_ratio"):
        two.override("optim.stage2_lr_ratio", 1.5)
    with pytest.raises(ConfigError, match="wd_off_at"):
        cos.override("optim.wd_off_at", -1)


# ----------------------------------------------------------------------------------------------------------
# End to end on real data


@pytest.mark.skipif(ROOT is None, reason="real corpora not available (set MHMOE_DATA_ROOT)")
def test_bitnet_smoke_run_trains_exports_and_evaluates(tmp_path, capsys, monkeypatch):
    cache, run, out = tmp_path / "cache", tmp_path / "run", tmp_path / "out"
    seen_wd = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen_wd.append(self.param_groups[0]["weight_decay"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    argv = ["train", "--preset", "smoke", "--model", "mhmoe-h3", "--out", str(run), "--data-root", str(ROOT),
            "--cache-dir", str(cache), "--no-progress", "--set", "threads=1", "--set", "steps=30",
            "--set", "model.bitnet=true", "--set", "optim.schedule=two_stage", "--set", "optim.wd_off_at=0.5"]
    assert main(argv) == 0
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert seen_wd == [0.1] * 15 + [0.0] * 15
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    capsys.readouterr()

    assert main(["export", str(run), "--format", "ternary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "packed ternary (this export)" in printed and "bf16 checkpoint" in printed and "fp32 checkpoint" in printed
    assert is_export_dir(out) and (out / "tokenizer" / "tokenizer.json").is_file()
    sizes = json.loads((out / "export.json").read_text())["bytes"]
    assert sizes["packed"] < sizes["bf16"] < sizes["fp32"]

    fake = load_run(run, None, ROOT, cache)
    ints = load_run(out, None, ROOT, cache)
    assert ints.step == fake.step == 30 and ints.device.type == "cpu"
    assert any(isinstance(m, IntBitExperts) for m in ints.model.modules())
    windows = eval_windows(fake.corpus("c4", 2048), 64, 2048)[:4]
    with torch.no_grad():
        a, b = fake.model(windows[:, :-1]).logits, ints.model(windows[:, :-1]).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    r_fake = evaluate_run(run, None, None, 2048, ROOT, cache)
    r_int = evaluate_run(out, None, None, 2048, ROOT, cache)
    for name, r in r_fake["domains"].items():
        assert f"{r['ppl']:.3f}" == f"{r_int['domains'][name]['ppl']:.3f}", name
    assert main(["eval", str(out), "--max-tokens", "1024", "--json", "--data-root", str(ROOT),
                 "--cache-dir", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 30
    cache_out = ints.model.generate(windows[:1, :8], 6, temperature=0.0)
    assert torch.equal(cache_out, fake.model.generate(windows[:1, :8], 6, temperature=0.0))


@pytest.mark.skipif(ROOT is None, reason="real corpora not available (set MHMOE_DATA_ROOT)")
def test_export_errors_are_one_line(tmp_path, capsys):
    cache = tmp_path / "cache"
    run = tmp_path / "fp"
    train(preset("smoke", "smoe").replace(threads=1, steps=2), run, ROOT, cache, progress=False)
    capsys.readouterr()
    cases = [
        (["export", str(run), str(tmp_path / "o")], "is not a BitNet run (model.bitnet is false)"),
        (["export", str(tmp_path / "nope"), str(tmp_path / "o")], "RUN_DIR: "),
        (["export", str(run), str(run)], "OUT: must differ from RUN_DIR"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
