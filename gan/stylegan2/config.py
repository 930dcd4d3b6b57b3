"""Dataclass configs of the StyleGAN2 generator and discriminator, and the presets that fill them.

Each network keeps its config as ``.config``; :func:`gan.stylegan2.networks.model_args` writes it
as plain JSON into a checkpoint and :func:`gan.stylegan2.networks.build_from_model_args` rebuilds
the same network from it. Feature maps per resolution follow Karras et al. (2020):
``channels(r) = min(channel_base // r, channel_max)``, so ``channel_base=256, channel_max=32``
gives a network small enough for a CPU test at any resolution.

Presets (:func:`preset`): ``stylegan2`` is the paper's config F (8 mapping layers, channel base
32768); ``auto`` is the ADA paper's rule of thumb for one GPU (2 mapping layers, half the
channels below 512², γ = 0.0002·res²/batch, EMA half-life batch·10/32 kimg); ``tiny`` is for CPU
tests and the demo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cxr.errors import ConfigError

RESOLUTIONS = tuple(2**k for k in range(5, 11))  # 32 … 1024
NOISE_MODES = ("random", "const", "none")
MODCONVS = ("grouped", "batched")
PRESETS = ("stylegan2", "auto", "tiny")


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(what)


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """Feature maps of the layers working at ``resolution`` (at least 1)."""
    return max(1, min(channel_base // resolution, channel_max))


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that fixes a StyleGAN2 generator's weights' shapes and behaviour."""

    resolution: int = 256
    img_channels: int = 1  # native one channel: chest X-rays are grey
    c_dim: int = 0  # label width: 0 unconditional, else one-hot (single label) or multi-hot
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_mult: float = 0.01  # equalized learning rate of the mapping network, scaled down
    embed_features: int = 0  # label embedding width fed beside z (0: w_dim)
    channel_base: int = 32768
    channel_max: int = 512
    w_avg_beta: float = 0.995  # decay of the tracked average w (truncation centre)
    modconv: str = "grouped"  # how modulated convolutions run (same numbers): grouped | batched

    def __post_init__(self) -> None:
        _check(self.resolution in RESOLUTIONS,
               f"generator resolution must be a power of two in 32–1024, got {self.resolution}")
        for name in ("img_channels", "z_dim", "w_dim", "channel_base", "channel_max"):
            _check(getattr(self, name) >= 1, f"generator {name} must be ≥ 1, got {getattr(self, name)}")
        _check(self.c_dim >= 0, f"generator c_dim must be ≥ 0, got {self.c_dim}")
        _check(self.mapping_layers >= 1, f"generator mapping_layers must be ≥ 1, got {self.mapping_layers}")
        _check(self.mapping_lr_mult > 0, f"generator mapping_lr_mult must be > 0, got {self.mapping_lr_mult}")
        _check(self.embed_features >= 0, f"generator embed_features must be ≥ 0, got {self.embed_features}")
        _check(0.0 <= self.w_avg_beta < 1.0, f"generator w_avg_beta must be in [0, 1), got {self.w_avg_beta}")
        _check(self.modconv in MODCONVS, f"generator modconv must be one of {MODCONVS}, got {self.modconv!r}")

    @property
    def num_ws(self) -> int:
        """Style vectors the synthesis network reads: two per resolution from 8², plus 4²'s two."""
        return 2 * int(math.log2(self.resolution)) - 2

    def channels(self, resolution: int) -> int:
        return channels_at(resolution, self.channel_base, self.channel_max)


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Everything that fixes a residual StyleGAN2 discriminator's weights' shapes and behaviour."""

    resolution: int = 256
    img_channels: int = 1
    c_dim: int = 0  # > 0: projection discriminator on the labels
    channel_base: int = 32768
    channel_max: int = 512
    mbstd_group_size: int = 4  # samples whose standard deviation one feature summarises
    mbstd_num_channels: int = 1  # standard-deviation features appended at 4²

    def __post_init__(self) -> None:
        _check(self.resolution in RESOLUTIONS,
               f"discriminator resolution must be a power of two in 32–1024, got {self.resolution}")
        for name in ("img_channels", "channel_base", "channel_max"):
            _check(getattr(self, name) >= 1, f"discriminator {name} must be ≥ 1, got {getattr(self, name)}")
        _check(self.c_dim >= 0, f"discriminator c_dim must be ≥ 0, got {self.c_dim}")
        _check(self.mbstd_group_size >= 1, f"discriminator mbstd_group_size must be ≥ 1, got {self.mbstd_group_size}")
        _check(self.mbstd_num_channels >= 0,
               f"discriminator mbstd_num_channels must be ≥ 0, got {self.mbstd_num_channels}")
        c4 = self.channels(4)
        _check(self.mbstd_num_channels == 0 or c4 % self.mbstd_num_channels == 0,
               f"discriminator mbstd_num_channels ({self.mbstd_num_channels}) must divide its 4² channels ({c4})")

    def channels(self, resolution: int) -> int:
        return channels_at(resolution, self.channel_base, self.channel_max)


@dataclass(frozen=True)
class LossConfig:
    """The regularizers' weights and intervals (:class:`gan.stylegan2.loss.StyleGAN2Loss`)."""

    r1_gamma: float = 10.0
    r1_interval: int = 16  # lazy R1: every 16 D minibatches, scaled by 16
    style_mixing_prob: float = 0.9
    pl_weight: float = 0.0  # 0 turns path-length regularization off (the `auto` config)
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2

    def __post_init__(self) -> None:
        _check(self.r1_gamma >= 0, f"loss r1_gamma must be ≥ 0, got {self.r1_gamma}")
        _check(self.r1_interval >= 1, f"loss r1_interval must be ≥ 1, got {self.r1_interval}")
        _check(0.0 <= self.style_mixing_prob <= 1.0,
               f"loss style_mixing_prob must be in [0, 1], got {self.style_mixing_prob}")
        _check(self.pl_weight >= 0, f"loss pl_weight must be ≥ 0, got {self.pl_weight}")
        _check(self.pl_interval >= 1, f"loss pl_interval must be ≥ 1, got {self.pl_interval}")
        _check(0.0 < self.pl_decay <= 1.0, f"loss pl_decay must be in (0, 1], got {self.pl_decay}")
        _check(self.pl_batch_shrink >= 1, f"loss pl_batch_shrink must be ≥ 1, got {self.pl_batch_shrink}")


