"""`mhmoe reproduce` on the smoke preset (real training, tiny sizes) and its verdict logic on constructed numbers."""

import json

import pytest

from conftest import shared_data_root
from mhmoe import reproduce as R
from mhmoe.cli import main

ROOT = shared_data_root()


def test_plan_reuses_identical_runs_across_tables():
    runs = R.plan("smoke", [1, 4, 5], seeds=2)
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids))
    # T1: 5 variants; T4 adds smoe-hm, fine-grained-hm, mhmoe-h2-nohm; T5 adds -nomerge, -nohead. x 2 seeds.
    assert len(runs) == (5 + 3 + 2) * 2
    # Seed-major order: a matrix stopped half-way already holds every table for seed 0.
    assert [r.seed for r in runs] == [0] * 10 + [1] * 10 and ids[:2] == ["dense-s0", "smoe-s0"]
    by_id = {r.run_id: r for r in runs}
    assert by_id["mhmoe-h2-s0"].tables == [1, 4, 5] and by_id["smoe-s1"].tables == [1, 4]
    assert by_id["mhmoe-h2-s1"].cfg.seed == by_id["mhmoe-h2-s0"].cfg.seed + 1
    assert {r.cfg.model.moe_ffn.head_layer for r in runs if r.row.variant == "mhmoe-h2-nohead"} == {False}
    t3 = R.plan("smoke", [3], seeds=1)
    assert len(t3) == (5 if R.bitnet_available() else 0)
    fp = {r.row.variant: r.cfg for r in runs if r.seed == 0}
    for r in t3:  # the b1.58 recipe on top of the full-precision twin's config
        assert r.cfg.model.bitnet and r.cfg.optim.schedule == "two_stage" and r.cfg.optim.wd_off_at == 0.5
        assert r.cfg.optim.lr == pytest.approx(fp["smoe"].optim.lr * R.BITNET_LR_SCALE)


def _recs(values):
    """Records for verdicts: values = {variant: [per-seed ppl]} (same on every domain)."""
    out = []
    for v, per_seed in values.items():
        for s, ppl in enumerate(per_seed):
            for d in R.DOMAINS:
                out.append({"variant": v, "bitnet": False, "column": "100%", "domain": d, "seed": s, "ppl": ppl})
    return out


def test_verdict_holds_reversal_and_noise():
    t1 = ["dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"]
    holds = R.verdicts(_recs(dict(zip(t1, ([20.0, 20.1], [18.0, 18.1], [17.0, 17.1], [16.0, 16.1],
                                              [15.0, 15.1])))), [1])
    assert holds[1]["verdict"] == "holds"
    reversal = R.verdicts(_recs(dict(zip(t1, ([20.0, 20.1], [18.0, 18.1], [17.0, 17.1], [15.0, 15.1],
                                                 [16.0, 16.1])))), [1])
    assert reversal[1]["verdict"] == "does not hold"
    assert "MH-MoE (head=3) vs MH-MoE (head=2): -6.2" in reversal[1]["detail"]  # the reversal is named
    # A 0.3% gap with a seed spread of ~2% is noise, not a result.
    noisy = R.verdicts(_recs(dict(zip(t1, ([20.0, 20.1], [18.0, 18.1], [17.0, 17.1], [16.0, 16.6],
                                              [16.4, 16.1])))), [1])
    assert noisy[1]["verdict"] == "within noise"
    # With one seed a fixed 0.5% floor applies.
    one = R.verdicts(_recs({v: [p] for v, p in zip(t1, [20.0, 18.0, 17.0, 16.0, 15.96])}), [1])
    assert one[1]["verdict"] == "within noise"


def test_verdicts_tables_4_and_5():
    recs = _recs({"smoe": [12.0], "smoe-hm": [11.97], "fine-grained": [11.8], "fine-grained-hm": [11.79],
                  "mhmoe-h2-nohm": [11.9], "mhmoe-h2": [11.5], "mhmoe-h2-nomerge": [11.6],
                  "mhmoe-h2-nohead": [11.8]})
    v = R.verdicts(recs, [4, 5])
    assert v[4]["verdict"] == "holds" and v[5]["verdict"] == "holds"
    recs = [dict(r, ppl=11.5) if r["variant"] == "mhmoe-h2-nohead" else r for r in recs]
    assert R.verdicts(recs, [5])[5]["verdict"] == "does not hold"  # merge-only beats head-only: a reversal


def test_render_mean_std_bold_and_paper_numbers():
    recs = [dict(r, params=1000, active_params=500, flops_per_token=2000, step=10)
            for r in _recs({"dense": [20.0, 22.0], "smoe": [18.0, 18.2], "fine-grained": [17.0, 17.2],
                            "mhmoe-h2": [16.0, 16.2], "mhmoe-h3": [15.0, 15.2]})]
    md = R.render_tables(recs, [1], "smoke", R.verdicts(recs, [1]))
    assert "| Dense | 100% (10) | 21.00 ± 1.41 (12.13) |" in md
    assert "**15.10 ± 0.14** (10.51)" in md
    assert "Claim T1" in md and "HOLDS" in md


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
                    "mhmoe-h2-s0", "mhmoe-h2-nomerge-s0", "mhmoe-h2-nohead-s0"}
    # Every planned cell is filled: 8 runs x 2 milestones x 3 domains, with finite perplexities.
    assert len(res["records"]) == 8 * 2 * 3
    assert all(r["ppl"] > 1 and r["step"] in (2, 4) for r in res["records"])
    assert set(res["verdicts"]) == {"T4", "T5"}
    assert all(v["verdict"] in ("holds", "does not hold", "within noise") for v in res["verdicts"].values())
    md = (out / "tables.md").read_text()
    assert md.count("| SMoE + head & merge |") == 2 and "(11.84)" in md  # both steps; paper value beside ours
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert "table4_val_loss.png" in plots and "table5_ppl.png" in plots and "load_mhmoe-h2-s0.png" in plots


def test_two_processes_share_a_matrix_run_locked_elsewhere_is_deferred_then_awaited(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from conftest import hold_run_lock
    from mhmoe.checkpoint import run_lock

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
    assert runs == ["mhmoe-h2-nohead-s0", "mhmoe-h2-nohm-s0", "mhmoe-h2-nomerge-s0", "mhmoe-h2-s0"]
    threads = max(1, R._available_cores() // 2)
    for run in runs:
        steps = [json.loads(l)["step"] for l in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4], run  # trained once: no interleaved second writer
        assert json.loads((out / "runs" / run / "config.json").read_text())["threads"] == threads
    assert len(json.loads((out / "results.json").read_text())["records"]) == 4 * 2 * 3


def test_workers_flag_is_validated(tmp_path, capsys):
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers: must be >= 1, got 0" in capsys.readouterr().err
