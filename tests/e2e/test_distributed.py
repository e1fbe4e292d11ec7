"""Scale-out on CPU (gloo): the expert-parallel layer equals the single-process layer (outputs and every gradient,
4 processes as 2 data-parallel x 2 expert-parallel and as 1 x 4); `torchrun ... mhmoe train` with FSDP2 + EP,
DDP + EP and FSDP2 alone matches the 1-process run for the same global batch (losses, metrics.jsonl keys,
evals.jsonl records), resumes bit for bit, stops on a NaN loss keeping its last checkpoint, and refuses a bad
config with the same one line on every rank (ranks forked in torchrun's environment, tests/helpers.py; torchrun
itself for the refusal that needs the process group); a DCP checkpoint written by 2 processes reloads in one
(`mhmoe consolidate`: the 1-process run's weights; `mhmoe train` resumes from it). Also the calculators."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import shared_data_root
from helpers import free_port, rank_logs, ranks_like_torchrun, start_ranks, torchrun_mhmoe

from mhmoe.distributed.memory import comm_volume_per_token, memory_per_gpu, memory_table
from mhmoe.distributed.parallel import ParallelConfig
from mhmoe.layers.config import FFNConfig
from mhmoe.training.presets import preset

ROOT = shared_data_root()


# ----------------------------------------------------------------------------------------------------------
# The expert-parallel layer


LAYERS = {  # D=48: MH-MoE h=2 with head/merge and capacity, SMoE with a shared expert; both top-2 of 8
    "mhmoe-h2": FFNConfig(kind="moe", dim=48, hidden_dim=32, num_experts=8, top_k=2, heads=2, head_layer=True,
                          merge_layer=True),
    "smoe": FFNConfig(kind="moe", dim=48, hidden_dim=64, num_experts=8, top_k=2, shared_hidden_dim=32),
}


def _ep_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mhmoe.distributed.expert_parallel import shard_experts
    from mhmoe.distributed.parallel import init_parallel, sync_expert_grads
    from mhmoe.layers.moe import MoELayer

    report = {}
    n = 24  # tokens per rank
    for ep in (2, 4):
        par = init_parallel(ParallelConfig(ep=ep), torch.device("cpu"))
        for name, cfg in LAYERS.items():
            for capacity in (0.0, 1.0):
                cfg_c = cfg.replace(capacity_factor=capacity)
                torch.manual_seed(0)
                layer = MoELayer(cfg_c)
                x = torch.randn(world * n, cfg.dim)
                g = torch.randn(world * n, cfg.dim)
                mine = slice(rank * n, (rank + 1) * n)
                # Data-parallel reference: the full layer on this rank's tokens, gradients averaged over ranks.
                ref = copy.deepcopy(layer)
                y_ref, _ = ref(x[mine])
                (y_ref * g[mine]).sum().backward()
                ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
                for t in ref_grads.values():
                    dist.all_reduce(t)
                    t.div_(world)
                if capacity == 0:  # dropless: also one process on the whole global batch
                    full = copy.deepcopy(layer)
                    y_full, _ = full(x)
                    ((y_full * g).sum() / world).backward()
                    assert torch.allclose(y_full[mine], y_ref, atol=1e-6)
                    for k, p in full.named_parameters():
                        assert torch.allclose(p.grad, ref_grads[k], atol=1e-5), k
                shard_experts(layer, par.ep_group)
                y, aux = layer(x[mine])
                (y * g[mine]).sum().backward()
                for k, p in layer.named_parameters():
                    if ".experts." not in f".{k}":
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)
                sync_expert_grads(layer, par)
                errs = {"y": (y - y_ref).abs().max().item()}
                e = layer.experts
                lo, hi = e.ep_rank * e.local_experts, (e.ep_rank + 1) * e.local_experts
                for k, p in layer.named_parameters():
                    want = ref_grads[k][lo:hi] if k.startswith("experts.") else ref_grads[k]
                    errs[k] = (p.grad - want).abs().max().item()
                assert errs["y"] < 1e-6 and max(errs.values()) < 1e-5, errs
                key = f"{name} ep={ep} cf={capacity}"
                report[key] = {"max_err": max(errs.values()), "dropped": float(aux.dropped_fraction),
                               "bytes_per_token": e.comm.bytes / n,
                               "offrank_bytes_per_token": e.comm.offrank_bytes / n}
        dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_expert_parallel_layer_equals_single_process(tmp_path):
    world = 4
    start_ranks(_ep_worker, (world, free_port(), str(tmp_path)), world)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    worst = max(v["max_err"] for rep in reports for v in rep.values())
    print(f"expert parallel vs single process: max |error| over outputs and all gradients = {worst:.2e}")
    assert any(v["dropped"] > 0 for rep in reports for k, v in rep.items() if "cf=1.0" in k)  # capacity was active
    # The all-to-all carries sub-tokens: MH-MoE (h=2, top-2) moves what SMoE (top-2) moves per token.
    for ep in (2, 4):
        got = {name: reports[0][f"{name} ep={ep} cf=0.0"]["bytes_per_token"] for name in LAYERS}
        off = sum(r[f"mhmoe-h2 ep={ep} cf=0.0"]["offrank_bytes_per_token"] for r in reports) / world
        want = comm_volume_per_token(LAYERS["mhmoe-h2"], ep, bytes_per_value=4)
        print(f"ep={ep}: all-to-all bytes per token per direction (fp32): MH-MoE h=2 {got['mhmoe-h2']:.0f}, "
              f"SMoE {got['smoe']:.0f} (= top_k * D * 4 = {want['bytes']}); MH-MoE off-rank {off:.1f} "
              f"(uniform routing: {want['offrank_bytes']:.1f})")
        assert got["mhmoe-h2"] == got["smoe"] == want["bytes"]


# ----------------------------------------------------------------------------------------------------------
# Training, FSDP2 / DDP x EP, distributed checkpoints


# The smoke preset's 8 x 64-token global batch: 1 process takes all 8 rows, each of 2 processes 4 of them (the
# per-process micro-batch derived from batch_size 8). The balance loss is per rank by design: off for equality.
SETS = ["steps=4", "ckpt_every=2", "threads=1", "eval_every=2", "eval_tokens=512", "model.moe_ffn.lb_coef=0"]
METRIC_KEYS = ["step", "tokens", "loss", "ce", "aux", "lb", "z", "router_entropy", "dropped", "lr", "grad_norm",
               "tok_per_s", "expert_load_max_over_mean", "tokens_per_expert", "load_cv", "load_max_mean", "dead_experts",
               "expert_activation", "subtoken_distinct", "router_entropy_per_layer"]


def _records(run_dir, name="metrics.jsonl"):
    return [json.loads(l) for l in (Path(run_dir) / name).read_text().splitlines()]


def _losses(run_dir):
    return [r["loss"] for r in _records(run_dir)]


def _argv(out, cache, *extra, model="mhmoe-h2"):
    argv = ["train", "--preset", "smoke", "--model", model, "--out", str(out), "--data-root", str(ROOT),
            "--cache-dir", str(cache), "--no-progress", *extra]
    for kv in SETS:
        argv += ["--set", kv]
    return argv


def _two_ranks(out, cache, *extra, model="mhmoe-h2", **env):
    """2 ranks of `mhmoe train` in torchrun's environment, forked without its agent (tests/helpers.py): what is
    compared is the training, not the launcher. torchrun itself launches the bad-config test below."""
    ranks = ranks_like_torchrun(_argv(out, cache, *extra, model=model), Path(f"{out}-logs"), **env)
    assert [code for code, _ in ranks] == [0, 0], [err[-3000:] for _, err in ranks]
    return _losses(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1-process `mhmoe train` on the same global batch (8 x 64 tokens per step)."""
    if ROOT is None:
        pytest.skip("real corpora not available (set MHMOE_DATA_ROOT)")
    from mhmoe.training.loop import train
    from mhmoe.training.rundir import resolve_config

    base = tmp_path_factory.mktemp("dist")
    cfg = resolve_config("smoke", "mhmoe-h2", SETS)
    train(cfg, base / "ref", ROOT, base / "cache", progress=False)
    return base, cfg


