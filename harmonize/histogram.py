"""Histogram matching to a reference set: the classical baseline every learned harmonizer must beat.

Each image's gray levels are remapped monotonically so that its histogram becomes the
reference histogram. The reference of a *set* of images is their 1-D Wasserstein barycenter,
which for distributions on a line is simply the average of their quantile functions: it needs
one small vector per image instead of pooling every pixel, and no single odd image dominates.

Matching only changes the gray-level distribution. It cannot move structure, sharpen or blur,
so what an acquisition chain does spatially (scatter, unsharp masking, noise texture) stays;
that is exactly the gap a CycleGAN is asked to close, and what the paired benchmark measures.

All functions are pure: arrays in, arrays out; images are float arrays in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

DEFAULT_LEVELS = 1024


@dataclass(frozen=True)
class HistogramReference:
    """A target distribution as its quantile function sampled at ``len(quantiles)`` levels.

    ``quantiles[k]`` is the gray value below which a fraction ``k / (n - 1)`` of the pixels lie.
    """

    quantiles: np.ndarray  # float64, non-decreasing, shape (n,)
    n_images: int

    @property
    def levels(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, len(self.quantiles))


def quantile_function(image: np.ndarray, n_levels: int = DEFAULT_LEVELS,
                      mask: np.ndarray | None = None) -> np.ndarray:
    """Quantiles of ``image``'s pixels (inside ``mask`` when given) at ``n_levels`` even levels."""
    if n_levels < 2:
        raise ValueError(f"n_levels must be >= 2, got {n_levels}")
    values = np.asarray(image, dtype=np.float64)
    values = values[np.asarray(mask, dtype=bool)] if mask is not None else values.ravel()
    if values.size == 0:
        raise ValueError("no pixels to take quantiles of (empty image or mask)")
    return np.quantile(values, np.linspace(0.0, 1.0, n_levels))


def fit_reference(images: Iterable[np.ndarray], n_levels: int = DEFAULT_LEVELS) -> HistogramReference:
    """Reference distribution of a set of images: the mean of their quantile functions."""
    total = np.zeros(n_levels, dtype=np.float64)
    n = 0
    for image in images:
        total += quantile_function(image, n_levels)
        n += 1
    if n == 0:
        raise ValueError("cannot fit a histogram reference to zero images")
    return HistogramReference(quantiles=np.maximum.accumulate(total / n), n_images=n)


def match_histogram(image: np.ndarray, reference: HistogramReference) -> np.ndarray:
    """``image`` with its gray levels remapped so that its histogram follows ``reference``.

    Each pixel's level goes to the reference quantile at that level's mid-rank in the image
    (equal inputs give equal outputs, and the order of gray levels is kept). Returns float32 of
    the same shape, in the reference's range.
    """
    x = np.asarray(image, dtype=np.float64)
    if x.size == 0:
        raise ValueError("cannot match the histogram of an empty image")
    values, inverse, counts = np.unique(x.ravel(), return_inverse=True, return_counts=True)
    # Mid-rank CDF: a level occupying ranks [c0, c1) sits at (c0 + c1) / 2 / N, so a constant
    # image maps to the reference median rather than to its top end.
    upper = np.cumsum(counts)
    cdf = (upper - counts / 2.0) / x.size
    mapped = np.interp(cdf, reference.levels, reference.quantiles)
    return mapped[inverse].reshape(x.shape).astype(np.float32)


def match_batch(images: np.ndarray, reference: HistogramReference) -> np.ndarray:
    """:func:`match_histogram` over the first axis of an (N, ...) array."""
    return np.stack([match_histogram(im, reference) for im in images]) if len(images) else \
        np.asarray(images, dtype=np.float32)
