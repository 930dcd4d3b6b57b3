"""Exact batch-norm statistics for the current weights: one pass, cumulative averaging.

The running averages lag the weights while they still move fast (a few hundred steps on a
few hundred images), and evaluation then normalizes with stale statistics: the network
scores well in training mode and near chance in evaluation mode. One pass over the training
images with the final weights (``momentum=None``: a plain mean over the pass) makes the two
modes agree. Used by the classifier trainer before every validation and by the phantom's
fitness proof.
"""

from __future__ import annotations

import torch
from torch import nn


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int,
                          device: torch.device | str | None = None, meta: torch.Tensor | None = None) -> None:
    """Set every batch-norm layer's running statistics to their exact mean over ``images``.

    ``meta`` (aligned with ``images``) is passed as the model's second input when given; the
    model's train/eval mode is restored afterwards.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass
    model.train()
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size].to(device).float()
            model(x, meta[s:s + batch_size].to(device)) if meta is not None else model(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)
