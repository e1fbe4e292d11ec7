"""A record's claims at every periodic evaluation (curves) and across records of different lengths (the trend of
`mhmoe reproduce --trend-against`): on constructed numbers against the verdicts' own code, on the 2026-12-04 `cpu`
record, and end to end at the smoke preset. Also the forest plot's row labels."""

import json
import math
import random
import statistics
from pathlib import Path

import pytest
from conftest import shared_data_root

from mhmoe.cli import main
from mhmoe.errors import UserError
from mhmoe.reproduction import reproduce as R
from mhmoe.reproduction import verdicts as V
from mhmoe.reproduction.contrasts import claim_contrasts
from mhmoe.reproduction.curves import paired_curves
from mhmoe.reproduction.paper_tables import DOMAINS, TABLES, Row
from mhmoe.reproduction.report import forest_label
from mhmoe.reproduction.trend import Shorter, check_against, load_shorter, trend, trend_lines

ROOT = shared_data_root()
REPO = Path(__file__).resolve().parents[2]
CPU_RECORD = REPO / "docs" / "reproduction" / "cpu-2026-12-04"


def _records(losses, column="100%", step=10, tokens=5120):
    """results.json-style records from {(variant, bitnet): {seed: {domain: loss}}}."""
    return [{"run_id": f"{v}-s{s}", "variant": v, "bitnet": b, "seed": s, "column": column, "domain": d, "loss": x,
             "ppl": math.exp(x), "step": step, "tokens_seen": tokens, "eval_tokens": 2048}
            for (v, b), per_seed in losses.items() for s, doms in per_seed.items() for d, x in doms.items()]


def test_curves_at_the_last_evaluation_equal_the_verdicts_pairing(tmp_path):
    """Each contrast's per-seed values at a step are the verdicts' (compare_rows / compare_gains / versus_smoe) on the
    same numbers, for Tables 1, 4, 5 and a --models extra; a step a run lacks is left out of its contrasts only."""
    runs = R.plan("smoke", [1, 4, 5], 3, models=None) + [
        r for r in R.plan("smoke", [1], 3, models=["smoe-alf"]) if r.row.variant == "smoe-alf"]
    rng = random.Random(0)
    last = {}  # (variant, bitnet) -> seed -> domain -> loss at step 20
    for r in runs:
        lines = []
        for step in (10, 20):
            if r.run_id == "smoe-alf-s1" and step == 10:
                continue  # an evaluation this run lacks
            point = {d: rng.uniform(3.0, 4.0) for d in DOMAINS}
            lines.append(json.dumps({"step": step, "tokens": step * 512, **point}))
            if step == 20:
                last.setdefault((r.row.variant, r.row.bitnet), {})[r.cfg.seed] = point
        (tmp_path / "runs" / r.run_id).mkdir(parents=True)
        (tmp_path / "runs" / r.run_id / "evals.jsonl").write_text("\n".join(lines) + "\n")
    results = {r.run_id: {"run": r} for r in runs}
    curves = {c["comparison"]: c for c in paired_curves(results, tmp_path, [1, 4, 5])}
    # Table 1: SMoE - Dense, three rows - SMoE, two more links; Table 4: two gains; Table 5: three pairs; the extra.
    assert len(curves) == 6 + 2 + 3 + 1
    assert list(curves)[:4] == ["SMoE - Dense", "Fine-grained SMoE - SMoE", "MH-MoE (head=2) - SMoE",
                                "MH-MoE (head=3) - SMoE"]
    recs = _records(last)
    expected = [V.Comparison(**c) for v in V.verdicts(recs, [1, 4, 5]).values()
                for c in v["columns"]["100%"]["comparisons"]]
    expected += [c for _, c in V.versus_smoe(recs, "100%", [Row("smoe-alf", "smoe-alf")])]
    assert len(expected) == 4 + 2 + 3 + 1
    for c in expected:
        curve = next(x for x in curves.values() if (x["better"], x["worse"]) == (c.better, c.worse))
        assert curve["n_seeds"] == 3 and curve["seeds"] == c.seeds
        assert curve["mean_diff_nats"][-1] == pytest.approx(c.mean_diff_nats, abs=1e-12)
        assert curve["ci95"][-1] == pytest.approx(c.ci95, abs=1e-12)
    assert curves["smoe-alf - SMoE (--models)"]["steps"] == [20]
    assert curves["SMoE - Dense"]["steps"] == [10, 20] and curves["SMoE - Dense"]["tokens"] == [5120, 10240]