def _close(a, b, rel=1e-4):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def fsdp_ep(reference):
    """The 2-process FSDP2 x EP2 run of the reference's config."""
    base, _ = reference
    _two_ranks(base / "fsdp_ep", base / "cache", "--ep", "2", "--dp", "fsdp")
    return base / "fsdp_ep"


def test_fsdp_ep_training_matches_one_process_and_checkpoint_reloads_in_one(reference, fsdp_ep, capsys):
    from safetensors.torch import load_file

    from mhmoe.cli import main
    from mhmoe.distributed.dcp import list_distributed_checkpoints
    from mhmoe.training.checkpoint import list_checkpoints
    from mhmoe.training.loop import train

    base, cfg = reference
    run = fsdp_ep
    ref, got = _losses(base / "ref"), _losses(run)
    print(f"FSDP2 x EP2 (2 processes) losses {got}\n1 process                  losses {ref}")
    assert _close(got, ref)
    assert [s for s, _ in list_distributed_checkpoints(run)] == [2, 4]
    info = json.loads((run / "dcp" / "step_0000004" / "trainer.json").read_text())
    assert info == {"step": 4, "world": 2, "ep": 2}
    # Reloaded in one process (no process group), the 2-process shards give the 1-process run's weights.
    assert main(["consolidate", str(run), "--step", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {run / 'checkpoints' / 'step_0000002'}"
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]  # 4 consolidated at the end of training
    for step in (2, 4):
        a = load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))
        b = load_file(str(base / "ref" / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))
        assert a.keys() == b.keys()
        err = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"step {step}: max |weight(2 proc, DCP -> 1 proc) - weight(1 proc)| = {err:.2e}")
        assert err < 1e-4  # Adam amplifies the reduction-order rounding of tiny gradients
    # ... and 1-process `mhmoe train` resumes from the 2-process step-2 checkpoint (AdamW state included).
    resumed = base / "resumed"
    resumed.mkdir()
    shutil.copy(run / "config.json", resumed / "config.json")
    shutil.copytree(run / "tokenizer", resumed / "tokenizer")
    shutil.copytree(run / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    train(cfg, resumed, ROOT, base / "cache", progress=False)
    assert _close(_losses(resumed), ref[2:])


def test_parallel_run_logs_what_a_one_process_run_logs(reference, fsdp_ep):
    base, _ = reference
    one, two = _records(base / "ref"), _records(fsdp_ep)
    assert [list(r) for r in two] == [list(r) for r in one] == [METRIC_KEYS] * 4
    # Expert loads are summed over the ranks: the global batch's, like one process's (the same routers at step 1).
    assert two[0]["tokens_per_expert"] == one[0]["tokens_per_expert"]
    for a, b in zip(one, two):
        assert sum(b["tokens_per_expert"][0]) == 512 * 2 * 2  # tokens x heads x top-k
        for k in ("ce", "aux", "z", "router_entropy", "dropped", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), k
    evals_one, evals_two = _records(base / "ref", "evals.jsonl"), _records(fsdp_ep, "evals.jsonl")
    assert [sorted(r) for r in evals_two] == [sorted(r) for r in evals_one]
    assert [r["step"] for r in evals_two] == [2, 4] and {"redpajama", "wikipedia", "c4"} <= set(evals_two[0])
    for a, b in zip(evals_one, evals_two):
        domains = [k for k in a if k not in ("step", "tokens")]
        assert _close([a[k] for k in domains], [b[k] for k in domains])
    assert any((fsdp_ep / "tb").iterdir())


@pytest.mark.parametrize("dp, ep", [("ddp", 2), ("fsdp", 1)])
def test_ddp_ep_and_plain_fsdp_training_match_one_process(reference, dp, ep):
    base, _ = reference
    got = _two_ranks(base / f"{dp}_{ep}", base / "cache", "--ep", str(ep), "--dp", dp)
    print(f"{dp.upper()} x EP{ep} (2 processes) losses {got}")
    assert _close(got, _losses(base / "ref"))


def test_aux_loss_free_bias_under_expert_parallelism_matches_one_process(reference):
    """The bias update sums the loads over the ranks: 2 processes (DDP x EP2) end with the 1-process biases."""
    from safetensors.torch import load_file

    from mhmoe.training.loop import train
    from mhmoe.training.rundir import resolve_config

    base, _ = reference
    train(resolve_config("smoke", "mhmoe-h2-alf", SETS), base / "alf_ref", ROOT, base / "cache", progress=False)
    got = _two_ranks(base / "alf_ep", base / "cache", "--ep", "2", "--dp", "ddp", model="mhmoe-h2-alf")
    assert _close(got, _losses(base / "alf_ref"))
    one = load_file(str(base / "alf_ref" / "checkpoints" / "step_0000004" / "model.safetensors"))
    two = load_file(str(base / "alf_ep" / "checkpoints" / "step_0000004" / "model.safetensors"))
    biases = [k for k in one if k.endswith("expert_bias")]
    assert biases and all(one[k].abs().sum() > 0 for k in biases)  # the update ran
    for k in biases:
        assert torch.equal(one[k], two[k]), k
    assert [r["bias_norm"] for r in _records(base / "alf_ep")] == [r["bias_norm"] for r in _records(base / "alf_ref")]


def test_parallel_resume_is_bit_exact(reference, fsdp_ep):
    base, _ = reference
    part = base / "fsdp_ep_resumed"
    assert _two_ranks(part, base / "cache", "--ep", "2", "--dp", "fsdp", MHMOE_TEST_STOP_AFTER="3") == \
        _losses(fsdp_ep)[:3]
    assert sorted(p.name for p in (part / "dcp").iterdir()) == ["step_0000002"]
    assert (part / "checkpoints" / "step_0000002").is_dir()  # the newest one consolidated when it stopped
    _two_ranks(part, base / "cache", "--ep", "2", "--dp", "fsdp")  # resumes from step 2, re-does 3
    assert _losses(part) == _losses(fsdp_ep)  # exact float equality
    assert _records(part, "evals.jsonl") == _records(fsdp_ep, "evals.jsonl")


def test_parallel_nan_loss_stops_every_rank_and_keeps_the_checkpoint(reference, cpu_kind):
    base, _ = reference
    run = base / f"nan-{cpu_kind}"
    # Only rank 1's third forward is poisoned: the all-reduced loss stops both ranks at step 3.
    ranks = ranks_like_torchrun(_argv(run, base / "cache", "--ep", "2", "--dp", "fsdp"), base / f"nan-logs-{cpu_kind}",
                                MHMOE_TEST_POISON="1:3")
    assert [code for code, _ in ranks] == [2, 2], ranks
    err = ranks[0][1]
    assert ranks[1][1] == err and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mhmoe train: error: loss is nan at step 3; stopped without updating. The last good "
                          f"checkpoint (step 2) is kept in {run}")
    assert sorted(p.name for p in (run / "dcp").iterdir()) == ["step_0000002"]
    assert len(_losses(run)) == 2


