"""Confidence intervals: patient-level bootstrap within a test set, Student t across seeds.

Images of one patient are not independent (NIH follow-ups, Montgomery repeat scans): a
bootstrap that resamples images treats a patient's five near-identical films as five
independent observations and reports an interval that is too narrow. :func:`patient_bootstrap`
resamples *patients* with replacement and takes all of a drawn patient's images along (twice
if the patient is drawn twice), so the interval reflects how many patients were tested.

Across training seeds the run-to-run spread is summarised by :func:`mean_ci` (mean ± Student
t interval): seeds are few, so a normal quantile would be too narrow.
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Sequence

import numpy as np
from scipy import stats

from cxr.data.tasks import Task
from cxr.metrics.classification import COUNT_KEYS, task_metrics

Interval = tuple[float, float]
NAN_INTERVAL: Interval = (math.nan, math.nan)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level {level} is not between 0 and 1")


def patient_groups(patient_ids: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, counts)``: image indices sorted by patient, and each patient's slice.

    Patient ``k`` (in sorted id order) owns ``order[starts[k] : starts[k] + counts[k]]``.
    """
    ids = np.asarray(patient_ids)
    if not ids.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        # natural order for numbers: with ids 0..n-1, patient k is image k, so the bootstrap
        # reproduces a plain image bootstrap drawn with the same seed
        _, inverse = np.unique(ids, return_inverse=True)
    except TypeError:  # mixed types (e.g. str and None) do not sort; their text does
        _, inverse = np.unique(np.asarray([str(p) for p in patient_ids]), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.cumsum(counts) - counts
    return order, starts, counts


def _gather(order: np.ndarray, starts: np.ndarray, counts: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Image indices of the drawn patients, concatenated (a patient drawn twice appears twice)."""
    c = counts[drawn]
    ends = np.cumsum(c)
    # position within the concatenation minus where its block starts, plus the patient's start
    offsets = np.arange(ends[-1]) - np.repeat(ends - c, c)
    return order[np.repeat(starts[drawn], c) + offsets]


def _percentile_interval(values: np.ndarray, level: float, min_count: int) -> Interval:
    finite = values[np.isfinite(values)]
    if finite.size < max(min_count, 1):
        return NAN_INTERVAL
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def patient_bootstrap(fn: Callable[[np.ndarray], dict[str, float]], n: int, patient_ids: Sequence,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                      min_finite: float = 0.5) -> dict[str, Interval]:
    """Percentile bootstrap intervals of every metric ``fn`` returns, resampling patients.

    ``fn(indices)`` computes the metrics on the images at ``indices`` (an int array into the
    ``n`` images; repeats allowed). Each replicate draws as many patients as there are, with
    replacement. Replicates where a metric is NaN (e.g. a resample without positives has no
    AUROC) are left out of that metric's interval; when fewer than ``min_finite`` × ``n_boot``
    replicates are finite the interval is ``(nan, nan)``: it would describe only the resamples
    that happened to be defined. With one image per patient this is the ordinary image bootstrap.
    """
    _check_level(level)
    samples = patient_bootstrap_samples(fn, n, patient_ids, n_boot, seed)
    min_count = math.ceil(min_finite * n_boot)
    return {key: _percentile_interval(v, level, min_count) for key, v in samples.items()}


def patient_bootstrap_samples(fn: Callable[[np.ndarray], dict[str, float]], n: int, patient_ids: Sequence,
                              n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """The ``n_boot`` replicate values of every metric (NaN where undefined), as
    :func:`patient_bootstrap` draws them: two sets of images with the same patient ids and
    the same seed get the same draws, so differences of their replicates are paired."""
    if n_boot < 1:
        raise ValueError(f"patient_bootstrap: n_boot must be positive, got {n_boot}")
    if len(patient_ids) != n:
        raise ValueError(f"patient_bootstrap: {len(patient_ids)} patient ids for {n} images")
    if n == 0:
        return {}
    order, starts, counts = patient_groups(patient_ids)
    n_patients = counts.size
    rng = np.random.default_rng(seed)
    samples: dict[str, np.ndarray] = {}
    for b in range(n_boot):
        # one draw per replicate (not one big matrix): the stream then matches a plain
        # per-replicate image bootstrap with the same seed
        drawn = rng.integers(0, n_patients, n_patients)
        for key, value in fn(_gather(order, starts, counts, drawn)).items():
            if key not in samples:
                samples[key] = np.full(n_boot, np.nan)
            samples[key][b] = value
    return samples


def percentile_interval(values: np.ndarray, level: float = 0.95, min_finite: float = 0.5) -> Interval:
    """Percentile interval of bootstrap replicates, ignoring NaN (``(nan, nan)`` if too few)."""
    _check_level(level)
    return _percentile_interval(np.asarray(values, dtype=np.float64), level, math.ceil(min_finite * len(values)))


def bootstrap_task_metrics(task: "Task", targets: np.ndarray, probs: np.ndarray,
                           thresholds: np.ndarray | None, patient_ids: Sequence, n_boot: int = 1000,
                           seed: int = 0, level: float = 0.95,
                           keys: Collection[str] | None = None) -> dict[str, Interval]:
    """Patient-bootstrap intervals of :func:`cxr.metrics.classification.task_metrics` at fixed thresholds.

    The thresholds stay those chosen on validation data in every replicate. ``keys`` limits
    the metrics (e.g. ``("auroc",)``) to make many-label bootstraps fast. Counts and thresholds
    get no interval.
    """
    targets, probs = np.asarray(targets), np.asarray(probs)

    def fn(idx: np.ndarray) -> dict[str, float]:
        m = task_metrics(task, targets[idx], probs[idx], thresholds, keys=keys)
        return {k: v for k, v in m.items() if k.split("/", 1)[0] not in COUNT_KEYS and k != "auroc_labels"}

    return patient_bootstrap(fn, len(targets), patient_ids, n_boot=n_boot, seed=seed, level=level)


def paired_difference_ci(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray,
                         score_a: np.ndarray, score_b: np.ndarray, patient_ids: Sequence,
                         n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """``metric(y, a) − metric(y, b)`` on the same images, with a paired patient-bootstrap interval.

    Both models are scored on the same resampled patients in each replicate, so the interval
    is about the difference between them, not about which patients were drawn (much narrower
    than combining two separate intervals when the models agree on the hard cases).
    """
    y, a, b = np.asarray(y), np.asarray(score_a), np.asarray(score_b)
    if not len(y) == len(a) == len(b):
        raise ValueError(f"paired_difference_ci: {len(y)} targets, {len(a)} and {len(b)} scores")
    diff = metric(y, a) - metric(y, b)
    ci = patient_bootstrap(lambda i: {"diff": metric(y[i], a[i]) - metric(y[i], b[i])}, len(y), patient_ids,
                           n_boot=n_boot, seed=seed, level=level)
    lo, hi = ci.get("diff", NAN_INTERVAL)
    return float(diff), lo, hi


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval ``mean ± t_{(1+level)/2, n−1} · sd / √n`` over seeds.

    NaN values (a seed whose metric was undefined) are left out; the bounds are NaN with fewer
    than two values, the mean too with none.
    """
    _check_level(level)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1.0 + level) / 2.0, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half
