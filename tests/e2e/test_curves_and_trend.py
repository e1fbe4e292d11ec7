"""A record's claims at every periodic evaluation (curves), on constructed numbers against the verdicts' own code.
Also the forest plot's row labels."""

import json
import math
import random

import pytest

from mhmoe.reproduction import reproduce as R
from mhmoe.reproduction import verdicts as V
from mhmoe.reproduction.curves import paired_curves
from mhmoe.reproduction.paper_tables import DOMAINS, TABLES, Row
from mhmoe.reproduction.report import forest_label


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
