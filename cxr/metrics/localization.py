"""Weak localization scores of a saliency map (Grad-CAM and kin) against boxes and masks.

Pure maths on arrays; reading trees and running networks is :mod:`eval.localization`.

A map is a float ``(H, W)`` array at the image's own size, larger = more evidence. A box is
``(x0, y0, x1, y1)`` in pixels with exclusive ends (pixel ``(i, j)`` is inside when its centre
``(j + 0.5, i + 0.5)`` is), the convention of :class:`cxr.data.record.Box` and the phantom.

- **Pointing game** (Zhang et al., ECCV 2016): a hit when the map's maximum lies inside the
  finding's region (the union of its boxes or lesion masks in the image). A map whose maximum
  is shared by several pixels (a flat or symmetric map) scores the *fraction* of those pixels
  inside the region: the expected hit of breaking the tie at random, so a two-lung null map
  gets half credit for each lung rather than always pointing at the image-left one.
- **Box IoU** (Wang et al., CVPR 2017, the ChestX-ray8 paper's T(IoU) rates): the map is
  thresholded at ``relative`` × its maximum (0.5 by default), the 8-connected component that
  holds the maximum becomes one box, and its IoU with each truth box of the finding is taken;
  the best one counts. Hit rates at IoU >= 0.1, 0.25 and 0.5, the paper's thresholds. A map
  with no positive value gives no box and IoU 0.
- **Null baseline**: :func:`null_map`, a fixed map that knows nothing of the image: a Gaussian
  centred in each lung field (``lungs``) or one at the image centre (``centre``), scored the
  same way. A saliency method earns its keep only by beating it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5)
RELATIVE_THRESHOLD = 0.5

# The fixed lung-field centres of the null map, as fractions of (width, height) of a frontal
# chest radiograph: the mean centroids of the phantom's lung masks (nlm and nih presets, 40 + 60
# images: image-left lung at (0.30, 0.36), image-right at (0.68, 0.32)), made mirror-symmetric so
# neither lung is favoured; the spread is the masks' mean standard deviation along each axis.
LUNG_CENTRES: tuple[tuple[float, float], ...] = ((0.31, 0.34), (0.69, 0.34))
LUNG_SIGMA = (0.09, 0.13)  # (x, y) spread as fractions of (width, height)
CENTRE_SIGMA = (0.2, 0.2)
NULL_MAPS = ("lungs", "centre")

Box = tuple[float, float, float, float]


def _check_map(cam: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"a saliency map must be a non-empty (H, W) array, got shape {cam.shape}")
    if not np.isfinite(cam).all():
        raise ValueError("a saliency map must be finite")
    return cam


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Boolean ``(H, W)``: pixels whose centre lies in ``[x0, x1) x [y0, y1)``."""
    h, w = shape
    x0, y0, x1, y1 = box
    xs = np.arange(w) + 0.5
    ys = np.arange(h) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def region_of(shape: tuple[int, int], boxes: Iterable[Box] = (), masks: Iterable[np.ndarray] = ()) -> np.ndarray:
    """Union of boxes and boolean masks as one ``(H, W)`` region."""
    region = np.zeros(shape, dtype=bool)
    for b in boxes:
        region |= box_mask(shape, b)
    for m in masks:
        m = np.asarray(m, dtype=bool)
        if m.shape != tuple(shape):
            raise ValueError(f"mask of shape {m.shape} for a map of shape {tuple(shape)}")
        region |= m
    return region


