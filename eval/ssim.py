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
    [-1, 1]), each the inputs' shape. Always fp32: the local variances are differences of nearly
    equal window means (E[x²] − E[x]²), which bf16 autocast (8-bit mantissa) would turn into noise.
    """
    from kornia.filters import filter2d_separable, get_gaussian_kernel1d

    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        k = get_gaussian_kernel1d(SSIM_WINDOW, SSIM_SIGMA, device=x.device, dtype=x.dtype)

        def blur(t: torch.Tensor) -> torch.Tensor:
            return filter2d_separable(t, k, k, border_type="reflect")

        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cxy = blur(x * y) - mx * my
        c1, c2 = (K1 * value_range) ** 2, (K2 * value_range) ** 2
        lum = (2.0 * mx * my + c1) / (mx * mx + my * my + c1)
        cs = (2.0 * cxy + c2) / (vx + vy + c2)
    return lum, cs