def _trend_inputs():
    """A shorter and a longer record of dense, SMoE and h=3 (3 seeds) with known differences."""
    seeds = (1, 2, 3)
    dense = {1: 4.80, 2: 4.85, 3: 4.78}
    short_smoe = [-0.030, -0.040, -0.035]
    short_h3 = [+0.010, +0.000, +0.020]  # h3 - SMoE
    long_smoe = [+0.020, +0.010, +0.030]  # SMoE falls behind dense with length: "loses"
    long_h3 = [-0.020, -0.028, -0.012]  # h=3 gains on SMoE: change -0.030, -0.028, -0.032
    wiki_extra = -0.006  # h=3 gains more on Wikipedia in the longer record

    def record(smoe_d, h3_d, shift, wiki):
        out = {("dense", False): {}, ("smoe", False): {}, ("mhmoe-h3", False): {}}
        for i, s in enumerate(seeds):
            base = dense[s] - shift
            out[("dense", False)][s] = {d: base for d in DOMAINS}
            out[("smoe", False)][s] = {d: base + smoe_d[i] for d in DOMAINS}
            out[("mhmoe-h3", False)][s] = {d: base + smoe_d[i] + h3_d[i] + (wiki if d == "wikipedia" else 0)
                                           for d in DOMAINS}
        return out

    short = _records(record(short_smoe, short_h3, 0.0, 0.0), step=1600, tokens=6_553_600)
    long = _records(record(long_smoe, long_h3, 0.3, wiki_extra), step=4800, tokens=19_660_800)
    change_h3 = [b - a for a, b in zip(short_h3, long_h3)]
    return short, long, change_h3, wiki_extra


def test_trend_pairs_each_claim_by_seed_across_lengths():
    short, long, change_h3, wiki = _trend_inputs()
    shorter = Shorter(Path("short/results.json"), "cpu", "holds", short, {}, "constructed")
    tr = trend(shorter, long, [1], [], "holds")
    by = {c["comparison"]: c for c in tr["comparisons"]}
    assert list(by) == ["SMoE - Dense", "MH-MoE (head=3) - SMoE"]  # the claims whose models both records have
    h3 = by["MH-MoE (head=3) - SMoE"]
    assert h3["seeds"] == [1, 2, 3] and h3["n_seeds"] == 3
    # The mean of the 3 domains moves by wiki / 3 more than the h3 - SMoE difference itself.
    want = [c + wiki / 3 for c in change_h3]
    assert h3["change"]["per_seed"] == pytest.approx(want, abs=1e-12)
    mean, lo, hi = V.paired_interval(want)
    assert h3["change"]["mean_diff_nats"] == pytest.approx(mean) and h3["change"]["ci95"] == pytest.approx([lo, hi])
    assert hi < 0 and h3["reading"] == "gains"
    assert h3["change"]["per_domain"]["wikipedia"]["per_seed"] == pytest.approx([c + wiki for c in change_h3])
    assert h3["change"]["per_domain"]["c4"]["per_seed"] == pytest.approx(change_h3)
    assert h3["shorter"]["per_seed"] == pytest.approx([0.010, 0.000, 0.020])
    assert by["SMoE - Dense"]["change"]["per_seed"] == pytest.approx([0.05, 0.05, 0.065])
    assert by["SMoE - Dense"]["reading"] == "loses"
    assert tr["shorter"]["tokens"] == 6_553_600 and tr["longer"]["tokens"] == 19_660_800
    md = "\n".join(trend_lines(tr))
    assert "## Trend with training length" in md and "(preset `cpu`, 6.55M tokens per model) -> this record (19.7M)" in md
    assert f"| MH-MoE (head=3) - SMoE | +0.0100 [" in md and f"| {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | 3 | gains |" in md
    # A seed missing from the longer record leaves the pair on the seeds both have.
    partial = [r for r in long if not (r["variant"] == "mhmoe-h3" and r["seed"] == 3)]
    h3_two = next(c for c in trend(shorter, partial, [1], [], "holds")["comparisons"] if "head=3" in c["comparison"])
    assert h3_two["seeds"] == [1, 2] and h3_two["change"]["per_seed"] == pytest.approx(want[:2])
    # One seed: no interval, no reading.
    single = [r for r in long if r["seed"] == 1]
    one = trend(Shorter(Path("s"), "cpu", "holds", [r for r in short if r["seed"] == 1], {}, "c"), single, [1], [],
                "holds")["comparisons"]
    assert all(c["change"]["ci95"] is None and c["reading"] == V.NOT_TESTED for c in one)


