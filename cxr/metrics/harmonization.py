"""Pure maths of the harmonization audit: did harmonizing erase disease, invent it, or flip a
classifier's decision? (``cxr evaluate harmonization``, :mod:`eval.harmonization`.)

* **Texture features** (:func:`highpass_features`): the histogram of an image's Laplacian, the
  fine-scale residual a gray-level curve leaves untouched (noise grain, edge enhancement). A
  site detector on these tells sites apart by texture when their histograms already agree.
* **Lesion contrast** (:func:`lesion_contrast`): ``C = (mean(lesion) − mean(ring)) / sd(lung)``,
  the lesion's mean minus that of a ring of surrounding lung, in units of the lung field's
  spread, so a global change of window or gamma (which scales both) leaves it roughly alone
  while a harmonizer that smooths the lesion into its surroundings drives it to 0. A lesion
  visible in the source (``|C_src| ≥ visible``) counts as **erased** when its contrast kept
  ``C_harm / C_src`` falls below ``1 − fall`` (by default, by more than half).
* **Hallucinations** (:func:`residual_blobs`): the difference ``harmonized − source`` less what
  a global gray-level curve explains (:func:`pointwise_residual`) and less its smooth part (a
  difference of Gaussians, σ small and large: a shading or a haze changes it slowly and is
  removed), thresholded at both an absolute level and
  a multiple of its robust spread inside the lung fields, away from the true lesions; connected
  regions at least ``min_area`` pixels are lesion-like changes the harmonizer created.
* **Decision changes** (:func:`prediction_changes`): a fixed classifier's decisions at its
  validation threshold on the source and the harmonized image of each patient: agreement,
  flip rate (both directions and each apart) and mean ``|Δp|``.
* **Recovered drop** (:func:`drop_recovered`): ``(AUROC_harm − AUROC_as_is) / (AUROC_in − AUROC_as_is)``,
  the share of the cross-site AUROC drop a harmonizer wins back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from cxr.metrics.intervals import NAN_INTERVAL, Interval, patient_bootstrap

LAPLACIAN_RANGE = 0.15  # |Laplacian| of a [0, 1] image above this lands in the end bins
VISIBLE_CONTRAST = 0.2  # |C_src| below this: the lesion is not visible in the source, not scored
ERASE_FALL = 0.5  # contrast falling by more than this share counts as erased
RING_PX = 4.0  # ring width at 128 px (scaled with the image's long side)


def highpass_features(images: Sequence[np.ndarray], bins: int = 32, limit: float = LAPLACIAN_RANGE) -> np.ndarray:
    """(N, bins + 1) features of [0, 1] images: the normalized histogram of each image's
    Laplacian over ``[-limit, limit]`` (values beyond go to the end bins) and its log-spread."""
    edges = np.linspace(-limit, limit, bins + 1)
    out = np.zeros((len(images), bins + 1), dtype=np.float64)
    for i, img in enumerate(images):
        lap = ndi.laplace(np.asarray(img, dtype=np.float32))
        out[i, :bins] = np.histogram(np.clip(lap, -limit, limit), bins=edges)[0] / lap.size
        out[i, bins] = math.log(float(lap.std()) + 1e-6)
    return out


def scale_of(shape: tuple[int, ...]) -> float:
    """Pixel lengths are given at a 128-pixel long side; this is the factor for ``shape``."""
    return max(shape[-2:]) / 128.0


def ring_mask(lesion: np.ndarray, lung: np.ndarray | None, width: float = RING_PX) -> np.ndarray:
    """Pixels within ``width`` (at 128 px, scaled) of the lesion, outside it and inside the lung
    (the whole surround when fewer than 8 of its pixels are in the lung)."""
    lesion = np.asarray(lesion, dtype=bool)
    grown = ndi.binary_dilation(lesion, iterations=max(1, round(width * scale_of(lesion.shape))))
    ring = grown & ~lesion
    if lung is not None and int((ring & lung).sum()) >= 8:
        ring &= lung
    return ring


def lesion_contrast(image: np.ndarray, lesion: np.ndarray, lung: np.ndarray | None,
                    width: float = RING_PX) -> float:
    """``(mean(lesion) − mean(ring)) / sd(lung field)`` (NaN when the lesion or ring is empty
    or the lung field flat); the lung field is the whole image when ``lung`` is None."""
    image = np.asarray(image, dtype=np.float64)
    lesion = np.asarray(lesion, dtype=bool)
    ring = ring_mask(lesion, lung, width)
    field = image[lung] if lung is not None and lung.any() else image.ravel()
    sd = float(field.std())
    if not lesion.any() or not ring.any() or sd <= 1e-9:
        return math.nan
    return float((image[lesion].mean() - image[ring].mean()) / sd)


def contrast_kept(c_source: np.ndarray, c_harmonized: np.ndarray, visible: float = VISIBLE_CONTRAST
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(visible, kept): which lesions are visible in the source, and ``C_harm / C_src`` (NaN
    where not visible)."""
    cs, ch = np.asarray(c_source, dtype=np.float64), np.asarray(c_harmonized, dtype=np.float64)
    vis = np.isfinite(cs) & np.isfinite(ch) & (np.abs(cs) >= visible)
    kept = np.full(cs.shape, np.nan)
    kept[vis] = ch[vis] / cs[vis]
    return vis, kept


