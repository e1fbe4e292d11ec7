"""Shared test helpers: the layer variants under test, their construction with large weights, tolerances; torchrun
from the tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mhmoe import FFNConfig, build_ffn
from mhmoe.complexity import fine_grained

D = 48


VARIANTS = {
    "dense": FFNConfig(kind="dense", dim=D, hidden_dim=40),
    "smoe": FFNConfig(dim=D, hidden_dim=40, num_experts=4, top_k=1),
    "fine-grained": fine_grained(FFNConfig(dim=D, hidden_dim=40, num_experts=4, top_k=1), 2),
    "mhmoe-h2": FFNConfig(dim=D, hidden_dim=16, num_experts=10, top_k=2, heads=2, head_layer=True, merge_layer=True),
    "mhmoe-h3-shared": FFNConfig(dim=D, hidden_dim=16, num_experts=12, top_k=3, heads=3, head_layer=True,
                                 merge_layer=True, shared_hidden_dim=20),
    "mhmoe-h4-renorm-nohead": FFNConfig(dim=D, hidden_dim=8, num_experts=6, top_k=2, heads=4, merge_layer=True,
                                        renormalize=True),
}



def _make(cfg: FFNConfig, dtype=torch.float32):
    layer = build_ffn(cfg)
    with torch.no_grad():  # larger-than-default weights so the outputs and gradients are far from zero
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer.to(dtype)



def assert_close_scaled(a, b, tol, what=""):
    """max |a - b| within tol of the largest |b| (the natural scale of fp32/bf16 rounding in sums)."""
    a, b = a.float(), b.float()
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-6)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x scale {scale:.3g}"



def _grads(layer, x, out, g):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out.backward(g)
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]




# ----------------------------------------------------------------------------------------------------------
# torchrun from the tests (gloo on CPU)

REPO = Path(__file__).resolve().parents[1]

# `mhmoe <argv>` with two test hooks set through the environment: MHMOE_TEST_POISON=RANK:N makes that rank's
# N-th training forward return a NaN loss; MHMOE_TEST_STOP_AFTER=S stops `mhmoe train` after step S.
_DRIVER = """
import os, sys
from functools import partial

poison = os.environ.get("MHMOE_TEST_POISON")
if poison and int(os.environ.get("RANK", "0")) == int(poison.split(":")[0]):
    from mhmoe import model as M

    real, calls, at = M.Transformer.forward, [0], int(poison.split(":")[1])

    def forward(self, idx, targets=None, cache=None):
        out = real(self, idx, targets, cache)
        if targets is not None and self.training:
            calls[0] += 1
            if calls[0] == at:
                out.loss = out.loss * float("nan")
        return out

    M.Transformer.forward = forward
if os.environ.get("MHMOE_TEST_STOP_AFTER"):
    import mhmoe.cli.train as T

    T.train = partial(T.train, stop_after=int(os.environ["MHMOE_TEST_STOP_AFTER"]))
from mhmoe.cli import main

sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def torchrun_mhmoe(argv: list[str], log_dir: Path, nproc: int = 2, timeout: int = 300,
                   **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc -m mhmoe.cli ARGV` through the test driver (see _DRIVER; `env` may set
    its hooks); each rank's stdout/stderr go to LOG_DIR/<run id>/attempt_0/<rank>/ (rank_logs)."""
    driver = Path(log_dir) / "mhmoe_test_driver.py"
    driver.parent.mkdir(parents=True, exist_ok=True)
    driver.write_text(_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "--log-dir", str(log_dir), "--redirects", "3", str(driver)]
    return subprocess.run(cmd + list(argv), env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def rank_logs(log_dir: Path, name: str = "stderr.log") -> list[str]:
    """What each rank of the newest `torchrun_mhmoe(argv, log_dir)` run wrote to `name`, in rank order."""
    runs = sorted(Path(log_dir).glob("*/attempt_0"), key=lambda p: p.stat().st_mtime)
    files = sorted(runs[-1].glob(f"*/{name}"), key=lambda p: int(p.parent.name))
    return [f.read_text() for f in files]


# Processes that run `mhmoe` (the ranks of ranks_like_torchrun, start_ranks' workers, fork_mhmoe's runs to kill)
# are forked from one server process per test process that has imported torch, its compiler front end (which
# the optimizer imports at its first step) and the CLI once: a fresh interpreter spends about 2.5 CPU seconds on
# those imports before it trains a step, and the distributed tests alone started about 30 such processes. A
# forked process is otherwise what torchrun starts: the driver below under torchrun's environment, its own
# stdout and stderr, its exit code; it ends with os._exit, so a fault in the interpreter's own exit shows only
# where torchrun starts fresh interpreters (test_distributed.py's bad-config test under torchrun). The server has
# run no torch op, so no OpenMP pool or other thread is forked with it.
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "mhmoe.cli", "mhmoe.cli.train", "mhmoe.training.loop"]


def forkserver():
    """The multiprocessing context whose processes fork from a server that has imported _PRELOAD."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts: the first process of this test process
    return ctx


def _enter(env: dict, cwd: str) -> None:
    """In a forked process: `env` as its whole environment, `cwd` as its directory (the server's are those of
    when it started: the first forking test's)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)


def _with_env(rank: int, fn, env: dict, cwd: str, *args) -> None:
    _enter(env, cwd)
    fn(rank, *args)


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn(fn, args, nprocs) with the ranks forked from the forkserver above, each under
    this process's environment and working directory of now (the server's are those of when it started)."""
    import torch.multiprocessing as mp

    forkserver()
    mp.start_processes(_with_env, args=(fn, dict(os.environ), os.getcwd(), *args), nprocs=nprocs,
                       start_method="forkserver", join=True)


def _driver_main(argv: list[str], env: dict, out: str, err: str, cwd: str) -> None:
    """`mhmoe ARGV` through the driver in a forked process: `env` as its whole environment, stdout/stderr to
    files. Its exit code is the driver's; it ends with os._exit, without the interpreter's own exit."""
    _enter(env, cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["mhmoe_test_driver.py", *argv]
    exec(compile(_DRIVER, "mhmoe_test_driver.py", "exec"), {"__name__": "__main__"})


def fork_mhmoe(argv: list[str], env: dict, out: str | Path, err: str | Path):
    """A started process (multiprocessing.Process) that runs `mhmoe ARGV` through the driver, forked from the
    server (no imports to wait for); stdout and stderr go to the files OUT and ERR."""
    proc = forkserver().Process(target=_driver_main, args=(list(argv), dict(env), str(out), str(err), os.getcwd()))
    proc.start()
    return proc


def ranks_like_torchrun(argv: list[str], log_dir: Path, nproc: int = 2, timeout: int = 300,
                        **env: str) -> list[tuple[int, str]]:
    """(exit code, stderr) of each rank of `mhmoe ARGV` (through the test driver) started as torchrun starts them
    (its environment: MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE, ...) but watched one by one: torchrun's
    agent sends SIGTERM to the other ranks as soon as one exits, so their own exit codes and last words are lost.
    The ranks are forked (forkserver above); their stdout/stderr are LOG_DIR/stdout-<rank>.log, stderr-<rank>.log."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                                  WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", **env)
        procs.append(fork_mhmoe(argv, rank_env, log_dir / f"stdout-{rank}.log", log_dir / f"stderr-{rank}.log"))
    try:
        for p in procs:
            p.join(timeout)
        late = [rank for rank, p in enumerate(procs) if p.exitcode is None]
        if late:
            raise TimeoutError(f"ranks {late} of {argv} still ran after {timeout} s")
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
    return [(p.exitcode, (log_dir / f"stderr-{rank}.log").read_text()) for rank, p in enumerate(procs)]
