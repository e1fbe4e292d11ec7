"""Hugging Face integration: save/from_pretrained round trip with the native logits, transformers' generate (cache,
left padding), the Mixtral-style router API, `export_hf` of a real run with its tokenizer, and lm-evaluation-harness
perplexity = `mhmoe eval` on the same text."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("transformers") is None:  # found, not imported (see _hf_imports)
    pytest.skip("transformers is not installed (pip install 'mhmoe[hf]')", allow_module_level=True)

from conftest import shared_data_root  # noqa: E402

from mhmoe.errors import UserError  # noqa: E402
from mhmoe.model import Transformer  # noqa: E402
from mhmoe.training.presets import preset  # noqa: E402

ROOT = shared_data_root()
AutoConfig = AutoModelForCausalLM = AutoTokenizer = MHMoEConfig = MHMoEForCausalLM = export_hf = None


@pytest.fixture(autouse=True, scope="module")
def _hf_imports():
    """transformers' Auto classes and mhmoe.hf, imported when this module's first test runs: imported when pytest
    collects the module they cost every xdist worker about 3 s (transformers' MoE integrations, DTensor, sympy),
    also the worker that runs none of these tests."""
    global AutoConfig, AutoModelForCausalLM, AutoTokenizer, MHMoEConfig, MHMoEForCausalLM, export_hf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mhmoe.hf import MHMoEConfig, MHMoEForCausalLM, export_hf


def _native(variant="mhmoe-h2", **over):
    cfg = preset("smoke", variant).model
    for k, v in over.items():
        cfg = cfg.override(k, v)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("variant, over", [
    ("mhmoe-h3", {}), ("smoe-shared", {"moe_ffn.top_k": 2}), ("dense", {}),
    ("mhmoe-h2", {"merge_after_residual": True, "tie_embeddings": False}), ("mhmoe-h2", {"bitnet": True}),
])
def test_save_from_pretrained_round_trip_equals_native(tmp_path, variant, over):
    native = _native(variant, **over)
    hf = MHMoEForCausalLM.from_native(native, eos_token_id=0).eval()
    x = torch.randint(1, 512, (2, 24))
    with torch.no_grad():
        ref = native(x).logits
        assert torch.equal(hf(x).logits, ref)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MHMoEForCausalLM) and isinstance(AutoConfig.from_pretrained(tmp_path), MHMoEConfig)
    assert loaded.model.cfg == native.cfg
    with torch.no_grad():
        diff = (loaded(x).logits - ref).abs().max().item()
    print(f"{variant} {over}: max |logits(from_pretrained) - logits(native)| = {diff:.2e}")
    assert diff == 0.0
    tied = loaded.model.lm_head.weight is loaded.model.embed.weight
    assert tied == native.cfg.tie_embeddings


def test_generate_matches_native_with_cache_and_left_padding():
    native = _native("mhmoe-h2")
    hf = MHMoEForCausalLM.from_native(native, eos_token_id=0, pad_token_id=0).eval()
    prompt = torch.randint(1, 512, (1, 7))
    ref = native.generate(prompt, 12, temperature=0)
    for use_cache in (True, False):
        out = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=use_cache, eos_token_id=None)
        assert torch.equal(out, ref)
    # A left-padded batch continues each prompt exactly as it would alone.
    short = torch.randint(1, 512, (1, 4))
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), prompt])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(out[0, 3:], native.generate(short, 6, temperature=0)[0])
    assert torch.equal(out[1], native.generate(prompt, 6, temperature=0)[0])
    # Right padding leaves the real positions' logits untouched.
    with torch.no_grad():
        padded = hf(torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1),
                    attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0, 0]])).logits[:, :4]
        assert torch.allclose(padded, native(short).logits, atol=1e-5)


def test_labels_and_mixtral_style_router_api():
    native = _native("mhmoe-h2", **{"moe_ffn.z_coef": 1e-3})
    hf = MHMoEForCausalLM.from_native(native)
    cfg = hf.config
    assert cfg.router_aux_loss_coef == native.cfg.moe_ffn.lb_coef and cfg.router_z_loss_coef == 1e-3
    assert cfg.num_local_experts == native.cfg.moe_ffn.num_experts and cfg.num_expert_heads == 2
    x = torch.randint(1, 512, (2, 16))
    with torch.no_grad():
        ref = native(x)
        ce = torch.nn.functional.cross_entropy(ref.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        out = hf(x, labels=x)  # output_router_logits defaults to False, as in Mixtral: CE only
        assert out.aux_loss is None and out.router_logits is None
        assert torch.allclose(out.loss, ce, atol=1e-6)
        out = hf(x, labels=x, output_router_logits=True)
    n_moe = sum(b.is_moe for b in native.blocks)
    assert len(out.router_logits) == n_moe and out.router_logits[0].shape == (2 * 16 * 2, cfg.num_local_experts)
    lb = sum(a.lb_loss for a in ref.aux)
    z = sum(a.z_loss for a in ref.aux)
    assert torch.allclose(out.aux_loss, lb, atol=1e-6)
    # The native training objective: CE + lb_coef * lb + z_coef * z (= ce + ref.aux_loss).
    assert torch.allclose(out.loss, ce + ref.aux_loss, atol=1e-6)
    assert torch.allclose(out.loss, ce + cfg.router_aux_loss_coef * lb + cfg.router_z_loss_coef * z, atol=1e-6)
    # Padding is excluded from the balance loss; return_dict=False gives the tuple form.
    mask = torch.ones_like(x)
    mask[:, :5] = 0
    with torch.no_grad():
        masked = hf(x, attention_mask=mask, output_router_logits=True)
    assert masked.aux_loss.isfinite() and not torch.allclose(masked.aux_loss, lb)
    assert isinstance(hf(x, return_dict=False), tuple)
    # A training step through the HF interface reaches every kind of parameter.
    hf.train()
    hf(x, labels=x, output_router_logits=True).loss.backward()
    grads = {n: p.grad for n, p in hf.named_parameters()}
    assert all(g is not None and g.isfinite().all() for g in grads.values())
    assert grads["model.blocks.1.ffn.router.weight"].abs().sum() > 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if ROOT is None:
        pytest.skip("real corpora not available (set MHMOE_DATA_ROOT)")
    from mhmoe.training.loop import train

    base = tmp_path_factory.mktemp("hf")
    cfg = preset("smoke", "mhmoe-h2").replace(threads=1, steps=4, eval_every=0, eval_tokens=0)
    train(cfg, base / "run", ROOT, base / "cache", progress=False)
    report = export_hf(base / "run", base / "out")
    return base, report


def test_export_hf_of_a_run_matches_native_model_and_tokenizer(exported, capsys):
    from mhmoe.training.rundir import load_run

    base, report = exported
    out = base / "out"
    assert report["step"] == 4 and report["format"] == "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "mhmoe_export.json",
                 "modeling_mhmoe.py"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "mhmoe"
    loaded = load_run(base / "run", None, ROOT, base / "cache")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == loaded.tokenizer.encode(text)
    assert tok.eos_token_id == loaded.tokenizer.eos_id == model.config.eos_token_id
    with torch.no_grad():
        diff = (model(ids).logits - loaded.model(ids).logits).abs().max().item()
    print(f"export_hf: max |logits(hf) - logits(native run)| = {diff:.2e}")
    assert diff == 0.0
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(gen, loaded.model.generate(ids, 5, temperature=0))
    # Without importing mhmoe.hf, trust_remote_code=True loads the classes (the lm_eval command line's way).
    code = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], "
            "trust_remote_code=True); assert 'mhmoe.hf' in sys.modules; print(type(m).__name__)")
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(base / "hf_modules")})
    assert res.returncode == 0 and res.stdout.strip() == "MHMoEForCausalLM", res.stderr[-2000:]
    # Re-exporting into the same folder works; bad inputs are one-line user errors.
    assert export_hf(base / "run", out, step=2)["step"] == 2
    with pytest.raises(UserError, match="has no checkpoints/"):
        export_hf(out, base / "other")
    (base / "taken").mkdir(exist_ok=True)
    (base / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not an earlier hf export"):
        export_hf(base / "run", base / "taken")
    export_hf(base / "run", out)  # leave the newest step for the next test


def test_lm_eval_harness_perplexity_equals_mhmoe_eval(exported, monkeypatch):
    """lm-evaluation-harness's HFLM on a local loglikelihood_rolling task built from the shared Wikipedia split."""
    pytest.importorskip("accelerate")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mhmoe.training.evaluate import evaluate_run
    from mhmoe.training.rundir import load_run

    base, _ = exported
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(base / "datasets"))
    seq_len, windows = 64, 8
    res = evaluate_run(base / "run", None, ["wikipedia"], windows * seq_len, ROOT, base / "cache")["domains"]["wikipedia"]
    # The same text: mhmoe eval scores tokens 1..n of the corpus, each window seeing its own seq_len tokens; the
    # harness scores a string after a prefix token with disjoint windows of max_length = seq_len. So the string is
    # the decoded tokens 1..n and the prefix is token 0.
    loaded = load_run(base / "run", None, ROOT, base / "cache")
    toks = [int(t) for t in loaded.corpus("wikipedia", windows * seq_len).tokens[: windows * seq_len + 1]]
    text = loaded.tokenizer.decode(toks[1:])
    assert loaded.tokenizer.encode(text) == toks[1:]
    task = base / "task"
    task.mkdir(exist_ok=True)
    (task / "docs.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (task / "mhmoe_local.yaml").write_text(
        "task: mhmoe_local_wikipedia\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task / 'docs.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n")
    model = AutoModelForCausalLM.from_pretrained(base / "out")
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(base / "out"), backend="causal",
              batch_size=4, max_length=seq_len, device="cpu", prefix_token_id=toks[0])
    results = lm_eval.simple_evaluate(model=lm, tasks=["mhmoe_local_wikipedia"], bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(task), include_defaults=False))
    byte_ppl = results["results"]["mhmoe_local_wikipedia"]["byte_perplexity,none"]
    harness_loss = math.log(byte_ppl) * len(text.encode("utf-8")) / (windows * seq_len)  # per-token NLL
    print(f"lm-eval token ppl {math.exp(harness_loss):.4f} vs mhmoe eval {res['ppl']:.4f} "
          f"(loss {harness_loss:.8f} vs {res['loss']:.8f})")
    assert res["tokens"] == windows * seq_len
    assert harness_loss == pytest.approx(res["loss"], rel=1e-6)

    # Plain loglikelihood requests (context, continuation), as multiple-choice tasks send them: the harness's
    # log P(continuation | context) and greediness equal the native model's.
    from lm_eval.api.instance import Instance

    ctx_ids, cont_ids = toks[1:25], toks[25:33]
    context, continuation = loaded.tokenizer.decode(ctx_ids), loaded.tokenizer.decode(cont_ids)
    assert loaded.tokenizer.encode(context) == ctx_ids and loaded.tokenizer.encode(context + continuation) == \
        ctx_ids + cont_ids
    req = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (harness_ll, harness_greedy), = lm.loglikelihood([req])
    with torch.no_grad():
        logp = loaded.model(torch.tensor([ctx_ids + cont_ids])).logits[0].float().log_softmax(-1)  # [T, V]
    pred = logp[len(ctx_ids) - 1 : -1]  # the positions that predict the continuation
    native_ll = pred.gather(1, torch.tensor(cont_ids)[:, None]).sum().item()
    assert harness_ll == pytest.approx(native_ll, rel=1e-5)
    assert harness_greedy == bool((pred.argmax(-1) == torch.tensor(cont_ids)).all())


def test_cli_export_format_hf(exported, capsys):
    from mhmoe.cli import main

    base, _ = exported
    assert main(["export", str(base / "run"), str(base / "cli-out"), "--format", "hf", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hf" and report["step"] == 4
    assert (base / "cli-out" / "model.safetensors").is_file()
    assert main(["export", str(base / "missing-run"), str(base / "x"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mhmoe export: error: ") and err.count("\n") == 1
