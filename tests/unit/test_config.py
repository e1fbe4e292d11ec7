"""FFNConfig: validation with one-line errors that name the field, unknown keys, coercion; TrainConfig.compile's
named modes and the booleans older configs wrote; the `cpu-long` preset against `cpu`."""

import json

import pytest

from mhmoe import ConfigError, FFNConfig
from mhmoe.training.config import TrainConfig
from mhmoe.training.presets import preset
from mhmoe.training.rundir import _check_same_config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=30, heads=4), r"FFNConfig\.heads: dim \(30\) must be divisible by heads \(4\)"),
        (dict(top_k=9, num_experts=8), r"FFNConfig\.top_k: must satisfy 1 <= top_k <= num_experts"),
        (dict(top_k=0), r"FFNConfig\.top_k"),
        (dict(hidden_dim=0), r"FFNConfig\.hidden_dim: must be > 0"),
        (dict(dim=-1), r"FFNConfig\.dim: must be > 0"),
        (dict(num_experts=0, top_k=0), r"FFNConfig\.num_experts: must be >= 1"),
        (dict(shared_hidden_dim=-2), r"FFNConfig\.shared_hidden_dim"),
        (dict(jitter=1.5), r"FFNConfig\.jitter"),
        (dict(capacity_factor=-1.0), r"FFNConfig\.capacity_factor"),
        (dict(kind="sparse"), r"FFNConfig\.kind: 'sparse' is not allowed; use one of 'dense', 'moe'"),
        (dict(dispatch="magic"), r"FFNConfig\.dispatch"),
        (dict(kind="dense", heads=2), r"FFNConfig\.heads: only applies to kind='moe'"),
        (dict(top_k="two"), r"FFNConfig\.top_k: expected an integer"),
        (dict(head_layer="maybe"), r"FFNConfig\.head_layer: expected true/false"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        FFNConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_keys_and_coerces_strings():
    with pytest.raises(ConfigError, match=r"num_expert: unknown key for FFNConfig; valid keys: .*num_experts"):
        FFNConfig.from_dict({"num_expert": 8})
    cfg = FFNConfig.from_dict({"top_k": "2", "head_layer": "true", "lb_coef": "0.02"})
    assert cfg.top_k == 2 and cfg.head_layer is True and cfg.lb_coef == 0.02
    assert FFNConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.override("heads", "3").heads == 3



@pytest.mark.parametrize("old, new", [(False, "off"), (True, "on"), ("false", "off"), ("true", "on"),
                                      ("auto", "auto"), ("cudagraphs", "cudagraphs")])
def test_train_config_compile_reads_the_old_booleans(old, new, tmp_path):
    """TrainConfig.compile was a bool: config.json files and commands that say true/false still load."""
    assert TrainConfig.from_dict({"compile": old, "device": "auto"}).compile == new
    assert TrainConfig(device="auto").override("compile", str(old).lower()).compile == new
    assert TrainConfig().compile == "auto"
    stored = tmp_path / "config.json"  # an old run's config.json against today's resolved config: the same run
    stored.write_text(json.dumps({**json.loads(TrainConfig(device="auto").to_json()), "compile": old}))
    _check_same_config(stored, TrainConfig(device="auto"))


def test_train_config_compile_rejects_other_values():
    with pytest.raises(ConfigError, match=r"compile: 'yes' is not allowed; use one of 'auto', 'off', 'on', 'cudagraphs'"):
        TrainConfig.from_dict({"compile": "yes"})
    with pytest.raises(ConfigError, match=r"TrainConfig\.compile: 'cudagraphs' needs device=cuda") as info:
        TrainConfig(compile="cudagraphs")  # device="cpu", the default
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variant", ["dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"])
def test_cpu_long_is_the_cpu_model_and_batch_trained_at_least_3x_longer(variant):
    """Issue 28: the trend with training length compares `cpu-long` with the `cpu` record, so the two may differ
    only in length (steps, the warm-up and cosine that scale with it) and in evaluation/checkpoint cadence."""
    short, long = preset("cpu", variant), preset("cpu-long", variant)
    assert long.model == short.model and long.data == short.data
    assert (long.tokens_per_step, long.batch_size, long.seq_len) == (short.tokens_per_step, short.batch_size,
                                                                    short.seq_len)
    assert long.steps * long.tokens_per_step >= 3 * short.steps * short.tokens_per_step
    assert long.steps >= 4800
    assert long.optim == short.optim.replace(warmup_steps=long.optim.warmup_steps)
    assert long.optim.warmup_steps == long.steps // 10  # the warm-up scales with the length, as cpu's
    # One run gives a curve: a periodic evaluation at least every 10% of the steps, on the milestones' 65,536
    # tokens per domain, and the milestones (50%, 100%) fall on periodic points.
    assert 0 < long.eval_every <= long.steps // 10 and long.eval_tokens == long.data.max_eval_tokens == 65_536
    assert all(m % long.eval_every == 0 for m in long.milestones)
