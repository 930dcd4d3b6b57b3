"""U-Net generator (Isola et al. 2017, "U-Net-256" of pix2pix/CycleGAN).

An encoder of stride-2 4×4 convolutions down to a 1×1 bottleneck and a mirrored decoder of
transposed convolutions, with skip connections concatenating each encoder level into its
decoder level. At 256² that is 8 downsamplings (``unet256``); the depth here follows the
training size, ``num_downs = log2(size)`` (capped at 9), so 64² keeps the 1×1 bottleneck with
6 levels rather than failing. Channels: ngf·(1, 2, 4, 8, 8, …).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gan.networks.layers import (
    NORMS,
    assert_shape,
    check_divisible,
    conv_bias,
    init_weights,
    norm_layer,
    residual_output,
    zero_init,
)
from gan.networks.registry import register_generator

MAX_DOWNS = 9
UPSAMPLE = ("transpose", "bilinear")


def depth_for_size(size: int) -> int:
    """Number of downsamplings that take ``size`` to a 1×1 bottleneck (at most ``MAX_DOWNS``)."""
    if size < 2:
        raise ValueError(f"image size must be >= 2, got {size}")
    return min(MAX_DOWNS, int(math.log2(size)))


@dataclass(frozen=True)
class UnetGeneratorConfig:
    in_channels: int = 1
    out_channels: int = 1
    ngf: int = 64
    num_downs: int = 8  # 8 for 256² (bottleneck 1×1)
    norm: str = "instance"
    dropout: float = 0.0  # pix2pix uses 0.5 in the three innermost decoder levels; CycleGAN none
    residual: bool = False  # output = input + learned change, identity at initialisation
    upsample: str = "transpose"  # "transpose" (the paper's 4x4 stride-2) or "bilinear" + 3x3 conv

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1 or self.ngf < 1:
            raise ValueError("in_channels, out_channels and ngf must be >= 1")
        if not 2 <= self.num_downs <= MAX_DOWNS:
            raise ValueError(f"num_downs must be in 2..{MAX_DOWNS}, got {self.num_downs}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.residual and self.in_channels != self.out_channels:
            raise ValueError("a residual generator needs in_channels == out_channels")
        if self.upsample not in UPSAMPLE:
            raise ValueError(f"upsample must be one of {UPSAMPLE}, got {self.upsample!r}")


def up_conv(c_in: int, c_out: int, mode: str, bias: bool) -> list[nn.Module]:
    """Double the resolution: the paper's transposed convolution, or bilinear resizing then a 3×3
    convolution, which cannot leave the checkerboard a stride-2 transposed kernel leaves where
    its footprints overlap unevenly (Odena et al. 2016, "Deconvolution and checkerboard artifacts")."""
    if mode == "transpose":
        return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias)]
    return [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)]


class UnetLevel(nn.Module):
    """down → (inner level) → up, and the level's input concatenated to its output.

    The outermost level has no norm on either side and ends in tanh (none for a residual
    generator, whose output is a change added to the input); the innermost has no norm after its
    down convolution (a 1×1 map has nothing to normalize over).
    """

    def __init__(self, outer: int, inner: int, cfg: UnetGeneratorConfig, sub: nn.Module | None,
                 in_ch: int | None = None, outermost: bool = False, dropout: float = 0.0):
        super().__init__()
        self.outermost = outermost
        bias = conv_bias(cfg.norm)
        in_ch = outer if in_ch is None else in_ch
        down: list[nn.Module] = [nn.Conv2d(in_ch, inner, 4, stride=2, padding=1, bias=bias)]
        if not outermost:
            down.insert(0, nn.LeakyReLU(0.2, inplace=False))
        if sub is not None and not outermost:
            down.append(norm_layer(cfg.norm, inner))
        up_in = inner if sub is None else inner * 2
        up: list[nn.Module] = [nn.ReLU(inplace=False),
                               *up_conv(up_in, outer, cfg.upsample, True if outermost else bias)]
        if outermost:
            if not cfg.residual:  # a residual generator's output is a change, not bounded
                up.append(nn.Tanh())
        else:
            up.append(norm_layer(cfg.norm, outer))
            if dropout:
                up.append(nn.Dropout(dropout))
        self.down = nn.Sequential(*down)
        self.sub = sub if sub is not None else nn.Identity()
        self.up = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.sub(self.down(x)))
        return y if self.outermost else torch.cat([x, y], dim=1)


@register_generator("unet256", UnetGeneratorConfig, {"num_downs": 8},
                    sized=lambda size: {"num_downs": depth_for_size(size)})
class UnetGenerator(nn.Module):
    """(N, in_channels, H, W) in [-1, 1] → (N, out_channels, H, W); H, W multiples of 2^num_downs."""

    def __init__(self, config: UnetGeneratorConfig):
        super().__init__()
        self.config = cfg = config
        ngf = cfg.ngf
        widths = [ngf * min(2**i, 8) for i in range(cfg.num_downs)]  # encoder output per level
        level: nn.Module | None = None
        # Build inside out: the innermost level first, each outer level wrapping the previous one.
        for i in reversed(range(1, cfg.num_downs)):
            # As pix2pix: dropout in the (up to) three levels just outside the innermost one.
            inner_dropout = cfg.dropout if cfg.num_downs - 4 <= i < cfg.num_downs - 1 else 0.0
            level = UnetLevel(widths[i - 1], widths[i], cfg, level, dropout=inner_dropout)
        self.net = UnetLevel(cfg.out_channels, widths[0], cfg, level, in_ch=cfg.in_channels, outermost=True)
        init_weights(self)
        if cfg.residual:
            last = [m for m in self.net.up if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
            zero_init(last)  # the outermost (transposed) convolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert_shape(x, (None, self.config.in_channels, None, None))
        check_divisible(x, 2 ** self.config.num_downs, f"a U-Net with {self.config.num_downs} levels")
        y = self.net(x)
        if self.config.residual:
            y = residual_output(x, y)
        assert_shape(y, (x.shape[0], self.config.out_channels, x.shape[2], x.shape[3]), "output")
        return y