def peak_pixels(cam: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Boolean ``(H, W)``: every pixel within ``rtol`` (of the map's range) of the maximum."""
    cam = _check_map(cam)
    top = cam.max()
    span = top - cam.min()
    return cam >= top - rtol * span if span > 0 else np.ones(cam.shape, dtype=bool)


def pointing_score(cam: np.ndarray, region: np.ndarray) -> float:
    """Pointing game: 1.0 when the map's maximum is inside ``region``, 0.0 when outside; a
    maximum shared by several pixels scores the fraction of them inside (module docstring)."""
    region = np.asarray(region, dtype=bool)
    peaks = peak_pixels(cam)
    if region.shape != peaks.shape:
        raise ValueError(f"region of shape {region.shape} for a map of shape {peaks.shape}")
    return float((peaks & region).sum() / peaks.sum())


def threshold_map(cam: np.ndarray, relative: float = RELATIVE_THRESHOLD) -> np.ndarray:
    """Boolean ``(H, W)``: pixels at or above ``relative`` × the maximum (none if the maximum is <= 0)."""
    if not 0.0 < relative <= 1.0:
        raise ValueError(f"relative threshold must be in (0, 1], got {relative}")
    cam = _check_map(cam)
    top = cam.max()
    if top <= 0:
        return np.zeros(cam.shape, dtype=bool)
    return cam >= relative * top


def mask_box(mask: np.ndarray) -> Box | None:
    """Tight box ``(x0, y0, x1, y1)`` (exclusive ends) of a boolean mask; None when empty."""
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def cam_box(cam: np.ndarray, relative: float = RELATIVE_THRESHOLD) -> Box | None:
    """The box of the 8-connected component of :func:`threshold_map` holding the (first) maximum."""
    above = threshold_map(cam, relative)
    if not above.any():
        return None
    labels, _ = ndimage.label(above, structure=np.ones((3, 3), dtype=int))
    peak = np.unravel_index(int(np.argmax(np.asarray(cam, dtype=np.float64))), above.shape)
    return mask_box(labels == labels[peak])


def box_iou(a: Box | None, b: Box | None) -> float:
    """Intersection over union of two boxes (0 when either is missing or empty)."""
    if a is None or b is None:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def best_iou(cam: np.ndarray, truth: Sequence[Box], relative: float = RELATIVE_THRESHOLD) -> float:
    """IoU of the map's box (:func:`cam_box`) with the best-matching truth box."""
    box = cam_box(cam, relative)
    return max((box_iou(box, t) for t in truth), default=0.0)


def hit_rates(ious: Sequence[float], thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[str, float]:
    """``{"iou>=0.1": rate, ...}``: the fraction of IoUs at or above each threshold (NaN if none)."""
    x = np.asarray(ious, dtype=np.float64)
    return {f"iou>={t:g}": float((x >= t).mean()) if x.size else math.nan for t in thresholds}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a rate (``successes`` may be fractional: tie credits)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(pointing: Sequence[float], ious: Sequence[float],
              thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[str, float]:
    """One finding's scores: n, pointing rate (Wilson 95 % CI), mean IoU and the hit rates."""
    n = len(pointing)
    if len(ious) != n:
        raise ValueError(f"{n} pointing scores but {len(ious)} IoUs")
    hits = float(np.sum(pointing)) if n else 0.0
    lo, hi = wilson_interval(hits, n)
    return {"n": n, "pointing": hits / n if n else math.nan, "pointing_lo": lo, "pointing_hi": hi,
            "mean_iou": float(np.mean(ious)) if n else math.nan, **hit_rates(ious, thresholds)}


def null_map(shape: tuple[int, int], kind: str = "lungs") -> np.ndarray:
    """The fixed null-baseline map of an ``(H, W)`` image (module docstring), float32, max 1."""
    if kind not in NULL_MAPS:
        raise ValueError(f"null map must be one of {NULL_MAPS}, got {kind!r}")
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xx, yy = (xx + 0.5) / w, (yy + 0.5) / h
    if kind == "centre":
        centres, (sx, sy) = ((0.5, 0.5),), CENTRE_SIGMA
    else:
        centres, (sx, sy) = LUNG_CENTRES, LUNG_SIGMA
    out = np.zeros((h, w), dtype=np.float64)
    for cx, cy in centres:
        out = np.maximum(out, np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2)))
    return (out / out.max()).astype(np.float32)
