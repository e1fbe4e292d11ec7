"""benchmarks/gpu_check.sh without a GPU: the script parses, and its summary reads whatever the steps left."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "benchmarks" / "gpu_check_summary.py")
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


def test_gpu_check_summary_of_a_partial_folder(tmp_path):
    from mhmoe.training.presets import preset

    out = tmp_path / "out"
    out.mkdir()
    (out / "steps.tsv").write_text("step\texit_code\tseconds\tlog\nversions\t0\t2\tversions.log\n"
                                   "tests\t1\t80\ttests.log\nbench_layers\t2\t5\tbench_layers.log\n"
                                   "train_smoe\t124\t121\ttrain_smoe.log\n", encoding="utf-8")
    (out / "versions.log").write_text("peak_tflops: 10\ntorch: 2.13.0\ndry_run: 1\n", encoding="utf-8")
    (out / "tests.log").write_text("..F\n=== 1 failed, 2 passed in 3.1s ===\n", encoding="utf-8")
    (out / "bench_layers.json").write_text("{not json", encoding="utf-8")  # a step killed mid-write
    run = out / "train_smoe"
    run.mkdir()
    (run / "config.json").write_text(preset("smoke", "smoe").to_json(), encoding="utf-8")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "tok_per_s": 100.0 * i}) + "\n"
                                               for i in range(1, 11)), encoding="utf-8")
    (out / "train_mhmoe-h3").mkdir()  # started, never wrote its config
    (out / "train_smoe.log").write_text("mhmoe train: interrupted\n", encoding="utf-8")
    assert _summary_module().main([str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["tests"] == "1 failed, 2 passed in 3.1s" and summary["bench_layers"] is None
    assert [s["exit_code"] for s in summary["steps"]] == [0, 1, 2, 124]
    h3, smoe = summary["train"]
    assert "error" in h3 and smoe["tok_per_s"] == 600.0 and smoe["peak_tflops"] == 10.0
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| train_smoe | 124 | 121 | stopped by the time limit, as planned |" in md
    assert "| tests | 1 | 80 | failed |" in md and "bench layers: no JSON" in md


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    """The dry run is the GPU check's plumbing on CPU: every step exits 0 and the summary is written."""
    import os
    import sys

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line.split("\t") for line in (tmp_path / "out" / "steps.tsv").read_text().splitlines()[1:]]
    assert rows and all(code == "0" for _, code, *_ in rows), rows
    assert "no GPU (dry run)" in (tmp_path / "out" / "gpu_info.log").read_text()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {t["variant"] for t in summary["train"] if t.get("tok_per_s")} == {"smoe", "mhmoe-h3"}
