"""Peak memory as the benchmarks report it."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh process; Linux carries the parent's high-water mark across fork + exec, so the
# script allocates past whatever peak it starts with (read against /proc's current size).
SCRIPT = """
import os
from cxr.engine.memory import peak_memory_mb
before = peak_memory_mb("cpu")
current = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
block = bytearray(int((max(0.0, before - current) + 300) * 2**20))
block[::4096] = b"x" * len(block[::4096])  # touch every page
print(before, peak_memory_mb("cpu"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_memory_on_cpu_grows_with_the_resident_set():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120)
    before, after = map(float, out.stdout.split())
    assert 10 < before < after < 1e6 and after - before > 200  # MiB, not KiB or bytes
