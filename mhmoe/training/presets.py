"""Presets (scales) and model variants (the paper's rows), as Python functions.

A preset fixes the base dimensions (D, layers, the SMoE's F/E/K) and the training budget; a variant turns the
base into one row of the paper's tables. MH-MoE sizes are derived by the section 2.3 calculator, never
restated, so every scale gets its own FLOPs- and parameter-matched MH-MoE.

Variant grammar: BASE[-MOD...], BASE in {dense, smoe, fine-grained, mhmoe-hN}, MOD in
    shared   add a shared expert of width F to a MoE model (Table 2)
    hm       add head and merge layers (2 D^2 more FLOPs) to smoe / fine-grained, or to an MH-MoE sized
             without them (`mhmoe-h2-nohm-hm`: Table 4's "MH-MoE with head & merge" row)
    nohm, nohead, nomerge        MH-MoE without both / the head / the merge layer, re-matched: the experts are
                                 re-sized by the calculator to the SMoE's FLOPs without those layers (Table 4)
    drophm, drophead, dropmerge  MH-MoE with Table 1's expert sizes and the layers removed, not re-matched, so
                                 it has fewer FLOPs (Table 5, as the paper's numbers imply; docs/REPRODUCTION.md)
    sigmoid  sigmoid router scores, top-k normalised as DeepSeek-V3 (FFNConfig.scoring; beyond the paper)
    alf      aux-loss-free balancing: a selection bias moved after each step, no lb loss added
             (FFNConfig.balancing="bias"; beyond the paper; docs/ROUTING.md)
    rawgates raw top-k softmax probabilities as combine weights at every k (FFNConfig.renormalize="never"), the
             one authors' setting on its own (the sensitivity column of docs/REPRODUCTION.md)
    authors  the MoE settings of the authors' released code (`authors_moe`, `AUTHORS_MODEL`): raw top-k gates,
             capacity K * ceil(S / E) in training and evaluation, first-choice balance loss, head and merge with
             bias and Xavier init (full precision under BitNet), experts and gate kaiming-uniform
The routing suffixes compose with every other one and with each other (`smoe-alf`, `mhmoe-h3-sigmoid-alf`,
`mhmoe-h3-shared-authors`) and change neither sizes nor FLOPs (-authors adds 2 D bias parameters with head and
merge).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mhmoe.complexity import fine_grained, solve_parity
from mhmoe.data.corpora import DataConfig
from mhmoe.errors import ConfigError
from mhmoe.layers.config import FFNConfig
from mhmoe.model import ModelConfig
from mhmoe.training.config import OptimConfig, TrainConfig

PAPER_VARIANTS = ("dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3")
_MODS = ("shared", "hm", "nohm", "nohead", "nomerge", "drophm", "drophead", "dropmerge", "sigmoid", "alf", "rawgates",
         "authors")
PROFILES = ("mhmoe", "authors")  # `mhmoe reproduce --profile`: our MoE settings, or the authors' (-authors)

# The ModelConfig fields of -authors: the initialisation of the authors' code and their full-precision head and
# merge under BitNet (yushuiwx/MH-MoE, torchscale's tutel_moe_layer.py and feedforward_network.py).
AUTHORS_MODEL = {"head_merge_init": "xavier", "moe_init": "kaiming_uniform", "bitnet_head_merge": False}


def authors_moe(cfg: FFNConfig) -> FFNConfig:
    """The authors' MoE-layer settings applied to `cfg`, each an FFNConfig field usable on its own: their top-k
    gate is built without its normalise flag (raw probabilities at every k); capacity top_k * ceil(S / E) slots
    filled first choices first, in training and (eval capacity fraction -1) in evaluation; `gshard_loss` on the
    first choice; head and merge nn.Linear with bias."""
    return cfg.replace(renormalize="never", capacity_factor=1.0, capacity_rule="choice_order", capacity_in_eval=True,
                       balance_choices="first", head_merge_bias=cfg.head_layer or cfg.merge_layer)


def with_profile(variant: str, profile: str) -> str:
    """`variant` under a `reproduce --profile`: "authors" suffixes every MoE variant with -authors; the dense
    model is the same run in both profiles."""
    if profile not in PROFILES:
        raise ConfigError(f"--profile: unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    if profile == "mhmoe" or variant == "dense" or is_authors(variant):
        return variant
    return f"{variant}-authors"
_VARIANT = re.compile(r"^(dense|smoe|fine-grained|mhmoe-h([1-9][0-9]*))((?:-(?:" + "|".join(_MODS) + r"))*)$")


@dataclass(frozen=True)
class Base:
    """The base model of a preset: an SMoE (D, F, E, K) every `moe_every` layers; dense FFNs have width F."""

    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    num_experts: int = 8
    top_k: int = 1
    moe_every: int = 2


def variant_ffn(base: Base, variant: str) -> FFNConfig:
    """The MoE-block FFN of `variant` at the `base` scale (kind='dense' for the dense model)."""
    m = _VARIANT.match(variant)
    if not m:
        raise ConfigError(
            f"--model: unknown variant {variant!r}; use one of {', '.join(PAPER_VARIANTS)} with optional "
            "suffixes -shared, -hm (smoe/fine-grained/mhmoe-hN-nohm), -nohm/-nohead/-nomerge (re-matched) or "
            "-drophm/-drophead/-dropmerge (not re-matched) for mhmoe-hN, -sigmoid and -alf (routing, any MoE), "
            "-rawgates and -authors (raw top-k gates; all of the authors' MoE settings; any MoE)"
        )
    kind, heads, parts = m.group(1), m.group(2), list(filter(None, m.group(3).split("-")))
    mods = set(parts)
    if len(mods) != len(parts):
        raise ConfigError(f"--model: a suffix appears twice in {variant!r}")
    smoe = FFNConfig(kind="moe", dim=base.dim, hidden_dim=base.hidden_dim, num_experts=base.num_experts,
                     top_k=base.top_k)
    removals = mods & {"nohm", "nohead", "nomerge", "drophm", "drophead", "dropmerge"}
    if kind == "dense":
        if mods:
            raise ConfigError(f"--model: the dense model takes no suffix, got {variant!r}")
        return FFNConfig(kind="dense", dim=base.dim, hidden_dim=base.hidden_dim)
    if kind in ("smoe", "fine-grained"):
        if removals:
            raise ConfigError(f"--model: -no*/-drop* suffixes apply to mhmoe-hN only, got {variant!r}")
        cfg = smoe if kind == "smoe" else fine_grained(smoe, 2)
        if "hm" in mods:
            cfg = cfg.replace(head_layer=True, merge_layer=True)
    else:
        if len(removals) > 1:
            raise ConfigError(
                f"--model: use one of -nohm/-nohead/-nomerge/-drophm/-drophead/-dropmerge, got {variant!r}")
        removal = next(iter(removals), "")
        if "hm" in mods and removal != "nohm":
            raise ConfigError(
                f"--model: MH-MoE has head and merge layers already; -hm applies only after -nohm (the re-matched "
                f"model without them, Table 4), got {variant!r}"
            )
        gone = removal[2:] if removal.startswith("no") else ""  # re-matched: sized without these layers
        head, merge = gone not in ("hm", "head"), gone not in ("hm", "merge")
        try:
            # The paper's leading-term recipe at every scale (router FLOPs not matched): the tiny preset then
            # keeps section 3's sizes / 4 exactly (its 40 x 192 router adds 2.1% FLOPs; 0.5% at d=768).
            cfg = solve_parity(base.dim, base.hidden_dim, base.num_experts, base.top_k, int(heads),
                               head_layer=head, merge_layer=merge, router_aware=False).mhmoe
        except ValueError as e:
            raise ConfigError(f"--model {variant}: {e}") from None
        if removal.startswith("drop"):  # Table 1's experts, the layers taken out without re-sizing
            dropped = removal[4:]
            cfg = cfg.replace(head_layer=dropped not in ("hm", "head"), merge_layer=dropped not in ("hm", "merge"))
        if "hm" in mods:  # Table 4: the model sized without head & merge, the two layers added back
            cfg = cfg.replace(head_layer=True, merge_layer=True)
    if "shared" in mods:
        cfg = cfg.replace(shared_hidden_dim=base.hidden_dim)
    if "sigmoid" in mods:
        cfg = cfg.replace(scoring="sigmoid")
    if "alf" in mods:
        cfg = cfg.replace(balancing="bias")
    if "rawgates" in mods:
        if "sigmoid" in mods:
            raise ConfigError(f"--model: -rawgates applies to softmax gates; drop -sigmoid or -rawgates in {variant!r}")
        cfg = cfg.replace(renormalize="never")
    if "authors" in mods:
        if "sigmoid" in mods:
            raise ConfigError(f"--model: -authors keeps raw softmax gates, which -sigmoid does not have; drop one "
                              f"of them in {variant!r}")
        cfg = authors_moe(cfg)
    return cfg


def is_authors(variant: str) -> bool:
    """Whether `variant` carries the -authors suffix."""
    return "authors" in variant.split("-")


def model_config(base: Base, variant: str, vocab_size: int, max_seq_len: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, dim=base.dim, n_layers=base.n_layers, n_heads=base.n_heads, max_seq_len=max_seq_len,
        moe_every=base.moe_every, dense_ffn=FFNConfig(kind="dense", dim=base.dim, hidden_dim=base.hidden_dim),
        moe_ffn=variant_ffn(base, variant), **(AUTHORS_MODEL if is_authors(variant) else {}),
    )


def smoke(variant: str) -> TrainConfig:
    """Seconds: for tests. d=48 (divisible by 2 and 3 heads), 2 layers, a 512-token BPE on tinyshakespeare."""
    base = Base(dim=48, n_layers=2, n_heads=2, hidden_dim=128, num_experts=4)
    data = DataConfig(train_corpus="tinyshakespeare", vocab_size=512, tokenizer_train_bytes=300_000,
                      max_train_bytes=300_000, max_eval_tokens=2048)
    return TrainConfig(
        preset="smoke", variant=variant, model=model_config(base, variant, 512, 64), data=data,
        optim=OptimConfig(lr=3e-3, warmup_steps=3), steps=20, batch_size=8, seq_len=64, tokens_per_step=512,
        eval_every=10, ckpt_every=10, eval_tokens=2048,
    )


def demo(variant: str) -> TrainConfig:
    """A short demo of the whole pipeline, not a measurement: `mhmoe reproduce --preset demo --workers 2` (19
    runs; its wall time is in the README). d=96, 4 layers, 4 experts (MH h=3: 44 x 64), 2048-token BPE,
    80 steps of 2048 tokens; 8192 evaluation tokens per domain."""
    base = Base(dim=96, n_layers=4, n_heads=4, hidden_dim=256, num_experts=4)
    data = DataConfig(vocab_size=2048, tokenizer_train_bytes=2_000_000, max_train_bytes=4_000_000,
                      max_eval_tokens=8192)
    return TrainConfig(
        preset="demo", variant=variant, model=model_config(base, variant, 2048, 128), data=data,
        optim=OptimConfig(lr=3e-3, warmup_steps=8), steps=80, batch_size=16, seq_len=128, tokens_per_step=2048,
        eval_every=40, ckpt_every=40, eval_tokens=4096,
    )


def tiny(variant: str) -> TrainConfig:
    """The CPU reproduction scale: the paper's sizes / 4 (d=192, F=512, 8 experts; MH h=2 40x192, h=3 96x128),
    6 layers, 8192-token BPE, 320 steps of 4096 tokens (1.3M tokens); its speed on 2 CPU cores is recorded in
    docs/REPRODUCTION.md."""
    base = Base(dim=192, n_layers=6, n_heads=6, hidden_dim=512)
    data = DataConfig(vocab_size=8192, tokenizer_train_bytes=8_000_000, max_eval_tokens=65_536)
    return TrainConfig(
        preset="tiny", variant=variant, model=model_config(base, variant, 8192, 256), data=data,
        optim=OptimConfig(lr=2e-3, warmup_steps=32), steps=320, batch_size=16, seq_len=256, tokens_per_step=4096,
        eval_every=80, ckpt_every=40, eval_tokens=16_384,
    )


def cpu_scale(variant: str, *, dim: int = 144, n_layers: int = 4, n_heads: int = 4, hidden_dim: int = 384,
              steps: int = 175, lr: float = 2e-3, eval_tokens: int = 8192, evals: int = 8,
              preset_name: str = "cpu") -> TrainConfig:
    """The family the `cpu` preset was picked from (benchmarks/cpu_pilot.py): small models trained on many
    tokens per parameter, which narrow the seed-paired interval per CPU-hour most (docs/REPRODUCTION.md).

    Fixed across the family: the paper's 8 experts top-1 SMoE with MoE every 2nd layer, a 4096-token BPE,
    128-token windows, 4096 tokens per step, a 10% warm-up (the `demo` schedule's 8 warm-up steps let one SMoE
    seed spike to a grad norm of 31, which decided that pair), grad clip 1, 65,536 evaluation tokens per domain
    at the 50% and 100% milestones. `evals` periodic points, each an evaluation on `eval_tokens` tokens per
    domain and a checkpoint, so that an interrupted run loses at most one interval.
    """
    base = Base(dim=dim, n_layers=n_layers, n_heads=n_heads, hidden_dim=hidden_dim)
    data = DataConfig(vocab_size=4096, tokenizer_train_bytes=4_000_000, max_eval_tokens=65_536)
    return TrainConfig(
        preset=preset_name, variant=variant, model=model_config(base, variant, 4096, 128), data=data,
        optim=OptimConfig(lr=lr, warmup_steps=max(1, steps // 10)), steps=steps, batch_size=32, seq_len=128,
        tokens_per_step=4096, eval_every=max(1, steps // evals), eval_tokens=eval_tokens,
        ckpt_every=max(1, steps // evals),
    )


def cpu(variant: str) -> TrainConfig:
    """The CPU reproduction preset, re-chosen on 2026-12-04 for the regime (docs/REPRODUCTION.md, the recipe study):
    the 2026-12-03 model (d=144, 4 layers (2 MoE blocks), SMoE 8 x 384 top-1, MH h=3 96 x 96 on 48-dim
    sub-tokens, 4096-token BPE, 128-token windows, 4096 tokens per step) trained 9x longer, 1600 steps (6.6M
    tokens, 0.63 epochs of the training mix), where SMoE beats the dense model; 16,384 evaluation tokens per
    domain at each of the 8 periodic points."""
    return cpu_scale(variant, steps=1600, eval_tokens=16_384)


def cpu_long(variant: str) -> TrainConfig:
    """The `cpu` preset's model, tokenizer and batch trained 3x longer, for the verdict across training length
    (docs/REPRODUCTION.md, "cpu-long"): 4800 steps of 4096 tokens (19.7M tokens, about 12 per active parameter
    of the 1.6M-active models), 480 warm-up steps (10%), the cosine over all 4800. That is 1.90 epochs of the
    training mix: 19,660,800 / 10,352,080, the mix's tokens under the `cpu` 4096-token BPE (`cpu`'s 0.63 is
    6,553,600 over the same count), so a window is seen about twice in expectation (starts are drawn at random).
    Ten periodic points (every 480 steps) on 65,536 evaluation tokens per domain, the milestones' windows, so
    one run gives a curve whose 50% and 100% points are the milestone evaluations; a checkpoint at each.

    Not yet run. Estimated from the 2026-12-04 `cpu` record's steady tokens/s with two processes (about 7,000
    dense, 6,600 SMoE, 5,400 MH-MoE h=3): 47-61 minutes of one core per run plus about 2 minutes of evaluation,
    so `--models dense,smoe,mhmoe-h3 --seeds 3 --workers 2` takes about 4 hours of 2 cores and Table 1's five
    rows x 3 seeds about 7 (`--trend-against` the `cpu` record for the change of each claim with length)."""
    return cpu_scale(variant, steps=4800, eval_tokens=65_536, evals=10, preset_name="cpu-long")


def gpu(variant: str) -> TrainConfig:
    """One GPU: the paper's sizes / 2 (d=384, F=1024), 12 layers, GPT-2 BPE, bf16, ~0.5B tokens (its time per
    model is an estimate until benchmarks/gpu_check.sh has run on a GPU; README)."""
    base = Base(dim=384, n_layers=12, n_heads=6, hidden_dim=1024)
    data = DataConfig(tokenizer="gpt2", max_eval_tokens=1_000_000)
    return TrainConfig(
        preset="gpu", variant=variant, model=model_config(base, variant, 50304, 1024), data=data,
        optim=OptimConfig(lr=1.5e-3, warmup_steps=200), steps=4000, batch_size=64, seq_len=1024,
        tokens_per_step=131_072, dtype="bfloat16", device="auto", eval_every=1000, ckpt_every=500,
        eval_tokens=262_144,
    )


def gpu_9min(variant: str, *, dim: int = 384, n_layers: int = 12, n_heads: int = 6, hidden_dim: int = 1024,
             preset_name: str = "gpu-9min") -> TrainConfig:
    """Table 1 x 3 seeds in 9 minutes on one H100/H200 (`mhmoe reproduce --preset gpu-9min --tables 1 --seeds 3`;
    estimated, not yet timed), aimed at a regime where SMoE beats dense (docs/REPRODUCTION.md, the recipe study;
    its CPU pilot at reduced width does not reach it, so its claims may read "not interpretable"): the `gpu`
    model (d=384, 12
    layers, SMoE 8 x 1024 top-1) with a trained 8192-token BPE instead of GPT-2's 50k (the LM head falls from 43%
    to 12% of the FLOPs), 600 steps of 64 x 256 tokens (9.8M tokens, about one pass over the training mix), lr
    1.5e-3 with 10% warm-up. Its data travels as a token pack of about 20 MiB (`mhmoe data pack --preset
    gpu-9min`). The keywords give the reduced-width twins with this exact step schedule that the CPU pilot
    trains (benchmarks/regime_pilot.py)."""
    base = Base(dim=dim, n_layers=n_layers, n_heads=n_heads, hidden_dim=hidden_dim)
    data = DataConfig(vocab_size=8192, tokenizer_train_bytes=8_000_000, max_eval_tokens=262_144)
    return TrainConfig(
        preset=preset_name, variant=variant, model=model_config(base, variant, 8192, 256), data=data,
        optim=OptimConfig(lr=1.5e-3, warmup_steps=60), steps=600, batch_size=64, seq_len=256,
        tokens_per_step=16_384, dtype="bfloat16", device="auto", eval_every=75, eval_tokens=65_536,
        ckpt_every=300,
        # Eager: 15 runs of ~15 s each cannot win back torch.compile's tens of seconds per model
        # (benchmarks/estimate_gpu_time.py assumes eager; the GPU check times it).
        compile="off",
    )


def paper(variant: str) -> TrainConfig:
    """Section 3 exactly: 12 layers, d=768, 12 heads, MoE every 2 layers, SMoE 8 x 2048 top-1, 0.5M-token
    batches, 100k steps (multi-GPU scale)."""
    base = Base(dim=768, n_layers=12, n_heads=12, hidden_dim=2048)
    data = DataConfig(tokenizer="gpt2")
    return TrainConfig(
        preset="paper", variant=variant, model=model_config(base, variant, 50304, 2048), data=data,
        optim=OptimConfig(lr=6e-4, warmup_steps=2000), steps=100_000, batch_size=16, seq_len=2048,
        tokens_per_step=524_288, dtype="bfloat16", device="auto", eval_every=10_000, ckpt_every=1000,
        eval_tokens=1_000_000,
    )


PRESETS = {"smoke": smoke, "demo": demo, "cpu": cpu, "cpu-long": cpu_long, "tiny": tiny, "gpu": gpu,
           "gpu-9min": gpu_9min, "paper": paper}


def preset_names() -> str:
    """The presets as help texts name them: "smoke, demo, ..., gpu or paper" (from PRESETS, never restated)."""
    names = list(PRESETS)
    return ", ".join(names[:-1]) + " or " + names[-1]


def describe_preset(name: str) -> tuple[str, str]:
    """(scale, tokens) of preset `name` as the README's presets table states them, computed from the preset:
    ("d=144, 4 layers, SMoE 8 x 384 top-1 (MH h=2: 40 x 144, h=3: 96 x 96), 4096-token BPE, 1,600 steps x
    4,096 tokens", "6.55M")."""
    cfg = preset(name, "smoe")
    m, ffn = cfg.model, cfg.model.moe_ffn
    mh = [preset(name, f"mhmoe-h{h}").model.moe_ffn for h in (2, 3)]
    vocab = "GPT-2 BPE" if cfg.data.tokenizer == "gpt2" else f"{cfg.data.vocab_size}-token BPE"
    corpus = " on tinyshakespeare" if cfg.data.train_corpus == "tinyshakespeare" else ""
    scale = (f"d={m.dim}, {m.n_layers} layers, SMoE {ffn.num_experts} x {ffn.hidden_dim} top-{ffn.top_k} (MH "
             f"h=2: {mh[0].num_experts} x {mh[0].hidden_dim}, h=3: {mh[1].num_experts} x {mh[1].hidden_dim}), "
             f"{vocab}{corpus}, {cfg.steps:,} steps x {cfg.tokens_per_step:,} tokens")
    tokens = cfg.steps * cfg.tokens_per_step
    return scale, (f"{tokens / 1e9:.3g}B" if tokens >= 1e9 else f"{tokens / 1e6:.3g}M" if tokens >= 1e6
                   else f"{tokens / 1e3:.3g}k")


def preset(name: str, variant: str) -> TrainConfig:
    """The TrainConfig of preset `name` for model `variant`."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name](variant)
