"""Test-run settings: one compute thread per pytest-xdist worker.

``pytest -n auto`` starts one worker per core; torch's default of one intra-op thread per core
in *each* worker oversubscribes the machine (measured: the CycleGAN network tests took 46 s
with the default threads and 5.5 s with one on 2 cores). Subprocesses the tests start (DDP,
resume-after-kill) inherit ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
