"""Speed habits in one place: bf16 autocast, ``torch.compile``, fused Adam, channels_last.

Each helper is a no-op where it would not help (CPU, old torch), so trainers call them
unconditionally and configs stay the same on every machine.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from cxr.errors import ConfigError

AMP_MODES = ("auto", "bf16", "off")


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bf16 in hardware: compute capability 8 (Ampere) or later, or
    a ROCm GPU. ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated
    (V100, T4), where autocast would run slower than fp32."""
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def autocast_context(device: torch.device | str, amp: str) -> ContextManager:
    """bf16 autocast on CUDA: for "auto" where the GPU has bf16 in hardware, for an explicit
    "bf16" wherever torch can run it (emulated on pre-Ampere GPUs); on CPU only for "bf16".

    bf16 keeps fp32's exponent range, so no loss scaler is needed (unlike fp16).
    """
    if amp not in AMP_MODES:
        raise ConfigError(f"config key 'train.amp': expected one of {', '.join(AMP_MODES)}, got {amp!r}")
    dev = _device(device)
    if dev.type == "cuda" and amp == "auto":
        if native_bf16(dev):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    if dev.type == "cuda" and amp == "bf16":
        with torch.cuda.device(dev):
            if not torch.cuda.is_bf16_supported(including_emulation=True):
                raise ConfigError("config key 'train.amp': bf16 is not supported by this GPU; use amp=off")
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if dev.type == "cpu" and amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def maybe_compile(model: nn.Module, enabled: bool, mode: str = "default") -> nn.Module:
    """``torch.compile(model, mode=mode)`` when asked; the checkpoint code unwraps it again when saving.

    With a CUDA-graph mode the caller marks each training step's start
    (:func:`mark_step_begin`): a graph's outputs are overwritten when it replays, so whatever a
    trainer keeps across steps (image pools, logged images) must be a copy or computed from them.
    """
    if not enabled:
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def uses_cudagraphs(enabled: bool, mode: str, device: torch.device | str) -> bool:
    """Whether a compiled model with this mode replays CUDA graphs on ``device``."""
    return enabled and mode in CUDAGRAPH_MODES and _device(device).type == "cuda"


def cudagraphs_ddp_warning(cudagraphs: bool, world_size: int) -> str | None:
    """A line for the run log when CUDA graphs run under DDP, else None.

    ``torch.compile`` splits a DDP model at its gradient buckets, and the graphed backward's
    gradients then receive DDP's all-reduce in graph-owned memory; upstream reports crashes and
    wrong results for this combination (pytorch#128218, #140395), and it has not been run here.
    Warned, not refused: it may work on the user's torch, and a single-GPU run is unaffected.
    """
    if not (cudagraphs and world_size > 1):
        return None
    return ("warning: CUDA graphs (train.compile_mode=reduce-overhead/max-autotune) under DDP are untested "
            "here and have known upstream problems; if the run fails or diverges, use "
            "train.compile_mode=default with several GPUs")


def mark_step_begin(active: bool) -> None:
    """Tell torch's CUDA-graph trees that a new training iteration starts (no-op when inactive)."""
    if active:
        torch.compiler.cudagraph_mark_step_begin()


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor (a batch's indices) on ``device`` without making the host wait.

    ``.to("cuda")`` from ordinary (pageable) memory synchronizes the stream: once per step that
    stalls the host until the GPU has finished everything queued, which throws away the overlap
    that asynchronous launches and CUDA graphs give. From pinned memory with ``non_blocking``
    the copy queues behind the step's kernels instead (torch's pinned-memory allocator keeps
    the source alive until it has run).
    """
    dev = _device(device)
    if dev.type != "cuda" or t.device == dev:
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def fused_adam_kwargs(device: torch.device | str) -> dict[str, bool]:
    """``{"fused": True}`` on CUDA (one kernel for the whole update), else ``{}``."""
    return {"fused": True} if _device(device).type == "cuda" else {}


def to_channels_last(model: nn.Module, enabled: bool) -> nn.Module:
    """Convert parameters to NHWC in place when asked (feed inputs with :func:`channels_last`)."""
    return model.to(memory_format=torch.channels_last) if enabled else model


def channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """A 4-D batch in NHWC memory format when asked."""
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.dim() == 4 else x
