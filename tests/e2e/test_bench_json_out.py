"""`mhmoe bench layers|train --json-out FILE`: the file is rewritten atomically as the run goes, so a bench killed
mid-run (a real process, SIGKILL: no handler runs) leaves a valid JSON with what it finished; a run that ends
leaves the same JSON as --json prints, marked complete."""

import json
import os
import signal
import time

import pytest
from helpers import fork_mhmoe, subprocess_env

from mhmoe.cli import main

# Tiny sizes; rounds that would run for minutes, so that the kill lands mid-run.
TRAIN = ["bench", "train", "--preset", "smoke", "--variants", "dense,smoe,mhmoe-h3", "--rounds", "1000",
         "--max-seconds", "600", "--no-memory"]
LAYERS = ["bench", "layers", "--tokens", "64", "--dim", "96", "--hidden-dim", "256", "--num-experts", "4",
          "--dtypes", "float32", "--no-hf", "--no-memory", "--rounds", "6", "--target-ci", "0.000001",
          "--max-seconds", "600"]


@pytest.mark.parametrize("what", ["layers", "train"])
def test_help_shows_json_out(what, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", what, "--help"])
    assert e.value.code == 0
    assert "--json-out FILE" in capsys.readouterr().out


def _read(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _kill_when(argv, path, done, timeout=240):
    """Start `mhmoe ARGV --json-out PATH` in a process of its own (forked: tests/helpers.py), poll PATH until
    done(json) holds, SIGKILL the process (still running: the kill is mid-run) and return the file's JSON."""
    err = path.with_suffix(".stderr")
    proc = fork_mhmoe([*argv, "--json-out", str(path)], subprocess_env(), os.devnull, err)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.is_alive():
            got = _read(path)
            if got is not None and done(got):
                break
            time.sleep(0.2)
        assert proc.is_alive(), f"the bench ended before the kill: {proc.exitcode}, {err.read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
    return json.loads(path.read_text(encoding="utf-8"))  # valid JSON: every write was atomic


def test_a_killed_bench_train_leaves_the_models_it_timed(tmp_path):
    path = tmp_path / "train.json"
    got = _kill_when(TRAIN, path, lambda j: len(j["records"]) >= 2)
    assert got["meta"]["progress"]["complete"] is False and got["meta"]["progress"]["stage"].startswith("alone")
    recs = got["records"]
    assert [r["variant"] for r in recs] == ["dense", "smoe", "mhmoe-h3"][:len(recs)] and len(recs) >= 2
    for r in recs:  # each timed alone after its warm-up: a speed, no comparison yet
        assert r["timing"] == "alone" and r["tok_per_s"] > 0 and r["rounds"] == 3 and r["ratio_to_smoe"] is None
    assert got["meta"]["preset"] == "smoke" and got["meta"]["device"] == "cpu"


def test_a_killed_bench_layers_leaves_the_rounds_it_ran(tmp_path):
    path = tmp_path / "layers.json"
    got = _kill_when(LAYERS, path, lambda j: len(j["records"]) > 0)
    assert got["meta"]["progress"]["complete"] is False
    assert got["meta"]["progress"]["stage"].startswith("float32: rounds ")
    recs = got["records"]
    assert {(r["variant"], r["mode"]) for r in recs} == {(v, m) for v in ("dense", "smoe", "fine-grained", "mhmoe-h2",
                                                                        "mhmoe-h3") for m in ("fwd", "fwd+bwd")}
    assert all(r["rounds"] >= 6 and r["median_ms"] > 0 for r in recs)
    assert got["meta"]["sampling"]["float32"]["rounds"] == recs[0]["rounds"]


def test_a_finished_bench_writes_what_json_prints(tmp_path, capsys):
    path = tmp_path / "done.json"
    assert main(["bench", "train", "--json", "--preset", "smoke", "--variants", "smoe,mhmoe-h3", "--rounds", "2",
                 "--max-seconds", "0", "--no-memory", "--json-out", str(path)]) == 0
    printed, written = json.loads(capsys.readouterr().out), json.loads(path.read_text(encoding="utf-8"))
    assert written["records"] == printed["records"]
    assert written["meta"]["progress"] == {"complete": True, "stage": "done"}
    assert all(r["timing"] == "rounds" and r["ratio_to_smoe"] is not None for r in written["records"])


def test_json_out_that_cannot_be_written_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["bench", "train", "--preset", "smoke", "--variants", "smoe", "--json-out",
                 str(blocker / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mhmoe bench: error: --json-out: cannot write") and "pass a writable file path" in err and "\n" not in err