BAD_CONFIGS = [
    # refused by every rank before the process group starts
    (["--set", "batch_size=1", "--set", "tokens_per_step=192"],
     "TrainConfig.tokens_per_step: 192 (3 sequences of seq_len 64) cannot be split evenly over 2 processes; use "
     "--set tokens_per_step=256 (or 128)"),
    (["--ep", "3"], "--ep: must divide the number of processes (2), got 3"),
    # refused by rank 0 (the run directory holds another run), told to rank 1
    (["--set", "seed=7"], "holds a run with a different config (seed: 1337 in the run, 7 now)"),
]


def _bad_config_run(reference, tmp_path):
    base, _ = reference
    run = tmp_path / "run"
    shutil.copytree(base / "ref", run, ignore=shutil.ignore_patterns("checkpoints", "tb", ".lock"))
    return base, run


@pytest.mark.parametrize("extra, message", BAD_CONFIGS)
def test_bad_config_is_one_line_on_every_rank(reference, tmp_path, extra, message):
    base, run = _bad_config_run(reference, tmp_path)
    ranks = ranks_like_torchrun(_argv(run, base / "cache", *extra), tmp_path / "logs")
    assert [code for code, _ in ranks] == [2, 2], ranks
    err = ranks[0][1]
    assert ranks[1][1] == err and err.count("\n") == 1 and "Traceback" not in err and message in err, err


