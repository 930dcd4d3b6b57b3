"""Single-process or DDP runs from the same code: torchrun's environment decides.

Launch with ``torchrun --nproc_per_node N -m cxr.cli.main train-gan ...``: each process reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, joins a process group (nccl on GPU, gloo on CPU) and
trains on its share of every global batch; only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cxr.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: str, local_rank: int = 0, what: str = "config key 'device'") -> torch.device:
    """``"auto"`` → this process's GPU when CUDA is available, else the CPU; others as given.

    ``what`` names the setting in an error (a config key, or a command's ``--device``)."""
    pref = (pref or "auto").strip()
    if pref == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(pref)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{what}: unknown device {pref!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        named = f"{what} {pref}" if what.startswith("--") else f"{what}: device {pref}"
        if not torch.cuda.is_available():
            raise ConfigError(f"{named}: no CUDA GPU is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{named}: only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def setup_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=resolve_device(device_pref))
    try:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ConfigError(f"WORLD_SIZE={world_size} but RANK/LOCAL_RANK are missing or not integers: "
                          "launch multi-process runs with torchrun") from None
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                    is_main=rank == 0)


def wrap_ddp(model: nn.Module, info: DistInfo, **kwargs) -> nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process run; ``model`` itself otherwise."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call in a single-process run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``tensor`` over all processes (a copy; ``tensor`` itself is unchanged)."""
    if not info.distributed:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def any_process(flag: bool, info: DistInfo) -> bool:
    """True on every process when ``flag`` is true on any (e.g. an interrupt on one rank)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same shuffled order of ``range(n)`` on every process for (seed, epoch)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=g)


def shard_indices(n: int, info: DistInfo, seed: int, epoch: int) -> list[int]:
    """This process's share of the epoch's shuffled indices (every ``world_size``-th one)."""
    return epoch_permutation(n, seed, epoch)[info.rank::info.world_size].tolist()
