"""ResNet generator (Johnson et al. 2016), the CycleGAN default for 256² images.

c7s1-64 → d128 → d256 → n × R256 → u128 → u64 → c7s1-C, then tanh; reflection padding keeps
borders free of the zero-padding artefacts a translator would otherwise learn to paint. Six
blocks suit 128², nine suit 256² and up (Zhu et al. 2017, appendix 7.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gan.networks.layers import (
    NORMS,
    activation_after_norm,
    assert_shape,
    check_divisible,
    conv_bias,
    init_weights,
    norm_layer,
    residual_output,
    zero_init,
)
from gan.networks.registry import register_generator
from gan.networks.winograd import WINOGRAD_MODES, WinogradConv2d

DOWNSAMPLINGS = 2


@dataclass(frozen=True)
class ResnetGeneratorConfig:
    """Everything that fixes a ResNet generator's weights' shapes and behaviour."""

    in_channels: int = 1
    out_channels: int = 1
    ngf: int = 64  # filters of the first layer
    n_blocks: int = 9
    norm: str = "instance"
    dropout: float = 0.0  # inside residual blocks (CycleGAN: off)
    padding: str = "reflect"  # "reflect", "replicate" or "zeros"
    residual: bool = False  # output = input + learned change, identity at initialisation
    winograd: str = "auto"  # residual blocks' 3×3 convs by Winograd F(4, 3): auto (CPU, where it pays), on, off

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1 or self.ngf < 1 or self.n_blocks < 0:
            raise ValueError("in_channels, out_channels and ngf must be >= 1, n_blocks >= 0")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.padding not in ("reflect", "replicate", "zeros"):
            raise ValueError(f"padding must be reflect, replicate or zeros, got {self.padding!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.winograd not in WINOGRAD_MODES:
            raise ValueError(f"winograd must be one of {WINOGRAD_MODES}, got {self.winograd!r}")
        if self.residual and self.in_channels != self.out_channels:
            raise ValueError("a residual generator needs in_channels == out_channels")


def _pad_conv(c_in: int, c_out: int, k: int, cfg: ResnetGeneratorConfig) -> nn.Conv2d:
    """A stride-1 'same' convolution with the configured padding mode."""
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, padding_mode=cfg.padding, bias=conv_bias(cfg.norm))


def _block_conv(channels: int, cfg: ResnetGeneratorConfig) -> nn.Conv2d:
    """A residual block's 3×3 convolution: ``nn.Conv2d``'s weights, Winograd's arithmetic where it pays."""
    return WinogradConv2d(channels, channels, padding_mode=cfg.padding, bias=conv_bias(cfg.norm),
                          winograd=cfg.winograd)


class ResnetBlock(nn.Module):
    """x + conv-norm-relu-conv-norm(x): the translator only learns a residual per block."""

    def __init__(self, channels: int, cfg: ResnetGeneratorConfig):
        super().__init__()
        layers: list[nn.Module] = [_block_conv(channels, cfg), norm_layer(cfg.norm, channels), activation_after_norm()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        layers += [_block_conv(channels, cfg), norm_layer(cfg.norm, channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@register_generator("resnet9", ResnetGeneratorConfig, {"n_blocks": 9})
@register_generator("resnet6", ResnetGeneratorConfig, {"n_blocks": 6})
class ResnetGenerator(nn.Module):
    """(N, in_channels, H, W) in [-1, 1] → (N, out_channels, H, W) in [-1, 1] (residual: unbounded);
    H, W multiples of 4."""

    def __init__(self, config: ResnetGeneratorConfig):
        super().__init__()
        self.config = cfg = config
        bias = conv_bias(cfg.norm)
        layers: list[nn.Module] = [_pad_conv(cfg.in_channels, cfg.ngf, 7, cfg), norm_layer(cfg.norm, cfg.ngf),
                                   activation_after_norm()]
        ch = cfg.ngf
        for _ in range(DOWNSAMPLINGS):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, bias=bias), norm_layer(cfg.norm, ch * 2),
                       activation_after_norm()]
            ch *= 2
        layers += [ResnetBlock(ch, cfg) for _ in range(cfg.n_blocks)]
        for _ in range(DOWNSAMPLINGS):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       norm_layer(cfg.norm, ch // 2), activation_after_norm()]
            ch //= 2
        last = _pad_conv(ch, cfg.out_channels, 7, cfg)
        layers += [last] if cfg.residual else [last, nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)
        if cfg.residual:
            zero_init(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert_shape(x, (None, self.config.in_channels, None, None))
        check_divisible(x, 2 ** DOWNSAMPLINGS, "the ResNet generator")
        y = self.net(x)
        if self.config.residual:
            y = residual_output(x, y)
        assert_shape(y, (x.shape[0], self.config.out_channels, x.shape[2], x.shape[3]), "output")
        return y
