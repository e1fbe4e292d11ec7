"""`mhmoe reproduce` on the smoke preset (real training, tiny sizes) and its verdict logic on constructed numbers."""

import json
import math
import statistics

import pytest
from conftest import shared_data_root

from mhmoe.reproduction import report
from mhmoe.reproduction import reproduce as R
from mhmoe.reproduction import verdicts as V
from mhmoe.cli import main
from mhmoe.cli import reproduce as CR
from mhmoe.errors import ConfigError
from mhmoe.reproduction.paper_tables import DOMAINS, TABLES, Row

ROOT = shared_data_root()


def test_plan_reuses_identical_runs_across_tables():
    runs = R.plan("smoke", [1, 4, 5], seeds=2)
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids))
    # T1: 5 variants; T4 adds smoe-hm, fine-grained-hm, mhmoe-h2-nohm, mhmoe-h2-nohm-hm; T5 adds the three
    # not-re-matched ablations of Table 1's h=2. x 2 seeds.
    assert len(runs) == (5 + 4 + 3) * 2
    # Seed-major order: a matrix stopped half-way already holds every table for seed 0.
    assert [r.seed for r in runs] == [0] * 12 + [1] * 12 and ids[:2] == ["dense-s0", "smoe-s0"]
    by_id = {r.run_id: r for r in runs}
    assert by_id["mhmoe-h2-s0"].tables == [1, 5] and by_id["smoe-s1"].tables == [1, 4]
    assert by_id["mhmoe-h2-s1"].cfg.seed == by_id["mhmoe-h2-s0"].cfg.seed + 1
    t3 = R.plan("smoke", [3], seeds=1)
    assert len(t3) == 5
    fp = {r.row.variant: r.cfg for r in runs if r.seed == 0}
    for r in t3:  # the b1.58 recipe on top of the full-precision twin's config
        assert r.cfg.model.bitnet and r.cfg.optim.schedule == "two_stage" and r.cfg.optim.wd_off_at == 0.5
        assert r.cfg.optim.lr == pytest.approx(fp["smoe"].optim.lr * R.BITNET_LR_SCALE)
    only = R.plan("smoke", [1], seeds=2, models=["smoe", "mhmoe-h3"])
    assert [r.run_id for r in only] == ["smoe-s0", "mhmoe-h3-s0", "smoe-s1", "mhmoe-h3-s1"]


@pytest.mark.parametrize("preset", ["smoke", "cpu", "tiny", "paper"])
def test_table_rows_map_to_the_models_the_paper_describes(preset):
    """Table 4: rows without head & merge are FLOPs-equal, rows with them too (+2 D^2 per MoE block each), and
    MH-MoE's "with" row is the re-matched model with the layers added back. Table 5: Table 1's h=2 with layers
    removed and the experts unchanged."""
    from mhmoe.complexity import flops_per_token
    from mhmoe.training.presets import preset as make

    ffn = {v: make(preset, v).model.moe_ffn for v in
           ("smoe", "smoe-hm", "fine-grained", "fine-grained-hm", "mhmoe-h2", "mhmoe-h2-nohm", "mhmoe-h2-nohm-hm",
            "mhmoe-h2-drophm", "mhmoe-h2-dropmerge", "mhmoe-h2-drophead")}
    flops = {v: flops_per_token(c) for v, c in ffn.items()}
    lead = {v: f.total - f.router for v, f in flops.items()}  # the paper matches leading terms
    d = ffn["smoe"].dim
    t4 = [r.variant for r in TABLES[4][1]]
    without, with_ = [v for v in t4 if not v.endswith("-hm")], [v for v in t4 if v.endswith("-hm")]
    assert with_ == ["smoe-hm", "fine-grained-hm", "mhmoe-h2-nohm-hm"]
    for v in without:
        assert lead[v] == pytest.approx(lead["smoe"], rel=0.02), v
    for v in with_:
        assert lead[v] == pytest.approx(lead["smoe"] + 2 * 2 * d * d, rel=0.02), v
        base = ffn[v.removesuffix("-hm")]
        assert ffn[v] == base.replace(head_layer=True, merge_layer=True)
    t5 = {r.label: r.variant for r in TABLES[5][1]}
    assert t5["w/ head, w/ merge"] == "mhmoe-h2"
    h2 = ffn["mhmoe-h2"]
    for label, head, merge in (("w/o head, w/o merge", False, False), ("w/ head, w/o merge", True, False),
                               ("w/o head, w/ merge", False, True)):
        assert ffn[t5[label]] == h2.replace(head_layer=head, merge_layer=merge), label
        assert lead[t5[label]] == lead["mhmoe-h2"] - 2 * d * d * ((not head) + (not merge)), label
    with pytest.raises(ConfigError, match="-hm applies only after -nohm"):
        make(preset, "mhmoe-h2-hm")
    with pytest.raises(ConfigError, match="use one of -nohm"):
        make(preset, "mhmoe-h2-nohm-drophead")


def _recs(values, columns=("100%",)):
    """Records for verdicts: values = {variant: {seed id: loss}} (the same loss on every domain)."""
    out = []
    for v, per_seed in values.items():
        for s, loss in per_seed.items():
            for col in columns:
                for d in DOMAINS:
                    out.append({"variant": v, "bitnet": False, "column": col, "domain": d, "seed": s,
                                "loss": loss, "ppl": math.exp(loss)})
    return out


def test_paired_interval_is_the_student_t_interval():
    mean, lo, hi = V.paired_interval([-0.10, -0.12, -0.11])
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert mean == pytest.approx(-0.11) and (lo, hi) == pytest.approx((-0.11 - half, -0.11 + half))
    assert math.isnan(V.paired_interval([0.3])[1])


def test_verdict_holds_reversed_within_noise_and_one_seed():
    t1 = ["dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"]

    def table1(losses):
        return V.verdicts(_recs(dict(zip(t1, losses))), [1])[1]

    steps = [{1: 3.0 - i * 0.1, 2: 3.05 - i * 0.1, 3: 2.98 - i * 0.1} for i in range(5)]
    holds = table1(steps)
    assert holds["verdict"] == "holds" and holds["column"] == "100%"
    comps = holds["columns"]["100%"]["comparisons"]
    assert [c["verdict"] for c in comps] == ["holds"] * 4
    assert comps[0]["mean_diff_nats"] == pytest.approx(-0.1) and comps[0]["n_seeds"] == 3
    assert comps[0]["ci95"][1] < 0 and set(comps[0]["per_domain"]) == set(DOMAINS)
    reversed_ = table1(steps[:3] + [steps[4], steps[3]])  # h=3 worse than h=2 on every seed
    assert reversed_["verdict"] == "does not hold"
    assert reversed_["columns"]["100%"]["comparisons"][3]["verdict"] == "reversed"
    # h=3 better on two seeds and worse on one: the interval contains 0.
    noisy = steps[:4] + [{1: steps[3][1] - 0.05, 2: steps[3][2] + 0.06, 3: steps[3][3] - 0.02}]
    last = table1(noisy)["columns"]["100%"]["comparisons"][3]
    assert last["verdict"] == "within noise" and last["ci95"][0] < 0 < last["ci95"][1]
    one = table1([{1: s[1]} for s in steps])
    assert one["verdict"] == V.NOT_TESTED
    assert all(c["ci95"] is None and c["verdict"] == V.NOT_TESTED for c in one["columns"]["100%"]["comparisons"])


def test_verdict_pairs_by_seed_id_and_skips_a_missing_seed():
    """Seed 2 of h=3 is missing: the pair uses seeds 1 and 3 only, matched by id, not by list position."""
    smoe = {1: 3.0, 2: 9.9, 3: 3.2}
    h3 = {3: 3.1, 1: 2.9}
    c = V.compare_rows(_recs({"smoe": smoe, "mhmoe-h3": h3}), Row("MH h3", "mhmoe-h3"), Row("SMoE", "smoe"), "100%")
    assert c.seeds == [1, 3] and c.n_seeds == 2
    assert c.mean_diff_nats == pytest.approx(-0.1) and c.verdict == "holds"  # -0.1 on both seeds: zero spread