def _shorter_record(tmp_path, overrides, seeds=2, models=("smoe", "mhmoe-h3")):
    """A results.json as `mhmoe reproduce` writes it (records at 100% and run_configs), without training."""
    runs = R.plan("smoke", [1], seeds, overrides, list(models))
    recs = [{"run_id": r.run_id, "variant": r.row.variant, "bitnet": r.row.bitnet, "seed": r.cfg.seed,
             "column": "100%", "domain": d, "loss": 4.0, "step": r.cfg.steps, "tokens_seen": r.cfg.steps * 512,
             "eval_tokens": 2048} for r in runs for d in DOMAINS]
    path = tmp_path / "short"
    path.mkdir()
    (path / "results.json").write_text(json.dumps({
        "preset": "smoke", "tables": [1], "records": recs, "sanity": {"verdict": "holds"},
        "run_configs": {r.run_id: r.cfg.to_dict() for r in runs}}))
    return path


def test_trend_against_refuses_other_models_seeds_or_lengths_in_one_line(tmp_path):
    shorter = load_shorter(_shorter_record(tmp_path, ["steps=4"]))
    models = ["smoe", "mhmoe-h3"]
    # Length, warm-up, evaluation and checkpoint cadence and threads may differ.
    check_against(shorter, R.plan("smoke", [1], 2, ["steps=8", "optim.warmup_steps=6", "eval_every=4",
                                                   "eval_tokens=1024", "ckpt_every=4", "threads=1"], models))
    bad = {
        "optim.lr is 0.003 there and 0.001 here": R.plan("smoke", [1], 2, ["steps=8", "optim.lr=1e-3"], models),
        "model.moe_ffn.top_k is 1 there and 2 here": R.plan("smoke", [1], 2, ["steps=8", "model.moe_ffn.top_k=2"],
                                                            ["smoe"]),
        "the seeds of smoe differ": R.plan("smoke", [1], 1, ["steps=8"], models),
        "is not shorter than this matrix (4 steps there, 4 here)": R.plan("smoke", [1], 2, ["steps=4"], models),
        "has none of this matrix's models (it has mhmoe-h3, smoe)": R.plan("smoke", [1], 2, ["steps=8"], ["dense"]),
    }
    for message, runs in bad.items():
        with pytest.raises(UserError) as e:
            check_against(shorter, runs)
        assert str(e.value).startswith("--trend-against: ") and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"^--trend-against: .* holds no results.json"):
        load_shorter(tmp_path / "nothing")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match=r"is not the results.json of `mhmoe reproduce`"):
        load_shorter(tmp_path / "junk.json")


def test_the_cpu_record_holds_what_a_cpu_long_trend_needs():
    """The 2026-12-04 `cpu` record stores no configs: they come from the `cpu` preset, checked against the
    parameters and FLOPs it stored; its per-seed, per-domain losses at 100% give the documented differences."""
    shorter = load_shorter(CPU_RECORD)
    assert "preset's definition" in shorter.config_origin
    models = ["dense", "smoe", "mhmoe-h3"]
    check_against(shorter, R.plan("cpu-long", [1], 3, None, models))
    with pytest.raises(UserError, match="the seeds of dense differ"):
        check_against(shorter, R.plan("cpu-long", [1], 2, None, models))
    with pytest.raises(UserError, match="not shorter"):
        check_against(shorter, R.plan("cpu", [1], 3, None, models))
    present = {(m, False) for m in models}
    h3 = next(c for c in claim_contrasts([1], present) if c.name == "MH-MoE (head=3) - SMoE")
    per_seed = h3.per_seed({k: {s: x["mean"] for s, x in V.losses(shorter.records, *k, "100%").items()}
                            for k in present})
    assert [round(x, 3) for x in per_seed.values()] == [0.008, 0.001, 0.000]  # docs/REPRODUCTION.md