def erased(c_source: np.ndarray, c_harmonized: np.ndarray, visible: float = VISIBLE_CONTRAST,
           fall: float = ERASE_FALL) -> np.ndarray:
    """Per lesion: 1.0 erased (visible, contrast kept below ``1 − fall``), 0.0 kept, NaN not visible."""
    vis, kept = contrast_kept(c_source, c_harmonized, visible)
    out = np.full(vis.shape, np.nan)
    out[vis] = (kept[vis] < 1.0 - fall).astype(np.float64)
    return out


@dataclass(frozen=True)
class BlobSettings:
    """How a change becomes a hallucination (lengths in pixels at a 128-pixel long side)."""

    sigma_small: float = 1.0  # the detail kept (finer is noise)
    sigma_large: float = 6.0  # the smooth part removed (global curves, shading, haze)
    level: float = 0.04  # absolute threshold on the band-passed difference, in [0, 1] gray levels
    k_sigma: float = 5.0  # and this many robust standard deviations of it inside the lungs
    min_area: float = 6.0  # pixels (at 128 px; scaled by the square of the size factor)
    lesion_margin: float = 3.0  # true lesions grown by this before they are excluded


def pointwise_residual(source: np.ndarray, harmonized: np.ndarray, levels: int = 1024) -> np.ndarray:
    """``harmonized − g(source)``, ``g`` the best pointwise gray-level map (the mean harmonized
    value of each source gray level): what no global curve explains. Zero for any harmonizer that
    only remaps gray levels (histogram matching, windowing), so its changed contrast at the edges of
    bright structures is never taken for a new lesion."""
    idx = np.clip(np.rint(np.asarray(source, np.float64) * (levels - 1)), 0, levels - 1).astype(np.int64).ravel()
    h = np.asarray(harmonized, np.float64).ravel()
    count = np.bincount(idx, minlength=levels)
    g = np.bincount(idx, weights=h, minlength=levels) / np.maximum(count, 1)
    return (h - g[idx]).reshape(np.shape(harmonized)).astype(np.float32)


def band_pass(diff: np.ndarray, settings: BlobSettings = BlobSettings()) -> np.ndarray:
    """The difference of Gaussians of ``diff`` (σ small minus σ large, scaled to its size)."""
    s = scale_of(diff.shape)
    d = np.asarray(diff, dtype=np.float32)
    return ndi.gaussian_filter(d, settings.sigma_small * s) - ndi.gaussian_filter(d, settings.sigma_large * s)


