"""The CLI's glibc tuning keeps large temporaries out of mmap (no page faults for re-allocated buffers)."""

import subprocess
import sys

import pytest

CODE = """
import resource, sys, torch
from mhmoe.runtime import tune_glibc_malloc
applied = tune_glibc_malloc() if sys.argv[1] == "tune" else False
x = torch.randn(4096, 768)
def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        y = torch.cat([x] * 4) * 2  # 48 MB temporaries, above glibc's 32 MB mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
faults()
print(applied, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_reuses_large_buffers():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        applied, faults = out.stdout.split()
        return applied == "True", int(faults)

    tuned_applied, tuned = run("tune")
    _, default = run("default")
    assert tuned_applied
    assert default > 200_000  # each 48 MB buffer is mapped afresh: ~12k faults apiece
    assert tuned < default / 5  # heap growth only; buffers are reused
