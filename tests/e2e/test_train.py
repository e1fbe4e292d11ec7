"""Training end to end on the smoke preset: loss decreases, bit-exact resume (also of a process killed by SIGKILL
or SIGTERM: per-step metrics, periodic and final evaluations, final weights), corrupted
checkpoints, NaN stop, eval, bad inputs with one-line errors, and 2-process DDP = 1 process."""

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import shared_data_root
from helpers import fork_mhmoe, ranks_like_torchrun

from mhmoe.cli import main
from mhmoe.errors import TrainingError
from mhmoe.training.checkpoint import list_checkpoints
from mhmoe.training.evaluate import evaluate_run
from mhmoe.training.loop import train
from mhmoe.training.presets import preset
from mhmoe.training.rundir import load_run

ROOT = shared_data_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="real corpora not available (set MHMOE_DATA_ROOT)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cfg(variant="mhmoe-h3", **over):
    cfg = preset("smoke", variant).replace(threads=1)
    for k, v in over.items():
        cfg = cfg.override(k, v)
    return cfg


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}


def test_loss_decreases_and_run_dir_contents(tmp_path, cache):
    cfg = _cfg(steps=30)
    state = train(cfg, tmp_path / "run", ROOT, cache, progress=False)
    assert state.finished and state.step == 30
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    assert any((run / "tb").iterdir())
    assert [s for s, _ in list_checkpoints(run)] == [15, 20, 30]  # 50% milestone kept + newest two
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "tokens", "loss", "ce", "aux", "lb", "z", "lr", "grad_norm", "tok_per_s",
                "expert_load_max_over_mean", "tokens_per_expert"):
        assert key in rec
    assert len(rec["tokens_per_expert"]) == 1  # one MoE layer in 2 blocks
    n_assign = cfg.tokens_per_step * cfg.model.moe_ffn.heads * cfg.model.moe_ffn.top_k
    assert sum(rec["tokens_per_expert"][0]) == n_assign
    evals = [json.loads(l) for l in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20, 30] and all("c4" in e for e in evals)


def _train_log(run_dir):
    """What a run logged per step and per evaluation, without the step times: the metrics.jsonl records (loss, lr,
    grad norm, routing, ...) and the evals.jsonl records (every periodic evaluation, the last one at the end)."""
    run_dir = Path(run_dir)
    steps = [{k: v for k, v in json.loads(l).items() if k != "tok_per_s"}
             for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(l) for l in (run_dir / "evals.jsonl").read_text().splitlines()]
    return steps, evals


def _final_weights(run_dir, step):
    return json.loads((Path(run_dir) / "checkpoints" / f"step_{step:07d}" / "manifest.json").read_text())[
        "sha256"]["model.safetensors"]


def test_resume_is_bit_exact(tmp_path, cache):
    """Resumed from step 4, the run re-does step 5 from the same data position, RNG and schedule: every logged
    number and the final weights equal the uninterrupted run's."""
    cfg = _cfg("mhmoe-h2", steps=8, ckpt_every=2, eval_every=3)
    train(cfg, tmp_path / "full", ROOT, cache, progress=False)
    part = train(cfg, tmp_path / "part", ROOT, cache, progress=False, stop_after=5)
    assert not part.finished and len(_losses(tmp_path / "part")) == 5
    train(cfg, tmp_path / "part", ROOT, cache, progress=False)  # resumes from step 4, re-does 5
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")  # exact float equality
    steps, evals = _train_log(tmp_path / "part")
    assert (steps, evals) == _train_log(tmp_path / "full")
    assert [e["step"] for e in evals] == [3, 6, 8] and [r["step"] for r in steps] == list(range(1, 9))
    assert _final_weights(tmp_path / "part", 8) == _final_weights(tmp_path / "full", 8)


