import os
from pathlib import Path

import pytest

# OpenMP threads that wait passively (sleep) instead of spinning: torch's OpenMP runtime reads this when torch is
# first imported, i.e. below, and the xdist workers and the processes the tests start inherit it. Spinning threads
# burn the core the other xdist worker (or a test's second rank) needs, and the suite runs on 2 cores: the
# two-thread tests (test_threads, the FLOP counts) took 34 CPU seconds spinning and 15 waiting passively, beside a
# busy core. Results are the same either way; only how idle threads wait changes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)

if not torch.cuda.is_available():
    # The Triton kernels of dispatch="scatter" (mhmoe/layers/scatter_kernels.py) run in Triton's interpreter on a
    # machine without a GPU. triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when that module is
    # first imported, so it is set here, before any test module imports mhmoe (pytest loads conftest.py first);
    # processes the tests start inherit it. Only tests/unit/test_scatter_experts.py launches the kernels on CPU
    # tensors; on a GPU the same tests run the compiled kernels on CUDA tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _pin_threads_under_xdist() -> None:
    """The suite runs at torch's default thread count, as users do (the expert threading, FLOP counters and
    profilers are only exercised with > 1 thread). Only xdist workers that would together oversubscribe the cores
    (make test: -n 2 on 2 cores) get cores // workers threads each; tests that need 2 threads set them (fixture
    `two_threads`). The processes such a worker starts (the CLI, benchmarks, the GPU check's dry run) inherit the
    same count through OMP_NUM_THREADS: at torch's default they would oversubscribe the cores as well, and their
    OpenMP threads spin while the other worker holds a core (the dry run took 17% more CPU time so)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > 1 and workers * torch.get_num_threads() > cores:
        torch.set_num_threads(max(1, cores // workers))
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


_pin_threads_under_xdist()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# What /proc/cpuinfo says on the two kinds of machine the suite runs on (the flags that matter, abridged).
CPUINFO = {
    "bf16-native": "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n",
    "avx2-only": "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n",
}


def fake_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, kind: str) -> str:
    """Make this process and the processes it starts see a CPU of `kind` ($MHMOE_CPUINFO); returns kind."""
    path = tmp_path_factory.getbasetemp() / f"cpuinfo-{kind}"
    path.write_text(CPUINFO[kind], encoding="utf-8")
    monkeypatch.setenv("MHMOE_CPUINFO", str(path))
    return kind


@pytest.fixture(autouse=True)
def _avx2_only_by_default(monkeypatch, tmp_path_factory):
    """Every test sees an AVX2-only CPU unless it asks for another kind (`cpu_kind`), whatever CPU runs the suite:
    no output of the library may depend on the machine's CPU flags (mhmoe.training.device reads $MHMOE_CPUINFO)."""
    fake_cpu(monkeypatch, tmp_path_factory, "avx2-only")


@pytest.fixture(params=sorted(CPUINFO))
def cpu_kind(request, monkeypatch, tmp_path_factory) -> str:
    """The test runs once per kind of CPU, faked: "avx2-only" and "bf16-native"."""
    return fake_cpu(monkeypatch, tmp_path_factory, request.param)


@pytest.fixture
def two_threads():
    """torch at 2 threads for the test (the default on a 2-core machine), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def shared_data_root() -> Path:
    """The real corpora: $MHMOE_DATA_ROOT (make points it at ../shared/data when that exists), else the sample
    carried in the package, so the real-corpus tests run on a fresh clone too."""
    from mhmoe.data.corpora import SAMPLE_ROOT

    env = os.environ.get("MHMOE_DATA_ROOT")
    for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return SAMPLE_ROOT


_HOLD = """
import pathlib, sys, time
from mhmoe.training.checkpoint import run_lock
with run_lock(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    while not pathlib.Path(sys.argv[2]).exists():
        time.sleep(0.05)
"""


def hold_run_lock(run_dir: Path, release: Path):
    """A second process that holds run_dir's lock until the file `release` exists (or it is killed)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), str(release)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
