"""Small pieces every network here shares: normalization choice, weight init, shape checks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

NORMS = ("instance", "batch", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalization after a convolution.

    ``instance`` (the CycleGAN default) has no affine parameters and no running statistics, as
    in Ulyanov et al.: each image is normalized by its own mean and variance at train and test
    time, so a translation never depends on what else is in the batch.
    """
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def activation_after_norm(negative_slope: float = 0.0) -> nn.Module:
    """ReLU (or LeakyReLU) for after a normalization layer, deliberately not in place.

    ``nn.InstanceNorm2d`` returns a view of its batch-norm output, and an in-place op on a view
    makes autograd rebuild the base tensor in backward (CopySlices: a zero fill, strided copies
    and a clone per activation). Out of place, the values and gradients are the same, bit for
    bit, and a ResNet-9 generator's forward + backward at 256² on a CPU is about 5 % faster
    (1.35–1.42 s against 1.45–1.49 s, two threads).
    """
    return nn.LeakyReLU(negative_slope) if negative_slope else nn.ReLU()


def conv_bias(norm: str) -> bool:
    """Batch norm's shift makes a conv bias redundant; instance norm without affine does not."""
    return norm != "batch"


def init_weights(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """N(0, std) conv weights, zero biases, N(1, std) norm scales (Radford et al. 2016, CycleGAN).

    Draws from the global torch RNG unless ``generator`` is given; it never seeds anything.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std, generator=generator)
            nn.init.zeros_(m.bias)


def residual_output(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x + delta``: a generator that learns only a *change* to its input.

    With the last layer zero-initialised the generator starts as the identity, so a translator
    between two renderings of the same anatomy begins from the untranslated image instead of
    from noise, and the adversarial loss only has to push the differences. Not clamped to the
    image range: a clamp passes no gradient back from the pixels it cuts, so a region pushed
    past white stays stuck there for good (a first version froze a white blob into every
    translation that way). Out-of-range values are left for the discriminator to call fake;
    ``cxr translate`` clips its output to the image range.
    """
    return x + delta


def zero_init(layer: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias (the last layer of a residual generator: identity at start)."""
    for name in ("weight", "bias"):
        t = getattr(layer, name, None)
        if t is not None:
            nn.init.zeros_(t)
    return layer


def assert_shape(x: torch.Tensor, shape: Sequence[int | None], name: str = "input") -> None:
    """Raise ``ValueError`` unless ``x.shape`` matches ``shape`` (``None`` = any size)."""
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")


def check_divisible(x: torch.Tensor, factor: int, what: str) -> None:
    """Height and width must be multiples of ``factor`` for the down/up path to line up."""
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"{what} needs height and width divisible by {factor}, got {h}x{w}")
