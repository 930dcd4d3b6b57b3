"""Exponential moving averages of a network's weights, for generators (CycleGAN, StyleGAN2).

A GAN generator's weights wander from step to step as the adversarial game pushes them; the
average of the last ~1/(1 − decay) steps is a smoother, usually better generator (Karras et al.
2018; every StyleGAN release samples from it). The averaging itself is PyTorch's
:class:`torch.optim.swa_utils.AveragedModel` with its EMA rule; this module only adds what a
resumable trainer needs: the copy's weights checkpoint as an ordinary module (same keys as the
network, so ``cxr translate`` builds and loads it like the raw one) and the update count goes
into the checkpoint's plain state. StyleGAN-style trainers pass a per-step decay,
:func:`ema_beta`, a half-life in images with a ramp-up.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["WeightAverage", "EMA_SUFFIX", "ema_beta", "ema_name"]

EMA_SUFFIX = "_ema"


def ema_beta(batch_size: int, ema_kimg: float, ema_rampup: float | None, cur_nimg: int) -> float:
    """The decay that halves a weight's pull every ``ema_kimg`` thousand images (Karras et al. 2020).

    ``β = 0.5^(batch_size / h)`` with ``h = 1000·ema_kimg`` images; with a ramp-up
    ``h = min(h, ema_rampup·cur_nimg)``, so early in training, when ``cur_nimg`` images have
    been shown, the average forgets its random start quickly (β = 0 at ``cur_nimg = 0``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if ema_kimg <= 0:
        raise ValueError(f"ema_kimg must be > 0, got {ema_kimg}")
    half_life = ema_kimg * 1000
    if ema_rampup is not None:
        half_life = min(half_life, cur_nimg * ema_rampup)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


def ema_name(module_name: str) -> str:
    """The checkpoint name of ``module_name``'s average (``G_ab`` → ``G_ab_ema``)."""
    return module_name + EMA_SUFFIX


class WeightAverage:
    """An EMA copy of ``module``: ``update()`` after each optimizer step, ``module`` to use it.

    The first update copies the weights (no bias toward the initialization); later ones move
    each weight ``1 − decay`` of the way to the network's. Buffers are averaged too.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._avg = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self._avg.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged network (same class and state-dict keys as the source)."""
        return self._avg.module

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float | None = None) -> None:
        """Move the average toward ``module``; ``decay`` overrides the fixed one for this step
        (e.g. :func:`ema_beta`, which changes during a ramp-up; 0 copies the weights)."""
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if decay is None or int(self._avg.n_averaged.item()) == 0:
            self._avg.update_parameters(module)
            return
        for avg, src in zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                            itertools.chain(module.parameters(), module.buffers()), strict=True):
            src = src.detach().to(avg.device)
            if avg.is_floating_point():
                avg.lerp_(src, 1.0 - decay)
            else:
                avg.copy_(src)
        self._avg.n_averaged += 1

    def state(self) -> dict[str, Any]:
        """What a checkpoint's plain state holds besides the weights."""
        return {"decay": self.decay, "updates": int(self._avg.n_averaged.item())}

    def load_state(self, state: dict[str, Any]) -> None:
        self._avg.n_averaged.fill_(int(state["updates"]))
