"""Stopping a run cleanly: non-finite losses, Ctrl-C, and out-of-memory errors.

A NaN loss caught at once costs one step; caught late it has already poisoned the weights and
every checkpoint after it. Ctrl-C saves a checkpoint so the run resumes where it stopped.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Mapping

import torch

from cxr.errors import CxrError

EXIT_INTERRUPTED = 130  # the shell's convention for "ended by SIGINT"


class NonFiniteLossError(CxrError):
    """A loss became NaN or infinite; the message names the step, the loss and the last checkpoint."""


class OutOfMemory(CxrError):
    """The GPU ran out of memory; the message suggests a smaller batch size or resolution."""


def check_finite(losses: Mapping[str, torch.Tensor | float], step: int,
                 last_checkpoint: str | Path | None = None) -> None:
    """Raise :class:`NonFiniteLossError` when any loss is NaN/Inf.

    Tensor losses are checked with one device sync for the whole dict.
    """
    names = list(losses)
    if not names:
        return
    tensors = [v for v in losses.values() if isinstance(v, torch.Tensor)]
    if tensors:
        device = tensors[0].device
        all_finite = bool(torch.stack([t.detach().float().sum().to(device) for t in tensors]).isfinite().all())
    else:
        all_finite = True
    if all_finite and all(math.isfinite(float(v)) for v in losses.values() if not isinstance(v, torch.Tensor)):
        return
    bad = []
    for name in names:
        v = losses[name]
        value = float(v.detach().float().sum()) if isinstance(v, torch.Tensor) else float(v)
        if not math.isfinite(value):
            bad.append(f"{name}={value}")
    where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint saved yet"
    raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(bad)} ({where})")


class GracefulInterrupt:
    """``with GracefulInterrupt() as stop:`` — the first SIGINT (or SIGTERM) only sets
    ``stop.requested``, so the loop can finish its step, save a checkpoint and exit with
    :data:`EXIT_INTERRUPTED`; a second SIGINT interrupts at once (KeyboardInterrupt).

    Outside the main thread signal handlers cannot be installed and this is a no-op.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), quiet: bool = False):
        self.signals = signals
        self.quiet = quiet
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
                  "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def oom_message(exc: BaseException, batch_size: int, size: int | None = None) -> str:
    """One line for the user: what ran out, at which settings, and what to try instead."""
    tips = []
    if batch_size > 1:
        tips.append(f"train.batch_size={max(1, batch_size // 2)}")
    if size is not None and size > 64:
        tips.append(f"data.size={size // 2}")
    at = f"batch size {batch_size}" + (f" at {size}x{size}" if size is not None else "")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(first) > 120:
        first = first[:117] + "..."
    hint = f"try {' or '.join(tips)}" if tips else "try a smaller model or a GPU with more memory"
    return f"out of memory with {at} ({first}); {hint}, or keep train.amp=auto for bf16 on GPU"
