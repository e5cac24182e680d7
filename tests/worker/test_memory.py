"""Malloc tuning: freed activation-sized buffers are reused, not faulted in again."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, numpy as np
from gradserve.worker.memory import keep_freed_memory
on = keep_freed_memory()
def step():  # a few activations alive at once, then all freed, like one layer after another
    alive = [np.ones(1 << 20) for _ in range(4)]  # 8 MB each
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env):
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, check=True, capture_output=True, text=True
    )
    on, faults = out.stdout.split()
    return on == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_buffers_are_reused_without_page_faults():
    on, faults = probe()
    assert on and faults < 1000  # ten steps of 4 x 2048 pages
    off, faults_off = probe(GRADSERVE_KEEP_FREED_MEMORY="0")
    assert not off and faults_off > 10 * 1024  # glibc's default gives pages back every step