def test_a_run_whose_config_says_compile_false_resumes(tmp_path, cache, capsys):
    """TrainConfig.compile was a bool (false by default): a run directory from then resumes, from the API (today's
    config, compared with the stored one) and from the CLI (the stored config, read back), and keeps its losses.
    (true -> "on" goes through the same table: tests/unit/test_config.py.)"""
    old = False
    cfg = _cfg("smoe", steps=4, ckpt_every=1)
    train(cfg, tmp_path / "ref", ROOT, cache, progress=False)
    run = tmp_path / "old"
    train(cfg, run, ROOT, cache, progress=False, stop_after=2)
    stored = json.loads((run / "config.json").read_text())
    assert stored["compile"] == "auto"
    (run / "config.json").write_text(json.dumps({**stored, "compile": old}, indent=2, sort_keys=True))
    assert train(cfg, run, ROOT, cache, progress=False, stop_after=3).step == 3  # compile="auto" now: the same run
    assert main(["train", "--out", str(run), "--data-root", str(ROOT), "--cache-dir", str(cache),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["compile"] is old  # the run's file is left as it was
    assert _losses(run) == _losses(tmp_path / "ref")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_mid_training_then_resumed_matches_the_uninterrupted_run(tmp_path, cache, capsys, sig):
    """A real `mhmoe train` process killed after its first checkpoint (SIGKILL: nothing runs after it; SIGTERM:
    Python's default, no handler) and then re-run with the same command: every step's logged numbers, every
    periodic evaluation (the last one is the final eval) and the final weights equal the uninterrupted run's."""
    cfg = _cfg("smoe", steps=20, ckpt_every=5, eval_every=4)
    train(cfg, tmp_path / "ref", ROOT, cache, progress=False)
    run = tmp_path / "killed"
    argv = ["train", "--preset", "smoke", "--model", "smoe", "--out", str(run),
           "--data-root", str(ROOT), "--cache-dir", str(cache), "--no-progress", "--set", "threads=1",
           "--set", "steps=20", "--set", "ckpt_every=5", "--set", "eval_every=4"]
    proc = fork_mhmoe(argv, _env(), os.devnull, os.devnull)  # forked: no imports to wait for
    metrics, first_ckpt = run / "metrics.jsonl", run / "checkpoints" / "step_0000005" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.is_alive():
        if first_ckpt.is_file() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    proc.join()
    assert proc.exitcode == -sig
    logged = len(metrics.read_text().splitlines())
    newest = max(s for s, _ in list_checkpoints(run))
    assert 5 <= newest <= logged < 20  # killed after its first checkpoint, before the end
    # The killed invocation's training time survives (recorded with each checkpoint, not only at exit).
    wall_killed = json.loads((run / "train_wall.json").read_text())["wall_s"]
    assert wall_killed > 0
    # The same command resumes it, in this process.
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((run / "train_wall.json").read_text())["wall_s"] > wall_killed
    steps, evals = _train_log(run)
    assert (steps, evals) == _train_log(tmp_path / "ref")  # exact: data position, RNG and schedule restored
    assert [e["step"] for e in evals] == [4, 8, 12, 16, 20]
    assert _final_weights(run, 20) == _final_weights(tmp_path / "ref", 20)


def test_corrupted_checkpoint_falls_back_with_warning(tmp_path, cache):
    cfg = _cfg("smoe", steps=6, ckpt_every=2, keep_checkpoints=3)
    run = tmp_path / "run"
    train(cfg, run, ROOT, cache, progress=False)
    latest = list_checkpoints(run)[-1][1]
    blob = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.warns(UserWarning, match="step_0000006 is unusable .*model.safetensors does not match"):
        loaded = load_run(run, None, ROOT, cache)
    assert loaded.step == 4
    # Training resumes from the previous good checkpoint and re-creates step 6 identically.
    ref = _losses(run)
    with pytest.warns(UserWarning, match="falling back to the previous one"):
        train(cfg, run, ROOT, cache, progress=False)
    assert _losses(run) == ref
    assert load_run(run, None, ROOT, cache).step == 6


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, cache, monkeypatch):
    from mhmoe import model as model_mod

    cfg = _cfg("smoe", steps=10, ckpt_every=2)
    run = tmp_path / "run"
    real_forward = model_mod.Transformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, cache=None):
        out = real_forward(self, idx, targets, cache)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model_mod.Transformer, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5; .*last good checkpoint \(step 4\) is kept"):
        train(cfg, run, ROOT, cache, progress=False)
    assert [s for s, _ in list_checkpoints(run)][-1] == 4
    assert len(_losses(run)) == 4


