"""benchmarks/gpu_check.sh without a GPU: the script parses, its dry run passes every step and leaves the folder the
device tool can return, its summary reads whatever the steps left and computes the acceptance lines, and the
fallback check fails a model that falls back."""

import importlib.util
import io
import json
import shutil
import subprocess
import tarfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ACCEPTANCE = ["MFU dense (whole model)", "MFU smoe (whole model)", "MFU fine-grained (whole model)",
              "MFU mhmoe-h2 (whole model)", "MFU mhmoe-h3 (whole model)", "mhmoe-h3 tokens/s x SMoE (whole model)",
              "layer mhmoe-h3 / SMoE time (fwd+bwd, auto)", "layer SMoE / dense FFN time (fwd+bwd, auto)",
              "fastest transformers block / our SMoE time (fwd+bwd)"]


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses_and_rejects_unknown_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    bad = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True,
                         env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "unknown argument '--gpu'; use --cpu-dry-run" in bad.stderr
    assert not (tmp_path / "out").exists()


STEPS_HEAD = "step\texit_code\tplanned_s\tlimit_s\tused_s\tlog\n"


def test_gpu_check_summary_of_a_partial_folder(tmp_path):
    out = tmp_path / "out"
    logs = out / "logs"
    logs.mkdir(parents=True)
    (out / "steps.tsv").write_text(STEPS_HEAD + "versions\t0\t40\t40\t2\tlogs/versions.log\n"
                                   "bench_layers\t2\t100\t100\t5\tlogs/bench_layers.log\n"
                                   "bench_train\t0\t110\t110\t70\tlogs/bench_train.log\n"
                                   "tests\t1\t90\t90\t80\tlogs/tests.log\n"
                                   "bench_train_compiled\t124\t300\t121\t136\tlogs/bench_train_compiled.log\n",
                                   encoding="utf-8")
    (logs / "versions.log").write_text("peak_tflops: 10\ntorch: 2.13.0\ndry_run: 1\n", encoding="utf-8")
    (logs / "tests.log").write_text("..F\n=== 1 failed, 2 passed in 3.1s ===\n", encoding="utf-8")
    (logs / "bench_layers.json").write_text("{not json", encoding="utf-8")  # a file no atomic writer left
    train = {"meta": {"preset": "gpu", "sampling": {"train": {"rounds": 20}},
                      "progress": {"complete": True, "stage": "done"}},
             "records": [{"variant": v, "compile": "off", "timing": "rounds", "tokens_per_step": 131072,
                          "median_ms": 300.0, "alone_ms": 310.0, "tok_per_s": 4e5, "gflops": 1e5, "mfu": m,
                          "tok_s_x_smoe": x, "tok_s_x_smoe_ci": ci}
                         for v, m, x, ci in (("dense", 0.31, 1.1, [1.0, 1.2]), ("smoe", 0.2, 1.0, [1.0, 1.0]),
                                             ("mhmoe-h3", 0.26, 0.94, [0.9, 0.99]))]}
    (logs / "bench_train.json").write_text(json.dumps(train), encoding="utf-8")
    # The compiled run reached two models before its time limit: timed alone, no rounds.
    compiled = {"meta": {"preset": "gpu", "progress": {"complete": False, "stage": "alone 2/5"}},
                "records": [{"variant": v, "compile": "on", "timing": "alone", "tokens_per_step": 131072,
                             "median_ms": 200.0, "tok_per_s": 6e5, "gflops": 1.5e5, "mfu": m, "warmup_s": 50.0}
                            for v, m in (("smoe", 0.27), ("mhmoe-h3", 0.24))]}
    (logs / "bench_train_compiled.json").write_text(json.dumps(compiled), encoding="utf-8")
    (logs / "gpu9min.json").write_text(json.dumps({
        "preset": "gpu-9min", "models": ["smoe", "mhmoe-h3"], "complete": False, "matrix_estimate_s": 300.0,
        "runs": {"smoe": {"wall_s": 20.0, "train_wall_s": 15.0, "tok_per_s": 6e5, "eval_loss": {"100%": 4.0}}}}))
    assert _module("gpu_check_summary").main([str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["tests"] == "1 failed, 2 passed in 3.1s" and summary["bench_layers"] is None
    assert [s["exit_code"] for s in summary["steps"]] == [0, 2, 0, 1, 124]
    assert [(s["planned_s"], s["limit_s"], s["used_s"]) for s in summary["steps"]][-1] == (300, 121, 136)
    verdicts = {a["check"]: a for a in summary["acceptance"]}
    # MFU: the compiled figure where the compiled run reached the model, else the eager one.
    assert verdicts["MFU smoe (whole model)"]["verdict"] == "PASS"  # compiled 27% (eager: 20%)
    assert verdicts["MFU smoe (whole model)"]["note"] == "compiled (on), timed alone"
    assert verdicts["MFU mhmoe-h3 (whole model)"]["verdict"] == "FAIL"  # compiled 24% (eager: 26%)
    assert verdicts["MFU dense (whole model)"]["verdict"] == "PASS"
    assert verdicts["MFU dense (whole model)"]["note"] == "eager: the compiled run did not reach it"
    assert verdicts["MFU fine-grained (whole model)"]["verdict"] == "not measured"
    # h=3 x SMoE needs paired rounds: the compiled run has none, so the eager one's.
    h3 = verdicts["mhmoe-h3 tokens/s x SMoE (whole model)"]
    assert (h3["verdict"], h3["value"]) == ("FAIL", 0.94) and h3["note"].startswith("eager")
    assert verdicts["layer mhmoe-h3 / SMoE time (fwd+bwd, auto)"]["verdict"] == "not measured"
    assert [a["verdict"] for a in summary["acceptance"] if a["check"].startswith("fallback")] == ["not measured"]
    assert summary["finished"][:4] == [
        "bench_layers: nothing written", "bench_train (eager): complete; models timed: dense, smoe, mhmoe-h3",
        "bench_train_compiled: cut off at 'alone 2/5'; models timed alone only: smoe, mhmoe-h3",
        "gpu9min: cut off; runs smoe of smoe, mhmoe-h3"]
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| bench_train_compiled | 124 | 300 | 121 | 136 | time limit; its limit cut to what was left |" in md
    assert "| tests | 1 | 90 | 90 | 80 | failed |" in md and "Used 293 s of the check's 570 s" in md
    assert "## What finished" in md and "Layer table: no bench_layers.json" in md and "no profile/profile.json" in md
    assert "## Whole model, compiled" in md and "the shuffled rounds did not run" in md


def test_gpu9min_writes_after_each_run(tmp_path, monkeypatch):
    """A gpu9min step cut off in its second run (the SIGINT of the step's timeout) keeps the first in its JSON."""
    mod = _module("gpu_9min_check")
    calls = []

    def execute(runs, root, pack, cache, progress, log):
        calls.append(runs[0].row.variant)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what `timeout --signal=INT` does to the step
        return {runs[0].run_id: {"wall_s": 10.0, "evals": {"100%": {"domains": {"a": {"loss": 4.0}}}}}}

    monkeypatch.setattr(mod, "execute", execute)
    monkeypatch.setattr(mod, "run_throughput", lambda run_dir: {"tok_per_s": 1e5})
    monkeypatch.setattr(mod, "is_pack", lambda path: True)
    out = tmp_path / "nine.json"
    monkeypatch.setattr("sys.argv", ["gpu_9min_check.py", "--preset", "smoke", "--pack", "p", "--json", str(out)])
    with pytest.raises(KeyboardInterrupt):
        mod.main()
    got = json.loads(out.read_text())
    assert calls == ["smoe", "mhmoe-h3"] and list(got["runs"]) == ["smoe"] and got["complete"] is False
    assert got["models"] == ["smoe", "mhmoe-h3"]
    assert got["matrix_estimate_s"] == round(got["runs"]["smoe"]["wall_s"] * 15, 1)  # 5 models x 3 seeds


def test_acceptance_of_the_layer_table_and_the_transformers_peer():
    acceptance = _module("gpu_check_summary").acceptance

    def rec(variant, impl, auto, ms, to_auto, ci, to_dense=None):
        return {"variant": variant, "impl": impl, "auto": auto, "mode": "fwd+bwd", "median_ms": ms,
                "ratio_to_smoe_auto": to_auto, "ratio_to_smoe_auto_ci": ci, "ratio_to_dense": to_dense,
                "ratio_to_dense_ci": None if to_dense is None else [to_dense - 0.1, to_dense + 0.1]}

    layers = {"records": [rec("dense", "dense", True, 1.3, 0.4, [0.39, 0.41], 1.0),
                          rec("smoe", "grouped_mm", True, 3.4, 1.0, [1.0, 1.0], 2.6),
                          rec("mhmoe-h3", "grouped_mm", True, 3.8, 1.12, [1.1, 1.2], 2.9),
                          rec("mhmoe-h3", "sorted", False, 48.0, 14.0, [13.0, 15.0]),
                          rec("hf-eager", "eager", False, 9.5, 2.8, [2.7, 2.9]),
                          rec("hf-grouped_mm", "grouped_mm", False, 3.3, 0.97, [0.95, 0.99])]}
    lines = {a["check"]: a for a in acceptance(layers, None, {"ok": False, "expect": "scatter", "variants": [
        {"ok": False, "line": "FAIL smoe: 6 MoE layer(s) on grouped_mm (a fallback; expected scatter)"}]}, 989.0)}
    h3 = lines["layer mhmoe-h3 / SMoE time (fwd+bwd, auto)"]
    assert (h3["verdict"], h3["value"]) == ("PASS", 1.12) and "straddles" in h3["note"] and "grouped_mm" in h3["note"]
    assert lines["layer SMoE / dense FFN time (fwd+bwd, auto)"]["verdict"] == "FAIL"
    peer = lines["fastest transformers block / our SMoE time (fwd+bwd)"]
    assert (peer["verdict"], peer["note"], peer["ci"]) == ("FAIL", "hf-grouped_mm", [0.95, 0.99])
    fb = lines["fallback check: every MoE layer on scatter, 0 graph breaks"]
    assert fb["verdict"] == "FAIL" and "expected scatter" in fb["note"]


def _fallback(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = _module("gpu_fallback_check").main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_fallback_check_fails_a_fallback(tmp_path):
    """The passing side (dense and h=3 on the grouped path, which compiles whole) is the dry run's fallback step:
    test_gpu_check_dry_run_passes_every_step reads its lines."""
    rc, out, _ = _fallback(["--device", "cpu", "--preset", "smoke", "--variants", "smoe"])
    line = out.splitlines()[0]
    # On CPU dispatch="auto" is the sorted path: not the expected scatter, and eager under torch.compile.
    assert rc == 1 and line.startswith("FAIL smoe: 1 MoE layer(s) on sorted (a fallback; expected scatter)"), out
    assert "graph break(s): " in line and "0 graph break" not in line


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device: expected cpu or cuda, got 'tpu'"),
    (["--device", "cpu", "--variants", "smoe,mega"], "--variants: unknown variant 'mega'"),
    (["--device", "cpu", "--dispatch", "magic"], "--dispatch: FFNConfig.dispatch: 'magic' is not allowed"),
    (["--device", "cpu", "--preset", "huge"], "--preset: unknown preset 'huge'"),
])
def test_fallback_check_bad_flags_one_line_error(argv, message):
    rc, out, err = _fallback(argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    """The dry run is the GPU check's plumbing on CPU: every step exits 0, the folder holds what the device tool
    returns (at most 8 files, one folder down), and the summary computes every acceptance line."""
    import os
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    head, *lines = (out / "steps.tsv").read_text().splitlines()
    assert head.split("\t") == ["step", "exit_code", "planned_s", "limit_s", "used_s", "log"]
    rows = [line.split("\t") for line in lines]
    # The figures that matter most first; the compiled models last, for as long as the budget allows.
    assert [r[0] for r in rows] == ["versions", "gpu_info", "bench_layers", "bench_train", "fallback", "gpu9min",
                                    "tests", "bench_train_compiled", "summary"]
    assert all(code == "0" for _, code, *_ in rows), rows
    for name, _, planned, lim, used, log in rows:  # every step's budget: planned against used
        assert 0 < int(lim) <= int(planned) and 0 <= int(used) <= int(lim) + 15 + 1, (name, planned, lim, used)
        assert log == f"logs/{name}.log"
    assert sum(int(r[4]) for r in rows) <= 570
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["logs.tar.gz", "profile/profile.json", "profile/profile.md", "profile/trace.json",
                     "steps.tsv", "summary.json", "summary.md"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        assert {f"logs/{s}.log" for s, *_ in rows} <= names
        assert {"logs/fallback.json", "logs/bench_layers.json", "logs/bench_train.json",
                "logs/bench_train_compiled.json", "logs/gpu9min.json"} <= names
        assert "no GPU (dry run)" in tar.extractfile("logs/gpu_info.log").read().decode()
        fallback_log = tar.extractfile("logs/fallback.log").read().decode().splitlines()
        fallback = json.loads(tar.extractfile("logs/fallback.json").read())
        compiled = json.loads(tar.extractfile("logs/bench_train_compiled.json").read())
    # `mhmoe bench train --compile on --compile-backend aot_eager` (dynamo and autograd tracing without inductor's
    # C++ build): compiled, warmed up, timed, and no memory pass over compiled graphs.
    assert compiled["meta"]["compile_backend"] == "aot_eager"
    (rec,) = compiled["records"]
    assert rec["compiled"] is True and rec["warmup_s"] > 0 and rec["median_ms"] > 0 and rec["peak_mem_mb"] is None
    # The fallback check's passing side: bf16 on the grouped path, expected there, compiles whole.
    assert fallback_log[:2] == ["PASS dense: no MoE layer, 0 graph break(s)",
                                "PASS mhmoe-h3: 1 MoE layer(s) on grouped_mm, 0 graph break(s)"], fallback_log
    assert fallback["ok"] and [v["graph_breaks"] for v in fallback["variants"]] == [0, 0]
    summary = json.loads((out / "summary.json").read_text())
    nine = summary["gpu9min"]  # the preset's runs read the (dry run's smoke) token pack
    assert nine["preset"] == "smoke" and set(nine["runs"]) == {"smoe", "mhmoe-h3"} and nine["matrix_estimate_s"] > 0
    assert "Table 1 x 3 seeds, one run after another" in (out / "summary.md").read_text()
    assert {t["variant"] for t in summary["bench_train"]["records"] if t.get("tok_per_s")} == {
        "dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"}
    assert {t["compile"] for t in summary["bench_train"]["records"]} == {"off"}  # eager first
    assert [(t["variant"], t["compile"], t["timing"]) for t in summary["bench_train_compiled"]["records"]] == [
        ("dense", "on", "rounds")]
    assert summary["finished"][0].startswith("bench_layers: complete; ")
    assert summary["finished"][1:4] == [
        "bench_train (eager): complete; models timed: dense, smoe, fine-grained, mhmoe-h2, mhmoe-h3",
        "bench_train_compiled: complete; models timed: dense",
        "gpu9min: complete; runs smoe, mhmoe-h3 of smoe, mhmoe-h3"]
    lines = {a["check"]: a for a in summary["acceptance"]}
    assert set(ACCEPTANCE) <= set(lines)
    for name in ACCEPTANCE:  # every line measured in the dry run (its verdict is plumbing, not a GPU figure)
        assert lines[name]["verdict"] in ("PASS", "FAIL") and lines[name]["value"] is not None, lines[name]
    fb = [a for a in summary["acceptance"] if a["check"].startswith("fallback check")]
    assert [a["verdict"] for a in fb] == ["PASS"]  # the dry run checks the grouped path, which compiles whole
    assert "passed" in summary["tests"] and "failed" not in summary["tests"]
    prof = json.loads((out / "profile" / "profile.json").read_text())
    assert list(prof["variants"]) == ["smoe/float32", "mhmoe-h3/float32"] and prof["steps_per_variant"] == 2
    md = (out / "summary.md").read_text()
    assert "## Acceptance" in md and "## Profile" in md and "expert GEMMs" in md and "before" in md
    assert "## Budget" in md and "## What finished" in md
