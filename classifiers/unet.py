"""A U-Net for lung segmentation: one gray channel in, one logit map per lung out.

``depth`` poolings, each level two 3×3 conv → BatchNorm → ReLU blocks; the channels double at
every level from ``width``; the decoder upsamples by transposed convolution and concatenates
the encoder's features of the same level (Ronneberger et al., MICCAI 2015). An input whose
sides are not multiples of ``2**depth`` is zero-padded and the output cropped back, so any
size works. The outputs are logits; ``sigmoid`` gives each lung's probability independently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """What rebuilds the network; stored as the checkpoint's ``model_args``."""

    depth: int = 4  # poolings
    width: int = 16  # channels of the first level
    in_channels: int = 1
    out_channels: int = 2  # image-left lung, image-right lung

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 7 or self.width < 1 or self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"model.depth must be in 1..7 and model.width >= 1, got depth {self.depth}, "
                             f"width {self.width}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig | None = None, **kwargs: Any):
        super().__init__()
        cfg = cfg or UNetConfig(**kwargs)
        self.cfg = cfg
        self.model_args = asdict(cfg)
        widths = [cfg.width * 2 ** i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList([_block(cfg.in_channels, widths[0])] +
                                  [_block(widths[i], widths[i + 1]) for i in range(cfg.depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(cfg.depth))])
        self.merge = nn.ModuleList([_block(2 * widths[i], widths[i]) for i in reversed(range(cfg.depth))])
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2 ** self.cfg.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)[..., :h, :w]


def build_unet(args: dict[str, Any]) -> UNet:
    """The network ``model_args`` describe (a checkpoint's, or a config's)."""
    return UNet(UNetConfig(**args))
