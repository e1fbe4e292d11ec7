"""`mhmoe sensitivity` (mhmoe.reproduction.sensitivity): columns read from records, models taken from the last
source that gives them, contrasts equal to hand-computed seed-paired means and Student-t intervals, the shift
between columns paired by seed, and one-line errors naming the flag."""

import json
import math
import statistics

import pytest

from mhmoe.cli.main import main
from mhmoe.errors import UserError
from mhmoe.reproduction.sensitivity import Column, Source, render, sensitivity

DOMAINS = ("redpajama", "wikipedia", "c4")
SEEDS = (1337, 1338, 1339)


def _record(tmp_path, name, losses, profile="mhmoe"):
    """A results.json with, per variant and seed, the same loss in every domain plus a per-domain offset."""
    recs = [{"variant": v, "bitnet": False, "seed": s, "column": "100%", "domain": d,
             "loss": loss + 0.01 * i}
            for v, per_seed in losses.items() for s, loss in zip(SEEDS, per_seed) for i, d in enumerate(DOMAINS)]
    out = tmp_path / name
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"profile": profile, "records": recs}))
    return out


def _t_interval(diffs):
    from scipy.stats import t as student_t  # here, not at collection: 0.6 s of every xdist worker's start

    m = statistics.fmean(diffs)
    half = student_t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


@pytest.fixture
def records(tmp_path):
    ours = _record(tmp_path, "ours", {"dense": [4.0, 4.1, 4.2], "smoe": [3.9, 4.0, 4.05],
                                      "mhmoe-h3": [3.92, 4.01, 4.07], "mhmoe-h2": [3.91, 4.0, 4.06]})
    theirs = _record(tmp_path, "theirs", {"dense": [4.0, 4.1, 4.2], "smoe": [4.0, 4.12, 4.2],
                                          "mhmoe-h3": [3.95, 4.05, 4.17]}, profile="authors")
    raw = _record(tmp_path, "raw", {"mhmoe-h3-rawgates": [3.96, 4.02, 4.1], "fine-grained-rawgates": [3.8, 3.9, 4.0]})
    return ours, theirs, raw


def test_contrasts_and_shifts_equal_the_hand_computed_paired_intervals(records):
    ours, theirs, raw = records
    cols = [Column("ours", [Source.parse(str(ours))]), Column("authors", [Source.parse(str(theirs))]),
            Column("raw", [Source.parse(f"{ours}:smoe"),
                           Source.parse(f"{raw}:mhmoe-h3=mhmoe-h3-rawgates,fine-grained=fine-grained-rawgates")])]
    res = sensitivity(cols)
    rows = {r["comparison"]: r for r in res["rows"]}
    h3 = rows["MH-MoE (head=3) - SMoE"]
    d_ours = [0.02, 0.01, 0.02]
    d_theirs = [-0.05, -0.07, -0.03]
    d_raw = [0.06, 0.02, 0.05]  # the raw-gates h3 against OUR SMoE (the column's first source)
    for cell, diffs in zip(h3["cells"], (d_ours, d_theirs, d_raw)):
        m, lo, hi = _t_interval(diffs)
        assert cell["mean_diff_nats"] == pytest.approx(m) and cell["ci95"] == pytest.approx([lo, hi])
        assert cell["n_seeds"] == 3 and cell["seeds"] == list(SEEDS)
    m, lo, hi = _t_interval([a - b for a, b in zip(d_theirs, d_ours)])
    assert h3["shift_from_first"][0]["mean_diff_nats"] == pytest.approx(m)
    assert h3["shift_from_first"][0]["ci95"] == pytest.approx([lo, hi]) and h3["shift_from_first"][0]["moved"] == "lower"
    # Models a column lacks leave its cells empty: h2 in the authors' and raw columns, fine-grained in ours.
    assert rows["MH-MoE (head=2) - SMoE"]["cells"][1:] == [None, None]
    assert rows["Fine-grained SMoE - SMoE"]["cells"][0] is None
    assert rows["Fine-grained SMoE - SMoE"]["cells"][2]["mean_diff_nats"] == pytest.approx(
        statistics.fmean([-0.1, -0.1, -0.05]))
    assert [c["profiles"] for c in res["columns"]] == [["mhmoe"], ["authors"], ["mhmoe", "mhmoe"]]
    # Each model's own loss: the authors' SMoE is worse than ours by [0.1, 0.12, 0.15] per seed; dense is the same.
    models = {m["variant"]: m for m in res["models"]}
    m, lo, hi = _t_interval([0.1, 0.12, 0.15])
    assert models["smoe"]["shift_from_first"][0]["mean_diff_nats"] == pytest.approx(m)
    assert models["smoe"]["shift_from_first"][0]["ci95"] == pytest.approx([lo, hi])
    assert models["dense"]["shift_from_first"][0]["mean_diff_nats"] == pytest.approx(0.0, abs=1e-12)
    assert models["dense"]["cells"][2] is None and models["smoe"]["cells"][2]["mean_loss"] == pytest.approx(
        statistics.fmean([3.9, 4.0, 4.05]) + 0.01)
    text = render(res)
    assert "| MH-MoE (head=3) - SMoE | +0.0167 [" in text
    assert "| SMoE | 3.9933 (n=3) | 4.1167 (+0.1233 [" in text
    assert "under authors, the verdict moves from reversed to holds; the difference shifts by -0.0667 nats [" in text
    assert "- **Fine-grained SMoE - SMoE**: not measured under ours, so no shift from it." in text


def test_a_later_source_overrides_an_earlier_one(records):
    ours, theirs, _ = records
    res = sensitivity([Column("a", [Source.parse(str(ours))]),
                       Column("b", [Source.parse(str(ours)), Source.parse(f"{theirs}:mhmoe-h3")])])
    h3 = next(r for r in res["rows"] if r["comparison"] == "MH-MoE (head=3) - SMoE")
    # b: authors' h3 against our SMoE: [3.95-3.9, 4.05-4.0, 4.17-4.05]
    assert h3["cells"][1]["mean_diff_nats"] == pytest.approx(statistics.fmean([0.05, 0.05, 0.12]))


@pytest.mark.parametrize("spec, message", [
    ("{raw}:mhmoe-h9=x", "'mhmoe-h9' is no model of Table 1"),
    ("{raw}:smoe-authors", "'smoe-authors' is no model of Table 1; use one of dense, smoe, fine-grained"),
    ("{raw}:mhmoe-h3=mhmoe-h3-authors", "holds no 'mhmoe-h3-authors' (it holds fine-grained-rawgates, "
                                        "mhmoe-h3-rawgates)"),
    ("{raw}/nowhere", "holds no results.json"),
])
def test_bad_sources_are_one_line_naming_the_flag(records, spec, message, capsys):
    ours, _, raw = records
    code = main(["sensitivity", "--column", "ours", str(ours), "--column", "x", spec.format(raw=raw)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "mhmoe sensitivity: error: --column:" in err and message in err


def test_cli_prints_the_table_and_writes_json(records, tmp_path, capsys):
    ours, theirs, _ = records
    out = tmp_path / "s.json"
    assert main(["sensitivity", "--column", "ours", str(ours), "--column", "authors", str(theirs),
                 "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| contrast (negative = claimed better is better) | ours | authors |")
    assert json.loads(out.read_text())["rows"][2]["comparison"] == "MH-MoE (head=3) - SMoE"
    assert main(["sensitivity", "--column", "ours", str(ours)]) == 2
    assert "give at least two columns" in capsys.readouterr().err
