import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # two xdist workers on two cores: one thread each avoids oversubscription


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shared_data_root() -> Path | None:
    """The real corpora (CI points MHMOE_DATA_ROOT at ../shared/data), or None."""
    env = os.environ.get("MHMOE_DATA_ROOT")
    for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None