def test_verdicts_tables_4_and_5_at_both_columns():
    base = {"smoe": 3.0, "smoe-hm": 2.99, "fine-grained": 2.95, "fine-grained-hm": 2.945, "mhmoe-h2-nohm": 2.96,
            "mhmoe-h2-nohm-hm": 2.90, "mhmoe-h2-drophm": 3.02, "mhmoe-h2-dropmerge": 2.97,
            "mhmoe-h2-drophead": 3.00, "mhmoe-h2": 2.94}
    noise = {1: 0.0, 2: 0.004, 3: -0.003}
    vals = {v: {s: x + e for s, e in noise.items()} for v, x in base.items()}
    v = V.verdicts(_recs(vals, ("50%", "100%")), [4, 5])
    assert v[4]["column"] == "50%" and set(v[4]["columns"]) == {"50%", "100%"}
    assert v[4]["verdict"] == "holds" and v[5]["verdict"] == "holds"
    assert [c["better"] for c in v[5]["columns"]["50%"]["comparisons"]] == [
        "w/ head, w/o merge", "w/o head, w/ merge", "w/ head, w/o merge"]  # head helps, merge helps, head > merge
    # The merge-only model beating the head-only one reverses the third part.
    vals["mhmoe-h2-drophead"] = {s: 2.95 + e for s, e in noise.items()}
    v5 = V.verdicts(_recs(vals, ("50%", "100%")), [5])[5]
    assert v5["verdict"] == "does not hold"
    assert [c["verdict"] for c in v5["columns"]["50%"]["comparisons"]] == ["holds", "holds", "reversed"]


def test_sanity_check_gates_every_claim():
    t1 = ["dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"]
    ok = {v: {1: 3.0 - i * 0.1, 2: 3.05 - i * 0.1, 3: 2.98 - i * 0.1} for i, v in enumerate(t1)}
    sane = V.sanity_check(_recs(ok), {"smoe-s0": [], "dense-s0": []})
    assert sane["verdict"] == "holds" and sane["reasons"] == [] and sane["smoe_vs_dense"]["ci95"][1] < 0
    verdict = V.verdicts(_recs(ok), [1])
    assert V.apply_sanity(verdict, sane) == verdict  # a sane matrix keeps its verdicts
    # SMoE behind dense on every seed: every claim is "not interpretable", the measured verdict kept beside it.
    bad = dict(ok, smoe={s: x + 0.3 for s, x in ok["smoe"].items()})
    failed = V.sanity_check(_recs(bad), {})
    assert failed["verdict"] == "fails" and "SMoE - dense at 100% is +0.2000" in failed["reasons"][0]
    labelled = V.apply_sanity(V.verdicts(_recs(bad), [1]), failed)[1]
    assert labelled["verdict"] == V.NOT_INTERPRETABLE and labelled["measured_verdict"] == "does not hold"
    assert labelled["columns"]["100%"]["verdict"] == V.NOT_INTERPRETABLE
    # A spike after warm-up fails the check even where SMoE beats dense.
    spiked = V.sanity_check(_recs(ok), {"smoe-s1": [40, 41], "dense-s0": []})
    assert spiked["verdict"] == "fails" and spiked["spikes_after_warmup"] == {"smoe-s1": [40, 41]}
    assert "1 run(s) spiked after warm-up: smoe-s1 (steps 40, 41)" in spiked["reasons"][0]
    # One seed or no dense: no verdict either way, and the claims keep theirs.
    assert V.sanity_check(_recs({v: {1: x[1]} for v, x in ok.items()}), {})["verdict"] == V.NOT_TESTED
    assert V.sanity_check(_recs({"smoe": ok["smoe"]}), {})["verdict"].startswith("not tested (no dense")
    recs = [dict(r, params=1000, active_params=500, flops_per_token=2000, step=10) for r in _recs(bad)]
    md = report.render_tables(recs, [1], "smoke", V.apply_sanity(V.verdicts(recs, [1]), failed), {}, sanity=failed)
    assert md.index("## Sanity check (before any claim)") < md.index("## Table 1")
    assert "**FAILS**" in md and "— NOT INTERPRETABLE** (measured: does not hold)" in md
    assert "| not interpretable (measured: " in md