def residual_blobs(source: np.ndarray, harmonized: np.ndarray, lung: np.ndarray | None,
                   lesions: np.ndarray | None = None, settings: BlobSettings = BlobSettings()) -> list[dict]:
    """Lesion-like regions ``harmonized`` has and ``source`` has not, or the reverse: connected
    regions of the band-passed :func:`pointwise_residual` beyond both thresholds, inside ``lung`` (the whole
    image when None), away from the true ``lesions``; each as ``{area, peak, y, x}`` (peak signed:
    > 0 brighter)."""
    source, harmonized = np.asarray(source, np.float32), np.asarray(harmonized, np.float32)
    if source.shape != harmonized.shape:
        raise ValueError(f"shapes differ: {source.shape} vs {harmonized.shape}")
    s = scale_of(source.shape)
    band = band_pass(pointwise_residual(source, harmonized), settings)
    field = np.ones(band.shape, bool) if lung is None else np.asarray(lung, bool)
    if lesions is not None and np.any(lesions):
        field = field & ~ndi.binary_dilation(np.asarray(lesions, bool),
                                             iterations=max(1, round(settings.lesion_margin * s)))
    if not field.any():
        return []
    values = band[field]
    robust = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    thr = max(settings.level, settings.k_sigma * robust)
    out = []
    for sign in (1.0, -1.0):
        hot = (sign * band > thr) & field
        labels, n = ndi.label(hot)
        if not n:
            continue
        areas = ndi.sum(hot, labels, index=np.arange(1, n + 1))
        for k, area in enumerate(areas, start=1):
            if area >= settings.min_area * s * s:
                ys, xs = np.nonzero(labels == k)
                out.append({"area": int(area), "peak": float(sign * np.abs(band[ys, xs]).max()),
                            "y": float(ys.mean()), "x": float(xs.mean())})
    return out


def prediction_changes(p_source: np.ndarray, p_harmonized: np.ndarray, threshold: float) -> dict[str, float]:
    """Decisions ``p ≥ threshold`` before and after: ``agreement``, ``flip_rate`` (= 1 − agreement),
    ``flip_pos_to_neg`` and ``flip_neg_to_pos`` (shares of all images), ``mean_abs_dp``."""
    a, b = np.asarray(p_source, np.float64), np.asarray(p_harmonized, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"prediction_changes: shapes {a.shape} and {b.shape}")
    if not a.size:
        return {k: math.nan for k in ("agreement", "flip_rate", "flip_pos_to_neg", "flip_neg_to_pos", "mean_abs_dp")}
    da, db = a >= threshold, b >= threshold
    return {"agreement": float(np.mean(da == db)), "flip_rate": float(np.mean(da != db)),
            "flip_pos_to_neg": float(np.mean(da & ~db)), "flip_neg_to_pos": float(np.mean(~da & db)),
            "mean_abs_dp": float(np.mean(np.abs(a - b)))}


def prediction_changes_ci(p_source: np.ndarray, p_harmonized: np.ndarray, threshold: float,
                          patient_ids: Sequence, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """:func:`prediction_changes` with 95 % patient-bootstrap intervals (``<key>_lo``, ``<key>_hi``)."""
    a, b = np.asarray(p_source, np.float64), np.asarray(p_harmonized, np.float64)
    out = prediction_changes(a, b, threshold)
    ci = patient_bootstrap(lambda i: prediction_changes(a[i], b[i], threshold), len(a), patient_ids,
                           n_boot, seed) if len(a) else {}
    for key in list(out):
        out[f"{key}_lo"], out[f"{key}_hi"] = ci.get(key, NAN_INTERVAL)
    return out


def mean_ci(values: np.ndarray, patient_ids: Sequence, n_boot: int = 1000, seed: int = 0) -> tuple[float, Interval]:
    """Mean of per-item ``values`` (NaN left out) with a 95 % patient-bootstrap interval."""
    v = np.asarray(values, np.float64)
    keep = np.isfinite(v)
    v, ids = v[keep], [p for p, k in zip(patient_ids, keep) if k]
    if not v.size:
        return math.nan, NAN_INTERVAL
    ci = patient_bootstrap(lambda i: {"m": float(v[i].mean())}, len(v), ids, n_boot, seed)
    return float(v.mean()), ci["m"]


def drop_recovered(in_domain: float, as_is: float, harmonized: float) -> float:
    """Share of the cross-site drop won back: ``(harmonized − as_is) / (in_domain − as_is)``
    (NaN when there is no drop)."""
    drop = in_domain - as_is
    return float((harmonized - as_is) / drop) if drop > 1e-12 else math.nan