def test_forest_labels_tell_every_row_apart():
    rows = []
    for t in TABLES:
        rows += [r for r in TABLES[t][1] if all((r.variant, r.bitnet) != (x.variant, x.bitnet) for x in rows)]
    assert len({r.label for r in rows}) < len(rows)  # the paper's labels alone repeat (Table 2's "SMoE", ...)
    labels = [forest_label(r, list(TABLES)) for r in rows]
    assert len(set(labels)) == len(rows)
    assert forest_label(Row("SMoE", "smoe-shared"), [1, 2]) == "SMoE (T2: smoe-shared)"
    assert forest_label(Row("SMoE", "smoe", True), [1, 3]) == "SMoE (T3: smoe, b1.58)"
    assert forest_label(Row("SMoE", "smoe"), [1, 4]) == "SMoE (T1, T4: smoe)"
    assert forest_label(Row("smoe-alf", "smoe-alf"), [1]) == "smoe-alf (--models: smoe-alf)"


def _mean_losses(results):
    out = {}
    for r in results["records"]:
        if r["column"] == "100%":
            out.setdefault((r["variant"], r["seed"]), []).append(r["loss"])
    return {k: statistics.fmean(v) for k, v in out.items()}


@pytest.mark.skipif(ROOT is None, reason="real corpora not available (set MHMOE_DATA_ROOT)")
def test_two_smoke_records_of_different_lengths_give_curves_and_a_trend(tmp_path, capsys):
    base = ["reproduce", "--preset", "smoke", "--tables", "1", "--models", "smoe,mhmoe-h3", "--data-root", str(ROOT),
            "--no-progress", "--set", "eval_every=2", "--set", "threads=1"]
    short, long = tmp_path / "short", tmp_path / "long"
    assert main(base + ["--seeds", "2", "--out", str(short), "--set", "steps=4"]) == 0
    refused = tmp_path / "refused"
    assert main(base + ["--seeds", "1", "--out", str(refused), "--set", "steps=8", "--trend-against", str(short)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mhmoe reproduce: error: --trend-against: the seeds of smoe differ") and "\n" not in err
    assert not refused.exists()  # refused before anything was trained
    assert main(base + ["--seeds", "2", "--out", str(long), "--set", "steps=8", "--trend-against", str(short)]) == 0
    res_short = json.loads((short / "results.json").read_text())
    res = json.loads((long / "results.json").read_text())
    assert set(res["run_configs"]) == {"smoe-s0", "mhmoe-h3-s0", "smoe-s1", "mhmoe-h3-s1"}
    # The trend: per seed, (h3 - SMoE at 8 steps) - (h3 - SMoE at 4 steps), from the two records' own losses.
    a, b = _mean_losses(res_short), _mean_losses(res)
    seeds = [1337, 1338]
    want = [(b[("mhmoe-h3", s)] - b[("smoe", s)]) - (a[("mhmoe-h3", s)] - a[("smoe", s)]) for s in seeds]
    (c,) = res["trend"]["comparisons"]
    assert c["comparison"] == "MH-MoE (head=3) - SMoE" and c["seeds"] == seeds
    assert c["change"]["per_seed"] == pytest.approx(want, abs=1e-12)
    assert res["trend"]["shorter"]["tokens"] == 4 * 512 and res["trend"]["longer"]["tokens"] == 8 * 512
    assert "## Trend with training length" in (long / "tables.md").read_text()
    # The curve: every periodic evaluation; its last point is the 100% milestone (same windows, same weights).
    (curve,) = res["curves"]
    assert curve["steps"] == [2, 4, 6, 8] and curve["tokens"] == [1024, 2048, 3072, 4096] and curve["n_seeds"] == 2
    assert [ys[-1] for ys in curve["per_seed"]] == pytest.approx(
        [b[("mhmoe-h3", s)] - b[("smoe", s)] for s in seeds], abs=1e-9)
    assert len(curve["ci95"]) == 4 and all(lo <= m <= hi for (lo, hi), m in zip(curve["ci95"], curve["mean_diff_nats"]))
    assert (long / "plots" / "differences_vs_tokens.png").stat().st_size > 10_000
    assert res_short["trend"] is None
