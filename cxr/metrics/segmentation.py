"""Overlap and boundary scores of binary segmentation masks (pure: arrays in, floats out).

For a predicted mask ``P`` and a true mask ``T`` (bool arrays of one shape):

- Dice ``= 2|P ∩ T| / (|P| + |T|)``, IoU ``= |P ∩ T| / |P ∪ T|``; both are 1 when both masks are
  empty (nothing to find, nothing found) and 0 when exactly one is.
- HD95, the 95th-percentile Hausdorff distance: the boundary pixels of each mask (the mask minus
  its 4-neighbour erosion), the Euclidean distance (in pixels, or in ``spacing`` units) from
  every boundary pixel of one mask to the nearest boundary pixel of the other, in both
  directions, pooled; HD95 is the 95th percentile of the pooled distances (the MedPy
  convention). 0 when both masks are empty, ``inf`` when exactly one is.

:func:`lung_scores` applies them per lung to label images in the convention of
:mod:`cxr.data.masks` (0 outside, 1 image-left lung, 2 image-right lung).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

LUNGS = (("left", 1), ("right", 2))  # (name, label) in the cxr.data.masks convention


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    return p, t


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """``2|P ∩ T| / (|P| + |T|)``; 1.0 when both are empty."""
    p, t = _pair(pred, truth)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """``|P ∩ T| / |P ∪ T|``; 1.0 when both are empty."""
    p, t = _pair(pred, truth)
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels: the mask minus its erosion by the 4-neighbour cross."""
    m = np.asarray(mask, dtype=bool)
    return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1),
                                       border_value=0)


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile of the pooled boundary-to-boundary distances (module docstring)."""
    p, t = _pair(pred, truth)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.inf
    bp, bt = boundary(p), boundary(t)
    # distance of every pixel to the nearest boundary pixel of the other mask
    to_t = ndimage.distance_transform_edt(~bt, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~bp, sampling=spacing)
    pooled = np.concatenate([to_t[bp], to_p[bt]])
    return float(np.percentile(pooled, 95))


def lung_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> dict[str, float]:
    """Dice, IoU and HD95 per lung of two label images (0 outside, 1 image-left, 2 image-right):
    ``{"dice_left", "iou_left", "hd95_left", "dice_right", ...}``."""
    p, t = np.asarray(pred), np.asarray(truth)
    out: dict[str, float] = {}
    for name, label in LUNGS:
        out[f"dice_{name}"] = dice(p == label, t == label)
        out[f"iou_{name}"] = iou(p == label, t == label)
        out[f"hd95_{name}"] = hausdorff95(p == label, t == label, spacing)
    return out


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over images (an ``inf`` HD95 stays ``inf``); plus ``dice`` and ``iou``,
    the means of both lungs. Empty input: an empty dict."""
    if not rows:
        return {}
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    for m in ("dice", "iou"):
        if f"{m}_left" in out and f"{m}_right" in out:
            out[m] = (out[f"{m}_left"] + out[f"{m}_right"]) / 2
    return out
