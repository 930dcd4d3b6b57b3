"""Histogram matching to a reference set: the classical baseline every learned harmonizer must beat.

Each image's gray levels are remapped monotonically so that its histogram becomes the
reference histogram. The reference of a *set* of images is their 1-D Wasserstein barycenter,
which for distributions on a line is simply the average of their quantile functions: it needs
one small vector per image instead of pooling every pixel, and no single odd image dominates.

``field`` < 1 takes both distributions from the central ``field`` of each side only (the
remapping still applies to every pixel). Radiographs are framed differently from site to site
and image to image (collimation blades, markers, how much of the arms and the air beside the
body is in view), and a whole-image histogram counts all of it: an image with much air beside
the body is matched darker than one framed tight. The centre holds the chest in nearly every
frame, so its distribution is the one worth matching.

Matching only changes the gray-level distribution. It cannot move structure, sharpen or blur,
so what an acquisition chain does spatially (scatter, unsharp masking, noise texture) stays;
that is exactly the gap a CycleGAN is asked to close, and what the paired benchmark measures.

All functions are pure: arrays in, arrays out; images are float arrays in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from cxr.data.preprocess import centre_mask

DEFAULT_LEVELS = 1024
# The central field the paired proof uses (`cxr demo`, `experiments/paired_proof.py`): chosen
# on the 128² phantom's validation split (0.6-1.0 swept; the training split picks it too).
# Real data has no paired truth to choose by, so ``cxr harmonize`` keeps 1.0 (whole image).
CENTRAL_FIELD = 0.85


@dataclass(frozen=True)
class HistogramReference:
    """A target distribution as its quantile function sampled at ``len(quantiles)`` levels.

    ``quantiles[k]`` is the gray value below which a fraction ``k / (n - 1)`` of the pixels lie.
    """

    quantiles: np.ndarray  # float64, non-decreasing, shape (n,)
    n_images: int
    field: float = 1.0  # central fraction of each side the distributions are taken from

    def __post_init__(self) -> None:
        check_field(self.field)

    @property
    def levels(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, len(self.quantiles))


def check_field(field: float) -> None:
    if not 0.0 < field <= 1.0:
        raise ValueError(f"histogram field must be in (0, 1], got {field}")


def _field_pixels(image: np.ndarray, field: float) -> np.ndarray | None:
    """The central-field mask of a 2-D image (None: the whole image)."""
    return None if field >= 1.0 or image.ndim != 2 else centre_mask(image.shape, field)


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


def fit_reference(images: Iterable[np.ndarray], n_levels: int = DEFAULT_LEVELS,
                  field: float = 1.0) -> HistogramReference:
    """Reference distribution of a set of images: the mean of their quantile functions (each
    taken over the image's central ``field`` of each side)."""
    check_field(field)
    total = np.zeros(n_levels, dtype=np.float64)
    n = 0
    for image in images:
        image = np.asarray(image)
        total += quantile_function(image, n_levels, _field_pixels(image, field))
        n += 1
    if n == 0:
        raise ValueError("cannot fit a histogram reference to zero images")
    return HistogramReference(quantiles=np.maximum.accumulate(total / n), n_images=n, field=field)


def match_histogram(image: np.ndarray, reference: HistogramReference,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """``image`` with its gray levels remapped so that its histogram follows ``reference``.

    Each pixel's level goes to the reference quantile at that level's mid-rank in the image
    (equal inputs give equal outputs, and the order of gray levels is kept). With a reference
    of ``field`` < 1 the ranks are counted among the image's central-field pixels; with a
    ``mask`` (e.g. the lung fields) among the pixels inside it. Returns float32 of the same
    shape, in the reference's range.
    """
    x = np.asarray(image, dtype=np.float64)
    if x.size == 0:
        raise ValueError("cannot match the histogram of an empty image")
    region = np.asarray(mask, dtype=bool) if mask is not None else _field_pixels(x, reference.field)
    if region is not None:
        inside = np.sort(x[region])
        # Mid-rank among the central pixels; levels outside the centre's range clamp to its ends.
        cdf = (np.searchsorted(inside, x, "left") + np.searchsorted(inside, x, "right")) / (2.0 * inside.size)
        return np.interp(cdf, reference.levels, reference.quantiles).astype(np.float32)
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