def test_eval_cli_and_api(tmp_path, cache, capsys):
    run = tmp_path / "run"
    train(_cfg("fine-grained", steps=4, ckpt_every=2), run, ROOT, cache, progress=False)
    res = evaluate_run(run, None, None, 1024, ROOT, cache)
    assert res["step"] == 4 and set(res["domains"]) == {"redpajama", "wikipedia", "c4"}
    for r in res["domains"].values():
        assert r["tokens"] == 1024 and r["docs"] >= 1 and r["ppl"] == pytest.approx(math.exp(r["loss"]))
    # The same numbers at an earlier step differ, and the CLI prints JSON with them.
    assert main(["eval", str(run), "--step", "2", "--max-tokens", "1024", "--json", "--data-root", str(ROOT),
                 "--cache-dir", str(cache)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 2 and out["domains"]["c4"]["loss"] != res["domains"]["c4"]["loss"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "huge", "--model", "smoe"], "--preset: unknown preset 'huge'"),
        (["train", "--preset", "smoke", "--model", "moe"], "--model: unknown variant 'moe'"),
        (["train", "--preset", "smoke", "--model", "smoe", "--set", "optim.lrr=1"], "optim.lrr: unknown key"),
        (["train", "--preset", "smoke", "--model", "smoe", "--set", "steps=ten"], "TrainConfig.steps: expected an integer"),
        (["train", "--preset", "smoke", "--model", "smoe", "--set", "steps"], "--set: expected key=value"),
        (["train", "--preset", "smoke", "--model", "smoe", "--set", "model.vocab_size=100"],
         "model.vocab_size: 100 is smaller than the tokenizer's vocabulary"),
        (["eval", "/nonexistent/run"], "RUN_DIR: /nonexistent/run is not a directory"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, cache, capsys, argv, message):
    argv = argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" else [])
    argv += ["--data-root", str(ROOT), "--cache-dir", str(cache)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_missing_data_root_and_mismatched_run_dir(cpu_kind, tmp_path, cache, capsys, monkeypatch):
    monkeypatch.delenv("MHMOE_DATA_ROOT", raising=False)
    # No data root: smoke and demo read the embedded sample; a larger preset says where to get the corpora,
    # before anything is written.
    assert main(["train", "--preset", "tiny", "--model", "smoe", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "preset 'tiny' needs the full corpora" in err and "mhmoe data prepare --preset tiny" in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()
    assert main(["train", "--preset", "smoke", "--model", "smoe", "--out", str(tmp_path / "r"),
                 "--data-root", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    run = tmp_path / "run"
    train(_cfg("smoe", steps=2), run, ROOT, cache, progress=False)
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["train", "--preset", "smoke", "--model", "mhmoe-h2", "--out", str(run), "--data-root", str(ROOT),
                 "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (model.moe_ffn" in err and err.count("\n") == 1
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing touched


def test_ddp_two_processes_match_one(tmp_path, cache, capsys):
    # The same command on 1 and 2 processes: the global batch of 8 sequences is 1 x 8 rows or 2 x 4 rows (the
    # per-process micro-batch derived from batch_size 8), drawn alike (micro_batches). The 1-process run is this
    # process's `main` (no process group), which spares a process start (~4 s of imports).
    base = ["train", "--preset", "smoke", "--model", "mhmoe-h2", "--data-root", str(ROOT), "--cache-dir", str(cache),
            "--no-progress", "--set", "steps=3", "--set", "threads=1",
            "--set", "model.moe_ffn.lb_coef=0"]  # the balance loss is per rank by design; drop it for equality
    assert main([*base, "--out", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    # Ranks as torchrun starts them (forked, tests/helpers.py); torchrun itself launches test_distributed.py's
    # bad-config test.
    two = ranks_like_torchrun([*base, "--out", str(tmp_path / "two")], tmp_path / "logs")
    assert [code for code, _ in two] == [0, 0], [err[-2000:] for _, err in two]
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        assert abs(a - b) < 1e-4 * abs(a)
    assert (tmp_path / "two" / "checkpoints" / "step_0000003").is_dir()  # DDP: rank 0 writes native checkpoints


@pytest.mark.parametrize("tokens, batch, world, want", [
    (512, 8, 1, (8, 1)),  # one process: batch_size x accumulation, as configured
    (1024, 8, 1, (8, 2)),
    (1024, 4, 2, (4, 2)),  # a whole number of batch_size x world micro-batches: batch_size per process
    (512, 8, 2, (4, 1)),  # derived: the 1-process micro-batch dealt out to the ranks, same accumulation
    (1024, 8, 4, (2, 2)),
    (3 * 512, 8, 4, (2, 3)),
    (6 * 64, 6, 4, None),  # 6 rows over 4 processes: refused
    (12 * 64, 6, 8, None),
    (6 * 64, 3, 2, (3, 1)),
    (18 * 64, 6, 3, (6, 1)),
    (12 * 64, 3, 2, (3, 2)),
    (20 * 64, 4, 5, (4, 1)),
    (10 * 64, 5, 2, (5, 1)),
    (15 * 64, 5, 3, (5, 1)),
    (12 * 64, 6, 4, (3, 1)),  # neither fits: the largest divisor of the 3 rows per process within batch_size
    (24 * 64, 4, 3, (4, 2)),
    (20 * 64, 10, 4, (5, 1)),
])
def test_micro_batches_keep_the_global_batch(tokens, batch, world, want):
    from mhmoe.errors import ConfigError
    from mhmoe.training.config import micro_batches

    cfg = preset("smoke", "smoe").replace(tokens_per_step=tokens, batch_size=batch)
    if want is None:
        with pytest.raises(ConfigError, match=r"cannot be split evenly over \d+ processes; use --set tokens_per_step="):
            micro_batches(cfg, world)
        return
    micro, accum = micro_batches(cfg, world)
    assert (micro, accum) == want and micro * accum * world * cfg.seq_len == tokens and micro <= batch


def test_derived_micro_batches_draw_the_one_process_rows():
    """batch_size 8, 2 micro-batches of 8 rows per step on one process; on 4 processes each rank's micro-batch is
    its quarter of the 1-process micro-batch."""
    import numpy as np

    from mhmoe.data.cache import TokenizedCorpus
    from mhmoe.data.sampler import TrainSampler
    from mhmoe.training.config import micro_batches

    corpus = TokenizedCorpus("n", np.arange(10_000, dtype=np.uint16), np.array([0, 10_000]))
    cfg = preset("smoke", "smoe").replace(tokens_per_step=1024)
    assert micro_batches(cfg, 1) == (8, 2) and micro_batches(cfg, 4) == (2, 2)
    for m in range(2):
        one = TrainSampler(corpus, cfg.seq_len, 8, cfg.seed).batch(5, m)[0]
        ranks = [TrainSampler(corpus, cfg.seq_len, 2, cfg.seed, r, 4).batch(5, m)[0] for r in range(4)]
        assert torch.equal(torch.cat(ranks), one)


def test_second_process_on_a_run_dir_is_refused_and_a_killed_holder_frees_it(tmp_path, cache, capsys):
    from conftest import hold_run_lock

    run = tmp_path / "run"
    holder = hold_run_lock(run, tmp_path / "never")
    argv = ["train", "--preset", "smoke", "--model", "smoe", "--out", str(run), "--data-root", str(ROOT),
            "--cache-dir", str(cache), "--no-progress", "--set", "steps=2", "--set", "threads=1"]
    try:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another process (pid {holder.pid})" in err[0] and "--out" in err[0]
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written by the refused trainer
    finally:
        holder.kill()
        holder.wait()
    # The OS drops a dead process's flock: no stale lock to clean up by hand.
    assert main(argv) == 0
    assert len(_losses(run)) == 2


def test_cpu_bf16_detection_from_cpuinfo():
    from mhmoe.training.device import cpu_has_fast_bf16

    assert not cpu_has_fast_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_has_fast_bf16("flags\t\t: avx2 avx512f avx512_bf16\n")
    assert cpu_has_fast_bf16("flags\t\t: avx2 amx_bf16 amx_tile\n")
    assert cpu_has_fast_bf16("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert not cpu_has_fast_bf16("Features\t: fp asimd\n")
    assert cpu_has_fast_bf16("")  # cannot tell: no warning


def test_cpu_kind_is_read_from_the_cpuinfo_seam(cpu_kind):
    from mhmoe.training.device import cpu_bf16_flags, cpu_has_fast_bf16

    assert cpu_has_fast_bf16() == (cpu_kind == "bf16-native")
    assert cpu_bf16_flags() == ({"avx512_bf16", "amx_bf16"} if cpu_kind == "bf16-native" else set())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stderr_of_a_good_run_on_every_cpu(cpu_kind, dtype, tmp_path, cache, capsys):
    """No hint on any CPU; bf16 on a CPU without native bf16: one warning, after the first step, with its time."""
    train(_cfg("smoe", steps=2, dtype=dtype), tmp_path / "run", ROOT, cache, progress=False)
    err = capsys.readouterr().err
    if dtype == "bfloat16" and cpu_kind == "avx2-only":
        assert err.count("\n") == 1 and "dtype=bfloat16 on a CPU without native bf16" in err
        assert re.search(r"\(step 1 took \d+\.\d s\); use --set dtype=float32\n$", err), err
    else:
        assert err == ""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bad_step", [1, 2])
def test_a_failing_run_ends_stderr_with_its_one_line_error(cpu_kind, dtype, bad_step, tmp_path, cache, capsys,
                                                           monkeypatch):
    """With --no-progress, a run that fails at its first step writes exactly one stderr line on every CPU; one that
    fails later ends stderr with its error (after the slow-bf16 warning, the one other line a run may print)."""
    from mhmoe import model as M

    real, calls = M.Transformer.forward, [0]

    def poisoned(self, idx, targets=None, cache=None):
        out = real(self, idx, targets, cache)
        if targets is not None and self.training:
            calls[0] += 1
            if calls[0] == bad_step:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(M.Transformer, "forward", poisoned)
    argv = ["train", "--preset", "smoke", "--model", "smoe", "--out", str(tmp_path / "run"), "--data-root", str(ROOT),
            "--cache-dir", str(cache), "--no-progress", "--set", "steps=4", "--set", f"dtype={dtype}"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith(f"mhmoe train: error: loss is nan at step {bad_step}; stopped without updating")
    warned = bad_step > 1 and dtype == "bfloat16" and cpu_kind == "avx2-only"
    assert len(lines) == 1 + warned and (not warned or "without native bf16" in lines[0]), lines
