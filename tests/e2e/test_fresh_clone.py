"""The README's promise, checked: a clone with no ../shared beside it and no MHMOE_DATA_ROOT runs the main job
on the corpus sample carried in the package."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tracked_tree(dest: Path) -> None:
    """Copy what a clone of this checkout holds: tracked files and new files git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_a_fresh_clone_runs_the_demo_main_job_without_shared_data(tmp_path: Path) -> None:
    clone = tmp_path / "alone" / "mhmoe"  # nothing beside it: no ../shared
    clone.mkdir(parents=True)
    _tracked_tree(clone)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHMOE_")}
    env.update(PYTHONPATH=str(clone), MHMOE_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "alone" / "runs"
    # The main job's first run (dense, seed 0), cut to 12 steps (its tokenizer, data and model as the demo's), its
    # evaluations at 50% and 100% and the report. 12 steps leave the perplexities well below 2048 (~1500 at step 6).
    cmd = [sys.executable, "-m", "mhmoe.cli", "reproduce", "--preset", "demo", "--tables", "1", "--models", "dense",
           "--out", str(out), "--no-progress", "--set", "steps=12", "--set", "ckpt_every=12", "--set", "threads=1"]
    done = subprocess.run(cmd, cwd=clone.parent, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert {r["domain"] for r in res["records"]} == {"redpajama", "wikipedia", "c4"}
    assert all(1 < r["ppl"] < 2048 for r in res["records"])  # learned something: below the uniform 2048
    assert (out / "runs" / "dense-s0" / "checkpoints" / "step_0000012").is_dir()
    assert "## Table 1" in (out / "tables.md").read_text()
    # One more process in the clone (each start imports torch and mhmoe: seconds): the package and data root it
    # sees, then the CLI on a preset the sample cannot hold, which asks for the full corpora in one line.
    code = ("import sys, mhmoe.data.corpora as d; print(d.__file__, d.resolve_data_root(None), flush=True); "
            "from mhmoe.cli.main import main; sys.exit(main(sys.argv[1:]))")
    big = subprocess.run([sys.executable, "-c", code, "reproduce", "--preset", "cpu", "--out", str(tmp_path / "cpu")],
                         cwd=clone.parent, env=env, capture_output=True, text=True)
    where = big.stdout.split()
    assert where[0].startswith(str(clone)) and where[1] == str(clone / "mhmoe" / "data" / "sample_data")
    assert big.returncode == 2 and big.stderr.count("\n") == 1, big.stderr
    assert "needs the full corpora" in big.stderr and "mhmoe data prepare --preset cpu" in big.stderr
