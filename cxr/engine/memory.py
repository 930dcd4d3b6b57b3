"""Peak memory of a run, as the benchmarks report it."""

from __future__ import annotations

import platform
import resource

import torch


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory in MiB: on a GPU the most the caching allocator held for tensors; on a CPU
    the largest resident set of this process plus that of its largest finished child (e.g.
    DataLoader workers), since a pipeline's decoding may live there."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
           + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return rss / (2**20 if platform.system() == "Darwin" else 2**10)  # bytes on macOS, KiB on Linux
