import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # two xdist workers on two cores: one thread each avoids oversubscription


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