def test_run_health_counts_spikes_after_warm_up_only(tmp_path):
    from mhmoe.training.presets import preset

    cfg = preset("smoke", "smoe").override("optim.warmup_steps", 3)
    norms = [9.0, 1.0, 1.0, 1.0, 1.0, 8.0, 1.0, 1.0]  # step 1 (warm-up) and step 6 above 5x the median
    recs = [{"step": i + 1, "grad_norm": g, "router_entropy": 1.0} for i, g in enumerate(norms)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    h = report.run_health(tmp_path, cfg)
    assert h["spike_steps"] == [1, 6] and h["spike_steps_after_warmup"] == [6]


def test_render_intervals_flops_and_paper_numbers():
    t1 = ["dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"]
    vals = {v: {1: 3.0 - i * 0.1, 2: 3.04 - i * 0.1} for i, v in enumerate(t1)}
    recs = [dict(r, params=1000, active_params=500, flops_per_token=2000 if r["variant"] != "dense" else 2500,
                 step=10) for r in _recs(vals)]
    health = {"mhmoe-h3-s0": {"variant": "mhmoe-h3", "entropy_frac": {q: 0.995 for q in ("10%", "25%", "50%", "75%",
                                                                                   "100%")}},
              "smoe-s0": {"variant": "smoe", "entropy_frac": {q: 0.95 for q in ("10%", "25%", "50%", "75%", "100%")}}}
    md = report.render_tables(recs, [1], "smoke", V.verdicts(recs, [1]), health)
    assert "**Router near uniform** (entropy >= 99% of ln E at the end, mean over seeds) in: MH-MoE (head=3)." in md
    assert "| mhmoe-h3 | 0.995 | 0.995 | 0.995 | 0.995 | 0.995 | **near uniform** |" in md
    assert "| smoe | 0.950 | 0.950 | 0.950 | 0.950 | 0.950 | learned |" in md
    dense = statistics.mean([math.exp(3.0), math.exp(3.04)])
    assert f"| Dense | 100% (10) | {dense:.2f} ± " in md and "(12.13)" in md
    assert "| 1.250 |" in md and "| 1.000 |" in md  # FLOPs x SMoE per row
    assert "Claim T1" in md and "HOLDS" in md
    assert "| MH-MoE (head=3) | MH-MoE (head=2) | -0.1000 [-0.1000, -0.1000] | 2 | holds |" in md
    assert "## Every model against SMoE (seed-paired)" in md


@pytest.mark.skipif(ROOT is None, reason="real corpora not available (set MHMOE_DATA_ROOT)")
def test_reproduce_smoke_end_to_end_with_interruption(tmp_path, monkeypatch, capsys):
    out = tmp_path / "repro"
    argv = ["reproduce", "--preset", "smoke", "--tables", "4,5", "--out", str(out), "--data-root", str(ROOT),
            "--no-progress", "--set", "steps=4", "--set", "threads=1"]
    # Interrupt the matrix in the middle of its third run.
    real_train = R.train
    calls = []

    def flaky(cfg, run_dir, *a, **k):
        calls.append(run_dir.name)
        if len(calls) == 3:
            real_train(cfg, run_dir, *a, **{**k, "stop_after": 2})
            raise KeyboardInterrupt
        return real_train(cfg, run_dir, *a, **k)

    monkeypatch.setattr(R, "train", flaky)
    assert main(argv) == 130
    assert not (out / "tables.md").exists()
    monkeypatch.setattr(R, "train", real_train)
    # A partial report trains nothing and lists only the two finished runs.
    assert main(argv + ["--report-only"]) == 0
    partial = json.loads((out / "results.json").read_text())
    assert {r["run_id"] for r in partial["records"]} == set(calls[:2])
    assert {p.name for p in (out / "runs").iterdir()} == set(calls)  # no directories made for unstarted runs
    assert not (out / "runs" / calls[2] / "checkpoints" / "step_0000004").exists()
    mtime_first = (out / "runs" / calls[0] / "checkpoints" / "step_0000004" / "manifest.json").stat().st_mtime
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "## Table 4" in printed and "## Table 5" in printed
    # Finished runs were not retrained; the interrupted one resumed.
    assert (out / "runs" / calls[0] / "checkpoints" / "step_0000004" / "manifest.json").stat().st_mtime == mtime_first
    res = json.loads((out / "results.json").read_text())
    runs = {r["run_id"] for r in res["records"]}
    assert runs == {"smoe-s0", "smoe-hm-s0", "fine-grained-s0", "fine-grained-hm-s0", "mhmoe-h2-nohm-s0",
                    "mhmoe-h2-nohm-hm-s0", "mhmoe-h2-s0", "mhmoe-h2-drophm-s0", "mhmoe-h2-dropmerge-s0",
                    "mhmoe-h2-drophead-s0"}
    # Every planned cell is filled: 10 runs x 2 milestones x 3 domains, with finite perplexities.
    assert len(res["records"]) == 10 * 2 * 3
    assert all(r["ppl"] > 1 and r["step"] in (2, 4) for r in res["records"])
    assert set(res["verdicts"]) == {"T4", "T5"}
    assert all(v["verdict"] == V.NOT_TESTED for v in res["verdicts"].values())  # one seed: no verdict
    comps = [c for v in res["verdicts"].values() for col in v["columns"].values() for c in col["comparisons"]]
    assert comps and all({"mean_diff_nats", "ci95", "n_seeds"} <= set(c) for c in comps)
    assert set(res["runs"]["mhmoe-h2-s0"]["entropy_frac"]) == {"10%", "25%", "50%", "75%", "100%"}
    md = (out / "tables.md").read_text()
    assert "| SMoE + head & merge | 50% (2) |" in md and "| SMoE + head & merge | 100% (4) |" in md
    assert "(11.84)" in md and "## Training health" in md  # the paper's value beside ours
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert "forest.png" in plots and "table4_val_loss.png" in plots and "load_mhmoe-h2-s0.png" in plots
    # Every record has its claims at every periodic evaluation: Table 4's two gains and Table 5's three pairs,
    # here at the one evaluation a 4-step smoke run makes (its last step).
    assert "differences_vs_tokens.png" in plots
    assert [c["comparison"] for c in res["curves"]] == [
        "head & merge on MH-MoE (head=2) w/o head & merge - head & merge on SMoE (Table 4)",
        "head & merge on MH-MoE (head=2) w/o head & merge - head & merge on Fine-grained SMoE (Table 4)",
        "w/ head, w/o merge - w/o head, w/o merge (Table 5)", "w/o head, w/ merge - w/o head, w/o merge (Table 5)",
        "w/ head, w/o merge - w/o head, w/ merge (Table 5)"]
    assert all(c["steps"] == [4] and c["n_seeds"] == 1 and c["ci95"] == [None] for c in res["curves"])


def test_two_processes_share_a_matrix_run_locked_elsewhere_is_deferred_then_awaited(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from conftest import hold_run_lock

    from mhmoe.training.checkpoint import run_lock

    runs = R.plan("smoke", [5], 1)
    out, release = tmp_path / "repro", tmp_path / "release"
    busy = runs[1].run_id
    holder = hold_run_lock(out / "runs" / busy, release)
    trained, logs = [], []

    def fake_train(cfg, run_dir, *a, **k):
        with run_lock(run_dir):  # re-entrant, as the real train() takes the lock the matrix already holds
            pass
        trained.append(run_dir.name)
        if len(trained) == len(runs) - 1:
            release.touch()  # the other process finishes its run once ours are done
        (run_dir / "train_wall.json").write_text(json.dumps({"wall_s": 1.0}))
        return SimpleNamespace(wall_s=1.0, step=cfg.steps)

    monkeypatch.setattr(R, "train", fake_train)
    monkeypatch.setattr(R, "_eval_cached", lambda *a: {})
    try:
        results = R.execute(runs, out, None, None, progress=False, log=logs.append)
    finally:
        release.touch()
        holder.wait(timeout=30)
    assert trained == [r.run_id for r in runs if r.run_id != busy] + [busy]
    assert set(results) == {r.run_id for r in runs}
    assert any(f"{busy}: in use by another process (pid {holder.pid})" in l for l in logs)
    assert any(f"{busy}: waiting for the other process" in l for l in logs)
    with run_lock(out / "runs" / busy):  # released by the matrix, and by the holder that exited
        pass


@pytest.mark.skipif(ROOT is None, reason="real corpora not available (set MHMOE_DATA_ROOT)")
def test_workers_share_the_matrix_and_train_each_run_once(tmp_path, capsys):
    out = tmp_path / "repro"
    argv = ["reproduce", "--preset", "smoke", "--tables", "5", "--out", str(out), "--data-root", str(ROOT),
            "--no-progress", "--set", "steps=4", "--workers", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 worker processes" in printed and "## Table 5" in printed and "exited with" not in printed
    assert (out / "worker-2.log").read_text().startswith("mhmoe reproduce: preset smoke, tables 5")
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["mhmoe-h2-drophead-s0", "mhmoe-h2-drophm-s0", "mhmoe-h2-dropmerge-s0", "mhmoe-h2-s0"]
    threads = max(1, CR._available_cores() // 2)
    for run in runs:
        steps = [json.loads(l)["step"] for l in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4], run  # trained once: no interleaved second writer
        assert json.loads((out / "runs" / run / "config.json").read_text())["threads"] == threads
    assert len(json.loads((out / "results.json").read_text())["records"]) == 4 * 2 * 3


def test_workers_flag_is_validated(tmp_path, capsys):
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers: must be >= 1, got 0" in capsys.readouterr().err


def test_milestone_columns_are_named_by_position_for_odd_step_counts(tmp_path, monkeypatch):
    """175 steps put the mid milestone at step 87 (49.7%): it is still the "50%" column the verdicts read."""
    from types import SimpleNamespace

    runs = [r for r in R.plan("cpu", [1], 1, ["steps=175"]) if r.row.variant == "smoe"]
    assert runs[0].cfg.steps == 175 and runs[0].cfg.milestones == (87, 175)
    seen = []
    monkeypatch.setattr(R, "train", lambda cfg, run_dir, *a, **k: SimpleNamespace(wall_s=0.0, step=cfg.steps))
    monkeypatch.setattr(R, "_eval_cached", lambda run_dir, step, *a: seen.append(step) or {"step": step})
    monkeypatch.setattr(R, "train_wall", lambda run_dir: 0.0)
    results = R.execute(runs, tmp_path, None, None, progress=False, log=lambda m: None)
    assert results["smoe-s0"]["evals"] == {"50%": {"step": 87}, "100%": {"step": 175}} and seen == [87, 175]


def test_report_only_leaves_out_a_run_another_process_is_training(tmp_path, monkeypatch):
    from conftest import hold_run_lock

    runs = R.plan("smoke", [5], 1)
    out, release = tmp_path / "repro", tmp_path / "release"
    for r in runs:
        (out / "runs" / r.run_id).mkdir(parents=True)
    busy = runs[0].run_id
    holder = hold_run_lock(out / "runs" / busy, release)
    logs = []
    try:
        results = R.execute(runs, out, None, None, progress=False, log=logs.append, report_only=True)
    finally:
        release.touch()
        holder.wait(timeout=30)
    assert results == {}  # nothing finished; and it returned without waiting for the busy run
    assert any(f"{busy}: being trained by another process (pid {holder.pid}), left out" in l for l in logs)


def test_plan_under_the_authors_profile():
    """--profile authors: every MoE row trains its -authors variant under its own run id, the dense row is the same
    run (id and config) as under our profile, --models takes either name, extra models are trained as named."""
    ours = {r.run_id: r for r in R.plan("smoke", [1, 3], seeds=1)}
    theirs = {r.run_id: r for r in R.plan("smoke", [1, 3], seeds=1, profile="authors")}
    assert sorted(theirs) == sorted(["dense-s0", "smoe-authors-s0", "fine-grained-authors-s0",
                                     "mhmoe-h2-authors-s0", "mhmoe-h3-authors-s0", "dense-bitnet-s0",
                                     "smoe-authors-bitnet-s0", "fine-grained-authors-bitnet-s0",
                                     "mhmoe-h2-authors-bitnet-s0", "mhmoe-h3-authors-bitnet-s0"])
    assert theirs["dense-s0"].cfg == ours["dense-s0"].cfg
    h3 = theirs["mhmoe-h3-authors-s0"]
    assert h3.row.variant == "mhmoe-h3" and h3.model == "mhmoe-h3-authors"  # the table row it stands for
    assert h3.cfg.model.moe_ffn.renormalize == "never" and h3.cfg.model.moe_ffn.capacity_in_eval
    bit = theirs["mhmoe-h3-authors-bitnet-s0"].cfg.model
    assert bit.bitnet and not bit.bitnet_head_merge  # Table 3 under -authors: full-precision head and merge
    picked = R.plan("smoke", [1], seeds=1, models=["dense", "smoe-authors", "mhmoe-h3", "mhmoe-h3-rawgates"],
                    profile="authors")
    assert [r.run_id for r in picked] == ["dense-s0", "smoe-authors-s0", "mhmoe-h3-authors-s0",
                                          "mhmoe-h3-rawgates-s0"]
    assert picked[-1].tables == [] and picked[-1].cfg.model.moe_ffn.renormalize == "never"


@pytest.mark.skipif(ROOT is None, reason="real corpora not available (set MHMOE_DATA_ROOT)")
def test_reproduce_authors_profile_records_it(tmp_path, capsys):
    out = tmp_path / "authors"
    argv = ["reproduce", "--preset", "smoke", "--tables", "1", "--seeds", "2", "--models", "dense,smoe,mhmoe-h3",
            "--profile", "authors", "--out", str(out), "--data-root", str(ROOT), "--no-progress",
            "--set", "steps=2", "--set", "threads=1"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["profile"] == "authors"
    assert {r["run_id"] for r in res["records"]} == {f"{v}-s{s}" for v in ("dense", "smoe-authors",
                                                                           "mhmoe-h3-authors") for s in (0, 1)}
    assert {r["model"] for r in res["records"] if r["variant"] == "mhmoe-h3"} == {"mhmoe-h3-authors"}
    # "Every model against SMoE" is in results.json, as in tables.md: h3 - SMoE at 100% over the 2 seeds
    h3 = [c for c in res["versus_smoe"]["100%"] if c["variant"] == "mhmoe-h3"]
    assert len(h3) == 1 and h3[0]["n_seeds"] == 2
    assert {"better", "worse", "column", "mean_diff_nats", "ci95", "n_seeds"} <= set(h3[0])
    assert res["sanity"]["verdict"] in ("holds", "fails")
    md = (out / "tables.md").read_text()
    assert "Profile `authors`" in md and "## Every model against SMoE" in md
    assert "profile authors" in capsys.readouterr().out
    # the curves read the -authors runs: h3 - SMoE at every periodic evaluation
    assert any("mhmoe-h3" in json.dumps(c["terms"]) and c["n_seeds"] == 2 for c in res["curves"])
