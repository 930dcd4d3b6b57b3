"""A small convolutional classifier that trains on a CPU in seconds per epoch at 128².

It exists so that questions like "is there disease signal in these images?" and "how much does
a site shift hurt?" can be answered on a laptop, before any large network is involved. Four
stride-2 stages (double 3×3 convolutions, batch norm, ReLU) take a 128² image to an 8² map
of ``8·width`` channels; global average pooling feeds one linear layer. (Adding global max
pooling, tempting for small focal lesions, made training from scratch on a few hundred
images stall for many epochs: its gradient reaches one position per map.)

The network declares its input contract as class attributes (:attr:`SmallCNN.input_size`,
:attr:`SmallCNN.input_range`, :attr:`SmallCNN.in_chans`): evaluation code builds its
preprocessing from them, and :meth:`SmallCNN.forward` rejects input that breaks them.
Outputs are logits, one per class (``num_classes=1``: a binary task's single logit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class SmallCNNConfig:
    """Everything needed to rebuild the network (stored with a checkpoint as ``model_args``)."""

    num_classes: int = 1
    width: int = 8  # channels of the first stage; stage k has width * 2**k
    dropout: float = 0.2  # before the linear head

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.width < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SmallCNNConfig: need num_classes >= 1, width >= 1 and "
                             f"0 <= dropout < 1, got {self}")


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution (strided 3×3) and refine (3×3), each followed by BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """``(N, 1, 128, 128)`` images in [0, 1] → ``(N, num_classes)`` logits."""

    input_size: ClassVar[int] = 128  # square side, pixels (pad, keep aspect: see cxr.data.preprocess)
    input_range: ClassVar[tuple[float, float]] = (0.0, 1.0)  # black 0, bone bright 1
    in_chans: ClassVar[int] = 1

    def __init__(self, config: SmallCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or SmallCNNConfig()
        w = self.config.width
        chans = [self.in_chans, w, 2 * w, 4 * w, 8 * w]
        self.features = nn.Sequential(*[_stage(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(chans[-1], self.config.num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming what is wrong when ``x`` breaks the input contract."""
        s = self.input_size
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"SmallCNN: expected input of shape (N, {self.in_chans}, {s}, {s}), "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"SmallCNN: expected a floating-point input in {self.input_range}, "
                             f"got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        lo, hi = self.input_range
        # Centre the contract's range on zero so the first convolution starts well scaled.
        f = self.features((x - (lo + hi) / 2) * (2.0 / (hi - lo)))
        return self.head(self.dropout(f.mean(dim=(2, 3))))
