"""Learning-rate schedules as pure functions of the step (resume needs no scheduler state).

- :func:`linear_decay_lr` (GANs): constant for the first part of training, then linear decay to
  zero over the last ``decay_steps`` (default: the second half). CycleGAN's schedule (Zhu et
  al. 2017, section 4: "100 epochs at 2e-4, then linearly decay to zero over the next 100").
- :func:`warmup_cosine_lr` (classifiers): linear warmup, then cosine decay to zero;
  :func:`warmup_constant_lr` (``optim.schedule: constant``): the same warmup, then the base rate.

Each takes the base rate and the 0-based step and returns the rate for that step; the caller
sets it on its optimizers before the step.
"""

from __future__ import annotations

import math


def constant_then_linear(step: int, total_steps: int, decay_steps: int | None = None) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    1.0 for the first ``total_steps - decay_steps`` steps, then falling by ``1 / decay_steps``
    per step, so the step after the last would reach 0 and the last one trains at
    ``1 / decay_steps`` of the base rate. ``decay_steps`` defaults to half of training; 0 keeps
    the rate constant. Steps past the end stay at 0.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    decay = total_steps // 2 if decay_steps is None else decay_steps
    if not 0 <= decay <= total_steps:
        raise ValueError(f"decay_steps must be in 0..{total_steps}, got {decay}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start = total_steps - decay
    if decay == 0 or step < start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / decay)


def linear_decay_lr(base_lr: float, step: int, total_steps: int, decay_steps: int | None = None) -> float:
    """``base_lr`` times :func:`constant_then_linear`."""
    return base_lr * constant_then_linear(step, total_steps, decay_steps)


def warmup_cosine_lr(base_lr: float, step: int, total_steps: int, warmup: int = 0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``base_lr`` to 0 at ``total_steps``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant_lr(base_lr: float, step: int, warmup: int = 0) -> float:
    """Linear warmup over ``warmup`` steps (as in :func:`warmup_cosine_lr`), then ``base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr
