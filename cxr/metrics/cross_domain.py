"""Cross-domain results over training seeds: one AUROC per condition with a patient-level CI.

The study's central table trains a classifier on one site with several seeds and tests it on
held-out images of the same site and on the other site (as is, histogram-matched, translated).
Each condition's figure is the mean AUROC over the seeds; its 95 % interval resamples
*patients* of the test set and recomputes that seed mean on every replicate, so it carries
both the test-set sampling and (through the mean) the seeds; the spread over seeds is given
beside it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr.errors import DataError
from cxr.metrics.classification import auroc
from cxr.metrics.intervals import patient_bootstrap_samples, percentile_interval


@dataclass(frozen=True)
class ConditionResult:
    """One row of the cross-domain table."""

    name: str
    n_images: int
    n_patients: int
    auroc: float  # mean over seeds
    ci_low: float
    ci_high: float
    per_seed: tuple[float, ...]
    replicates: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    @property
    def seed_sd(self) -> float:
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else float("nan")


def read_predictions(path: str | Path, label: str = "Tuberculosis") -> dict[str, tuple[str, float, float]]:
    """``image → (patient_id, probability, truth)`` from a classifier's ``predictions_*.csv``."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(path, "no such predictions file") from None
    need = ("image", "patient_id", f"p_{label}", f"true_{label}")
    if rows and any(k not in rows[0] for k in need):
        raise DataError(path, f"missing column(s) {', '.join(k for k in need if k not in rows[0])}")
    out = {}
    for r in rows:
        truth = float(r[f"true_{label}"]) if r[f"true_{label}"] != "" else float("nan")
        out[r["image"]] = (r["patient_id"], float(r[f"p_{label}"]), truth)
    return out


def condition_result(name: str, truth: np.ndarray, probs_by_seed: np.ndarray, patient_ids: Sequence[str],
                     n_boot: int = 1000, seed: int = 0) -> ConditionResult:
    """Mean-over-seeds AUROC of ``probs_by_seed`` (S, N) with a patient-bootstrap 95 % interval."""
    probs_by_seed = np.atleast_2d(np.asarray(probs_by_seed, dtype=np.float64))
    truth = np.asarray(truth, dtype=np.float64)
    if probs_by_seed.shape[1] != truth.shape[0] or len(patient_ids) != truth.shape[0]:
        raise ValueError(f"{name}: {probs_by_seed.shape[1]} predictions, {truth.shape[0]} labels, "
                         f"{len(patient_ids)} patient ids")

    def mean_auroc(idx: np.ndarray) -> dict[str, float]:
        return {"auroc": float(np.mean([auroc(truth[idx], p[idx]) for p in probs_by_seed]))}

    per_seed = tuple(auroc(truth, p) for p in probs_by_seed)
    reps = patient_bootstrap_samples(mean_auroc, len(truth), patient_ids, n_boot, seed)["auroc"] \
        if n_boot > 0 else np.zeros(0)
    lo, hi = percentile_interval(reps) if reps.size else (float("nan"), float("nan"))
    return ConditionResult(name, len(truth), len(set(patient_ids)), float(np.mean(per_seed)), lo, hi, per_seed,
                           reps)


def change_interval(reference: ConditionResult, other: ConditionResult, level: float = 0.95) -> tuple[float, float]:
    """95 % interval of ``other.auroc − reference.auroc`` from the two conditions' replicates.

    Conditions scored on the same patients with the same seed drew the same patients in every
    replicate, so this is a paired interval; conditions on different patients (bootstrapped
    with different seeds) are independent samples and the replicate differences are too.
    """
    if not reference.replicates.size or reference.replicates.size != other.replicates.size:
        return float("nan"), float("nan")
    return percentile_interval(other.replicates - reference.replicates, level)


def format_table(results: Sequence[ConditionResult], reference: str | None = None) -> str:
    """A fixed-width table; with ``reference`` (a row name), each row's AUROC change from it."""
    ref = next((r.auroc for r in results if r.name == reference), None)
    width = max(len(r.name) for r in results) + 1
    ref_row = next((r for r in results if r.name == reference), None)
    lines = [f"{'test set':<{width}} {'images':>6} {'AUROC':>6} {'95% CI (patients)':>18} {'seed sd':>7}"
             + (f" {'change':>7} {'95% CI':>17}" if ref is not None else "")]
    for r in results:
        line = (f"{r.name:<{width}} {r.n_images:>6} {r.auroc:>6.3f} {f'[{r.ci_low:.3f}, {r.ci_high:.3f}]':>18} "
                f"{r.seed_sd:>7.3f}")
        if ref is not None:
            lo, hi = change_interval(ref_row, r) if r is not ref_row else (float("nan"), float("nan"))
            ci = f"[{lo:+.3f}, {hi:+.3f}]" if r is not ref_row else ""
            line += f" {r.auroc - ref:>+7.3f} {ci:>17}"
        lines.append(line)
    return "\n".join(lines)
