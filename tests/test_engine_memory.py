"""Peak memory as the benchmarks report it."""

from __future__ import annotations

import subprocess
import sys

# A fresh process, so that no earlier test's peak hides the allocation.
SCRIPT = """
from cxr.engine.memory import peak_memory_mb
before = peak_memory_mb("cpu")
block = bytearray(256 * 2**20)
block[::4096] = b"x" * len(block[::4096])  # touch every page
print(before, peak_memory_mb("cpu"))
"""


def test_peak_memory_on_cpu_grows_with_the_resident_set():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120)
    before, after = map(float, out.stdout.split())
    assert 10 < before < after < 1e6 and after - before > 200  # MiB, not KiB or bytes