def auto_gamma(resolution: int, batch_size: int) -> float:
    """The ADA paper's R1 weight heuristic: γ = 0.0002 · res² / batch (0.8192 at 256², batch 16)."""
    if resolution < 1 or batch_size < 1:
        raise ValueError(f"resolution and batch_size must be ≥ 1, got {resolution} and {batch_size}")
    return 0.0002 * resolution**2 / batch_size


def auto_ema_kimg(batch_size: int) -> float:
    """The ADA paper's EMA half-life heuristic: batch · 10 / 32 kimg (5 kimg at batch 16)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return batch_size * 10 / 32


@dataclass(frozen=True)
class Preset:
    """A named starting point: both networks' configs, the loss config and the EMA half-life."""

    generator: GeneratorConfig
    discriminator: DiscriminatorConfig
    loss: LossConfig
    ema_kimg: float
    ema_rampup: float | None
    learning_rate: float


def preset(name: str, resolution: int, batch_size: int, c_dim: int = 0) -> Preset:
    """``stylegan2`` (config F), ``auto`` (the ADA paper's one-GPU rule) or ``tiny`` (CPU tests)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown StyleGAN2 preset {name!r} (known: {', '.join(PRESETS)})")
    if name == "stylegan2":
        base, cmax, mapping, lr = 32768, 512, 8, 0.002
        loss = LossConfig(r1_gamma=10.0, pl_weight=2.0)
        ema_kimg, rampup, zw = 10.0, None, 512
    elif name == "auto":
        base, cmax, mapping = (32768 if resolution >= 512 else 16384), 512, 2
        lr = 0.002 if resolution >= 1024 else 0.0025
        loss = LossConfig(r1_gamma=auto_gamma(resolution, batch_size), pl_weight=0.0)
        ema_kimg, rampup, zw = auto_ema_kimg(batch_size), 0.05, 512
    else:
        base, cmax, mapping, lr = 256, 32, 2, 0.0025
        loss = LossConfig(r1_gamma=auto_gamma(resolution, batch_size), pl_weight=0.0)
        ema_kimg, rampup, zw = auto_ema_kimg(batch_size), 0.05, 32
    g = GeneratorConfig(resolution=resolution, c_dim=c_dim, z_dim=zw, w_dim=zw, mapping_layers=mapping,
                        channel_base=base, channel_max=cmax)
    d = DiscriminatorConfig(resolution=resolution, c_dim=c_dim, channel_base=base, channel_max=cmax,
                            mbstd_group_size=min(max(batch_size, 1), 4))
    return Preset(g, d, loss, ema_kimg, rampup, lr)
