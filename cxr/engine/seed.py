"""Seeding, and capturing/restoring every RNG so a resumed run draws the same numbers.

The state is made of plain containers and tensors only (no numpy objects), so it can be
stored in a checkpoint that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device).

    ``deterministic=True`` asks torch for deterministic kernels (warning, not failing, where an
    op has none) and turns cuDNN autotuning off; otherwise autotuning is on for speed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; only effective before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        if torch.are_deterministic_algorithms_enabled():
            # (only when needed: the call imports torch._inductor, seconds of start-up)
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process as plain containers and tensors."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(info: Any = None) -> dict[str, Any] | list[dict[str, Any]]:
    """This process's RNG states, or in a DDP run every rank's (a collective: call it on all
    ranks, then save on rank 0 with ``CheckpointManager.save(..., rng=states)``) so that each
    process resumes its own random stream (``load(..., rank=info.rank)``)."""
    import torch.distributed as dist

    if info is None or getattr(info, "world_size", 1) <= 1 or not dist.is_initialized():
        return rng_state()
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when the device count matches)."""
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
        "has_gauss": int(n["has_gauss"]),
        "gauss": float(n["gauss"]),
    })
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _to_lists(obj: Any) -> Any:
    return [_to_lists(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, (tuple, list)) else obj
