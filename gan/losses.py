"""Adversarial losses: one :class:`GANLoss` with the three objectives a PatchGAN is trained with.

``D(x)`` is the discriminator's raw score map (one value per patch); every loss below is the
mean over the batch and all patches.

* ``lsgan`` (Mao et al. 2017; the CycleGAN default)::

      L_D = ½ E[(D(x) − 1)²] + ½ E[D(G(z))²]    (the ½ is applied by the caller, see below)
      L_G = E[(D(G(z)) − 1)²]

* ``vanilla`` (Goodfellow et al. 2014, non-saturating generator loss), σ = sigmoid::

      L_D = −E[log σ(D(x))] − E[log(1 − σ(D(G(z))))]
      L_G = −E[log σ(D(G(z)))]

* ``hinge`` (Lim & Ye 2017; Miyato et al. 2018)::

      L_D = E[max(0, 1 − D(x))] + E[max(0, 1 + D(G(z)))]
      L_G = −E[D(G(z))]

``loss(scores, real=True|False, for_discriminator=...)`` returns one of the terms: for the
discriminator the term for real or for fake inputs, for the generator the term that rewards
fakes scored as real (``real=True``). CycleGAN halves the discriminator's sum of the two terms
so D learns at half G's rate; that factor lives in :mod:`gan.cyclegan.loss`, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GAN_MODES = ("lsgan", "vanilla", "hinge")


class GANLoss(nn.Module):
    """One adversarial objective, chosen by ``mode`` (``lsgan``, ``vanilla`` or ``hinge``)."""

    def __init__(self, mode: str = "lsgan"):
        super().__init__()
        if mode not in GAN_MODES:
            raise ValueError(f"gan mode must be one of {GAN_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, scores: torch.Tensor, real: bool, for_discriminator: bool = True) -> torch.Tensor:
        # Losses in float32 even under bf16 autocast: the squares and logs are where precision goes.
        scores = scores.float()
        if self.mode == "lsgan":
            target = 1.0 if real else 0.0
            return F.mse_loss(scores, torch.full_like(scores, target))
        if self.mode == "vanilla":
            target = torch.ones_like(scores) if real else torch.zeros_like(scores)
            return F.binary_cross_entropy_with_logits(scores, target)
        # hinge
        if not for_discriminator:
            if not real:
                raise ValueError("the hinge generator loss is defined for real=True only")
            return -scores.mean()
        return F.relu(1.0 - scores).mean() if real else F.relu(1.0 + scores).mean()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