def test_bad_config_under_torchrun_itself_is_one_line_on_every_rank_and_exit_code_2(reference, tmp_path):
    """torchrun's agent and fresh interpreters (the forked ranks above end without the interpreter's own exit):
    the refusal that needs the process group (rank 0's, told to rank 1), the same line from each rank, and the
    agent's report of an exit code 2."""
    base, run = _bad_config_run(reference, tmp_path)
    extra, message = BAD_CONFIGS[-1]
    res = torchrun_mhmoe(_argv(run, base / "cache", *extra), tmp_path / "torchrun")
    assert res.returncode != 0 and "exitcode  : 2" in res.stderr, res.stderr[-3000:]
    logs = rank_logs(tmp_path / "torchrun")
    line = next(log for log in logs if log)
    assert all(log in ("", line) for log in logs) and line.count("\n") == 1 and message in line, logs
    assert "Traceback" not in line


def test_distributed_cli_errors_are_one_line(tmp_path, capsys):
    from mhmoe.cli import main

    assert main(["consolidate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no config.json" in err
    assert main(["train", "--preset", "smoke", "--model", "smoe", "--out", str(tmp_path / "r"), "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ep: must divide the number of processes (1), got 3" in err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--preset", "smoke", "--model", "smoe", "--out", str(tmp_path / "r"), "--ep", "0"]) == 2
    assert "--ep: must be >= 1" in capsys.readouterr().err


def test_memory_cli(capsys):
    from mhmoe.cli import main

    assert main(["memory", "--preset", "paper", "--gpus", "8", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "| mhmoe-h2 |" in out and "FSDP x16 + EP 8" in out and "all-to-all per token" in out
    assert main(["memory", "--gpus", "6", "--ep", "4"]) == 2


# ----------------------------------------------------------------------------------------------------------
# Calculators


def test_comm_volume_is_independent_of_heads_and_memory_calculator():
    smoe = preset("paper", "smoe").model
    for v in ("mhmoe-h2", "mhmoe-h3"):
        ffn = preset("paper", v).model.moe_ffn
        c = comm_volume_per_token(ffn, 8)
        # K' = h*K sub-token choices of D/h each: the same values per token as SMoE with the same top-k.
        assert c["values"] == ffn.top_k * 768 == comm_volume_per_token(smoe.moe_ffn.replace(top_k=ffn.top_k), 8)["values"]
    from mhmoe.complexity import model_param_count

    one = memory_per_gpu(smoe, 1)

    total = model_param_count(smoe)["total"]
    assert one.params == total and one.total_bytes == 16 * total  # fp32 weights + grads + two AdamW moments
    fsdp = memory_per_gpu(smoe, 8, 1, "fsdp")
    ep = memory_per_gpu(smoe, 8, 8, "fsdp")
    ddp = memory_per_gpu(smoe, 8, 1, "ddp")
    assert ddp.params == total and fsdp.params == pytest.approx(total / 8)
    # EP 8 on 8 GPUs holds 1/8 of the experts like FSDP, but never gathers them; on 16 GPUs the experts are
    # replicated twice (1/8 each) while FSDP's dense shards keep shrinking (1/16).
    assert ep.params == pytest.approx(fsdp.params) and ep.gather_bytes < fsdp.gather_bytes
    assert memory_per_gpu(smoe, 16, 8).params > memory_per_gpu(smoe, 16, 1).params
    table = memory_table({v: preset("paper", v).model for v in ("smoe", "mhmoe-h2", "mhmoe-h3")})
    print(table)
    assert table.count("\n") == 4 and "mhmoe-h3" in table


def test_a_refusal_through_together_leaves_no_reference_cycle():
    """An error raised through `together` is freed with what its callers' frames hold (in a run: the process
    groups) as soon as it is handled, not by the garbage collector: Gloo's threads freed in the interpreter's
    finalisation abort the process (SIGABRT, seen under torchrun). With the exception left in `together`'s frame
    (`err = e; raise err`), `held` below outlives the handler."""
    import gc
    import weakref

    from mhmoe.distributed.parallel import Parallel, together
    from mhmoe.errors import UserError

    class Held:
        pass

    def refuse():
        raise UserError("--out: holds another run")

    def caller(held, par):
        together(par, refuse)

    held = Held()
    alive = weakref.ref(held)
    gc.disable()
    try:
        with pytest.raises(UserError, match="holds another run"):
            caller(held, Parallel(world=1, rank=0, dp=1, ep=1, device=torch.device("cpu")))
        del held
        assert alive() is None
    finally:
        gc.enable()
