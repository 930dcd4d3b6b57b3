"""PatchGAN discriminator (Isola et al. 2017): a real/fake score per overlapping image patch.

C64 (no norm) → C128 → C256 → C512 (stride 1) → 1-channel map, 4×4 kernels, LeakyReLU 0.2.
With ``n_layers=3`` each output pixel sees a 70×70 input patch, which judges texture and
local contrast (what a site's acquisition chain changes) without modelling whole anatomy.
The output is raw logits/scores; the loss decides what they mean (:mod:`gan.losses`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gan.networks.layers import NORMS, activation_after_norm, assert_shape, conv_bias, init_weights, norm_layer
from gan.networks.registry import register_discriminator

KERNEL = 4


@dataclass(frozen=True)
class PatchGANConfig:
    in_channels: int = 1
    ndf: int = 64
    n_layers: int = 3  # 3 → 70×70 receptive field
    norm: str = "instance"

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.ndf < 1 or self.n_layers < 1:
            raise ValueError("in_channels, ndf and n_layers must be >= 1")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


def receptive_field(n_layers: int) -> int:
    """Input patch side seen by one output pixel: n_layers stride-2 convs, then two stride-1 ones."""
    rf = 1
    for stride in reversed([2] * n_layers + [1, 1]):
        rf = (rf - 1) * stride + KERNEL
    return rf


def output_size(size: int, n_layers: int) -> int:
    """Side of the score map for an input of side ``size`` (padding 1, kernel 4)."""
    for stride in [2] * n_layers + [1, 1]:
        size = (size + 2 - KERNEL) // stride + 1
    return size


@register_discriminator("patchgan", PatchGANConfig)
class PatchGANDiscriminator(nn.Module):
    """(N, in_channels, H, W) → (N, 1, h, w) patch scores."""

    def __init__(self, config: PatchGANConfig):
        super().__init__()
        self.config = cfg = config
        bias = conv_bias(cfg.norm)
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.ndf, KERNEL, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        ch = cfg.ndf
        for n in range(1, cfg.n_layers + 1):
            out = cfg.ndf * min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1
            layers += [nn.Conv2d(ch, out, KERNEL, stride=stride, padding=1, bias=bias), norm_layer(cfg.norm, out),
                       activation_after_norm(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, KERNEL, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert_shape(x, (None, self.config.in_channels, None, None))
        h, w = x.shape[-2:]
        if min(output_size(h, self.config.n_layers), output_size(w, self.config.n_layers)) < 1:
            raise ValueError(f"a {self.config.n_layers}-layer PatchGAN needs a larger input than {h}x{w} "
                             "(use fewer layers or a larger image size)")
        return self.net(x)
