"""SSIM's two factors as maps (Wang et al. 2004), one implementation for the paired evaluation
(:func:`eval.paired.ssim_factors`) and the CycleGAN's structure loss
(:func:`gan.cyclegan.loss.contrast_structure`).

SSIM = l · cs at every pixel, with local means μ, variances σ² and covariance σxy in an 11×11
Gaussian window (σ = 1.5, reflected borders: kornia's SSIM exactly):

* luminance l = (2 μx μy + C1) / (μx² + μy² + C1): gray level;
* contrast-structure cs = (2 σxy + C2) / (σx² + σy² + C2): edges and texture, blind to gray level;

C1 = (0.01 L)², C2 = (0.03 L)², L the images' value range.
"""

from __future__ import annotations

import torch

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
K1, K2 = 0.01, 0.03


def ssim_terms(x: torch.Tensor, y: torch.Tensor, value_range: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(l, cs) maps of two (N, C, H, W) batches spanning ``value_range`` (1 for [0, 1], 2 for
    [-1, 1]), each the inputs' shape, fp32 (see :func:`contrast_structure_map`)."""
    with torch.autocast(x.device.type, enabled=False):
        mx, my, vx, vy, cxy = _moments(x, y)
        c1 = (K1 * value_range) ** 2
        lum = (2.0 * mx * my + c1) / (mx * mx + my * my + c1)
        return lum, _cs(vx, vy, cxy, value_range)


def contrast_structure_map(x: torch.Tensor, y: torch.Tensor, value_range: float = 1.0) -> torch.Tensor:
    """The cs map alone (what a training loss needs, without the luminance term's work). Always
    fp32: the local variances are differences of nearly equal window means (E[x²] − E[x]²), which
    bf16 autocast (8-bit mantissa) would turn into noise."""
    with torch.autocast(x.device.type, enabled=False):
        _, _, vx, vy, cxy = _moments(x, y)
        return _cs(vx, vy, cxy, value_range)


def _moments(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Local means, variances and covariance in SSIM's window, in fp32 (call with autocast off)."""
    from kornia.filters import filter2d_separable, get_gaussian_kernel1d

    x, y = x.float(), y.float()
    k = get_gaussian_kernel1d(SSIM_WINDOW, SSIM_SIGMA, device=x.device, dtype=x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return filter2d_separable(t, k, k, border_type="reflect")

    mx, my = blur(x), blur(y)
    return mx, my, blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my


def _cs(vx: torch.Tensor, vy: torch.Tensor, cxy: torch.Tensor, value_range: float) -> torch.Tensor:
    c2 = (K2 * value_range) ** 2
    return (2.0 * cxy + c2) / (vx + vy + c2)
