"""Classification metrics for the three tasks, computed with scikit-learn and torchmetrics.

Every function takes numpy arrays of *probabilities* (after sigmoid or softmax, never logits)
and targets as :meth:`cxr.data.tasks.Task.targets` forms them: binary ``(N,)`` 0/1/NaN,
multi-label ``(N, L)`` 0/1/NaN, multi-class ``(N,)`` class index. NaN means "not labelled" and
that row is left out of that label's numbers, never counted as negative.

Undefined numbers are NaN, not exceptions: a validation split with one class has no AUROC,
and a bootstrap resample may draw no positives. Callers say so with :func:`undefined_notes`.

The operating threshold of a binary output is chosen once, on validation data
(:func:`choose_thresholds`, Youden's J = sensitivity + specificity − 1), and applied unchanged
to the test set (:func:`task_metrics`): choosing it on the test set would report an optimistic
sensitivity/specificity that no deployed model could have.

Definitions (``p`` = probability of the positive class, positive when ``p >= threshold``):

- AUROC: scikit-learn's ROC curve and trapezoid (what ``roc_auc_score`` computes);
  multi-label macro = mean over labels whose AUROC is defined; multi-class = mean of the
  one-vs-rest AUROCs of the classes present.
- sensitivity at 95 % specificity: the highest TPR on the empirical ROC curve with FPR ≤ 0.05.
- ECE: ``Σ_b (n_b / N) |mean(p)_b − mean(y)_b|`` over 15 equal-width bins of ``p``
  (torchmetrics ``binary_calibration_error``); multi-class uses the top-label confidence.
- BCE: :func:`torch.nn.functional.binary_cross_entropy` (the training loss); multi-class
  cross-entropy: :func:`sklearn.metrics.log_loss` (natural log, probabilities clipped to
  machine epsilon).
"""

from __future__ import annotations

import math
from typing import Collection, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from cxr.data.tasks import Task

# scikit-learn and torchmetrics are imported inside the functions that use them: importing
# torchmetrics pulls in torchvision and torch._dynamo (seconds), which every `cxr` command and
# every module importing this one would otherwise pay even when it computes no metric.

#: The metric each task kind is selected on (early stopping, best checkpoint), and whether
#: higher is better. Multi-class uses cross-entropy: it is defined on every split (AUROC is not
#: when a class is missing) and rewards calibrated probabilities, not only the argmax.
HEADLINE: dict[str, tuple[str, bool]] = {
    "binary": ("auroc", True),
    "multilabel": ("auroc", True),
    "multiclass": ("cross_entropy", False),
}

#: Per-output keys of :func:`binary_metrics`, in the order they are reported.
BINARY_KEYS: tuple[str, ...] = ("n", "n_pos", "auroc", "accuracy", "sensitivity", "specificity", "f1",
                                "sens_at_95spec", "ece", "bce", "threshold")
#: Keys averaged over labels for the multi-label macro summary.
MACRO_KEYS: tuple[str, ...] = ("auroc", "accuracy", "sensitivity", "specificity", "f1",
                               "sens_at_95spec", "ece", "bce")
#: Keys that count or configure rather than measure (no confidence interval makes sense).
COUNT_KEYS: frozenset[str] = frozenset({"n", "n_pos", "threshold"})

N_BINS = 15
_PROB_TOL = 1e-6  # float32 sigmoid/softmax may overshoot [0, 1] by rounding


# --------------------------------------------------------------------------------------------
# input checks (programming errors: ValueError, with the shapes in the message)
# --------------------------------------------------------------------------------------------

def _binary_pair(y: np.ndarray, score: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (labels as bool, scores as float64) with NaN-target rows dropped."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{where}: {y.size} labels for {s.size} scores")
    keep = ~np.isnan(y)
    if not keep.all():
        y, s = y[keep], s[keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{where}: targets must be 0, 1 or NaN")
    if not np.isfinite(s).all():
        raise ValueError(f"{where}: scores contain NaN or infinity")
    return y > 0.5, s


def _check_prob(p: np.ndarray, where: str) -> np.ndarray:
    """``p`` clipped to [0, 1] after checking it is a probability and not a logit."""
    if p.size and (p.min() < -_PROB_TOL or p.max() > 1 + _PROB_TOL):
        raise ValueError(f"{where}: expected probabilities in [0, 1], got values in "
                         f"[{p.min():.3g}, {p.max():.3g}] (logits passed by mistake?)")
    return np.clip(p, 0.0, 1.0)


def _two_classes(y: np.ndarray) -> bool:
    return bool(y.size) and bool(y.any()) and not bool(y.all())


def _nanmean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN (and no RuntimeWarning) when there are none."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


# --------------------------------------------------------------------------------------------
# binary building blocks
# --------------------------------------------------------------------------------------------

def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn); NaN when ``y`` is empty or has one class.

    NaN targets are dropped. Returning NaN rather than raising lets a bootstrap skip the
    resamples that drew a single class, and a report say "undefined" instead of stopping.
    """
    y, s = _binary_pair(y, score, "auroc")
    if not _two_classes(y):
        return math.nan
    from sklearn.metrics import auc, roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    # exactly what roc_auc_score computes for binary targets, without its repeated input
    # validation (a third of the time in a 1000-resample bootstrap)
    return float(auc(fpr, tpr))


def _roc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    # every threshold kept: dropping collinear points could hide the best point under an FPR cap
    return roc_curve(y, s, drop_intermediate=False)


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold (positive when ``score >= t``) maximising sensitivity + specificity − 1.

    Meant for validation data. NaN targets are dropped; with one class (or none) there is no
    ROC curve and 0.5 is returned: the caller reports that (:func:`undefined_notes`). Ties go
    to the highest threshold (fewest positive calls). When calling nothing positive is best,
    the threshold sits just above the highest score.
    """
    y, s = _binary_pair(y, score, "youden_threshold")
    if not _two_classes(y):
        return 0.5
    fpr, tpr, thr = _roc(y, s)
    j = tpr - fpr
    k = int(np.flatnonzero(j >= j.max() - 1e-12)[0])  # a tie must not hinge on 1 − 1/3 ≠ 2/3 in floats
    if not np.isfinite(thr[k]):  # scikit-learn's leading "nothing is positive" point
        return float(np.nextafter(s.max(), np.inf))
    return float(thr[k])


def sensitivity_at_specificity(y: np.ndarray, score: np.ndarray, specificity: float = 0.95) -> float:
    """Highest sensitivity among the operating points whose specificity is ≥ ``specificity``.

    Read from the empirical ROC curve (no interpolation); NaN when ``y`` has one class.
    """
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"sensitivity_at_specificity: specificity {specificity} is not in [0, 1]")
    y, s = _binary_pair(y, score, "sensitivity_at_specificity")
    if not _two_classes(y):
        return math.nan
    fpr, tpr, _ = _roc(y, s)
    return _sens_at_spec(fpr, tpr, specificity)


def _sens_at_spec(fpr: np.ndarray, tpr: np.ndarray, specificity: float) -> float:
    ok = fpr <= (1.0 - specificity) + 1e-12  # 1/20 must count as 5 % despite rounding
    return float(tpr[ok].max())  # the (0, 0) point always qualifies


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, n_bins: int = N_BINS) -> float:
    """Binary ECE of ``prob`` = P(positive) against the 0/1 outcome (torchmetrics, L1, equal-width
    bins); NaN when there are no labelled rows."""
    y, p = _binary_pair(y, prob, "expected_calibration_error")
    p = _check_prob(p, "expected_calibration_error")
    return _ece(y, p, n_bins)


def _ece(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    from torchmetrics.functional.classification import binary_calibration_error

    if not y.size:
        return math.nan
    value = binary_calibration_error(torch.from_numpy(p), torch.from_numpy(y.astype(np.int64)),
                                     n_bins=n_bins, validate_args=False)
    return float(value)


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    # the training loss itself (torch clamps log(p) at −100), so validation BCE and the
    # logged loss agree; equal to scikit-learn's log_loss away from p = 0 or 1
    if not y.size:
        return math.nan
    return float(F.binary_cross_entropy(torch.from_numpy(p), torch.from_numpy(y.astype(np.float64))))


def binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float,
                   keys: Collection[str] | None = None) -> dict[str, float]:
    """All binary metrics of one output at a fixed ``threshold`` (positive when ``prob >= t``).

    Keys: :data:`BINARY_KEYS`. Rows with a NaN target are dropped. Sensitivity is NaN without
    positives, specificity without negatives, AUROC and sensitivity at 95 % specificity without
    both. ``keys`` (a subset of :data:`BINARY_KEYS`) computes only those, for fast bootstraps.
    """
    from sklearn.metrics import auc

    want = frozenset(BINARY_KEYS if keys is None else keys)
    unknown = want - set(BINARY_KEYS)
    if unknown:
        raise ValueError(f"binary_metrics: unknown keys {sorted(unknown)} (known: {', '.join(BINARY_KEYS)})")
    if not math.isfinite(threshold):
        raise ValueError(f"binary_metrics: threshold {threshold} is not a number")
    y, p = _binary_pair(y, prob, "binary_metrics")
    p = _check_prob(p, "binary_metrics")
    n, n_pos = int(y.size), int(y.sum())
    out: dict[str, float] = {"n": float(n), "n_pos": float(n_pos)}

    if want & {"auroc", "sens_at_95spec"}:
        if _two_classes(y):
            fpr, tpr, _ = _roc(y, p)
            # the trapezoid under the full ROC curve is exactly roc_auc_score's value
            out["auroc"] = float(auc(fpr, tpr))
            out["sens_at_95spec"] = _sens_at_spec(fpr, tpr, 0.95)
        else:
            out["auroc"] = out["sens_at_95spec"] = math.nan

    if want & {"accuracy", "sensitivity", "specificity", "f1"}:
        # the four counts directly: sklearn's confusion_matrix costs about a millisecond per
        # call, most of a bootstrap replicate; the tests check the ratios against sklearn's
        called = p >= threshold
        tp = int(np.count_nonzero(called & y))
        fp = int(np.count_nonzero(called)) - tp
        fn = n_pos - tp
        tn = n - n_pos - fp
        out["accuracy"] = (tp + tn) / n if n else math.nan
        out["sensitivity"] = tp / (tp + fn) if tp + fn else math.nan
        out["specificity"] = tn / (tn + fp) if tn + fp else math.nan
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan

    if "ece" in want:
        out["ece"] = _ece(y, p, N_BINS)
    if "bce" in want:
        out["bce"] = _bce(y, p)
    out["threshold"] = float(threshold)
    return {k: out[k] for k in BINARY_KEYS if k in want or k in COUNT_KEYS}


# --------------------------------------------------------------------------------------------
# the three task kinds
# --------------------------------------------------------------------------------------------

def _base_keys(keys: Collection[str] | None) -> frozenset[str] | None:
    """Binary keys needed for a request naming macro keys and/or ``metric/label`` keys."""
    if keys is None:
        return None
    return frozenset(k.split("/", 1)[0] for k in keys)


def multilabel_metrics(Y: np.ndarray, P: np.ndarray, thresholds: np.ndarray | None,
                       label_names: tuple[str, ...] | list[str],
                       keys: Collection[str] | None = None) -> dict[str, float]:
    """Per-label binary metrics as ``"<metric>/<label>"`` plus macro means under the bare names.

    NaN targets are masked per column. Each macro mean is over the labels where that metric is
    defined (AUROC: labels with both classes labelled). ``"n"`` is the number of images,
    ``"auroc_labels"`` how many labels the macro AUROC averages. ``thresholds`` is one per label
    (None: 0.5 for all). ``keys`` (bare metric names) computes only those metrics.
    """
    Y = np.asarray(Y, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    L = len(label_names)
    if Y.ndim != 2 or Y.shape[1] != L or P.shape != Y.shape:
        raise ValueError(f"multilabel_metrics: targets {Y.shape} and probabilities {P.shape} "
                         f"for {L} labels")
    thr = np.full(L, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thr.shape != (L,):
        raise ValueError(f"multilabel_metrics: {thr.size} thresholds for {L} labels")
    base = _base_keys(keys)
    per = [binary_metrics(Y[:, j], P[:, j], thr[j], keys=None if base is None else base & set(BINARY_KEYS))
           for j in range(L)]
    out: dict[str, float] = {"n": float(Y.shape[0])}
    for key in MACRO_KEYS:
        if key in per[0]:
            out[key] = _nanmean(m[key] for m in per)
    if "auroc" in per[0]:
        out["auroc_labels"] = float(sum(math.isfinite(m["auroc"]) for m in per))
    for name, m in zip(label_names, per):
        for key, value in m.items():
            out[f"{key}/{name}"] = value
    return out


def multiclass_metrics(y_idx: np.ndarray, P: np.ndarray, label_names: tuple[str, ...] | list[str],
                       keys: Collection[str] | None = None) -> dict[str, float]:
    """Single-label metrics from class indices and softmax probabilities ``(N, K)``.

    ``cross_entropy`` (the headline), ``accuracy`` (argmax), ``balanced_accuracy`` (mean recall
    over classes present, as scikit-learn defines it), ``auroc`` (macro one-vs-rest over
    classes present, per class as ``"auroc/<class>"``), ``sensitivity/<class>`` (recall), and
    ``ece`` on the top-label confidence. Rows are renormalised to sum to 1 after checking they
    nearly do (float32 softmax rounding).
    """
    y = np.asarray(y_idx).reshape(-1)
    P = np.asarray(P, dtype=np.float64)
    K = len(label_names)
    if P.ndim != 2 or P.shape != (y.size, K):
        raise ValueError(f"multiclass_metrics: {y.size} targets and probabilities {P.shape} for {K} classes")
    if y.size and (not np.issubdtype(y.dtype, np.integer) and not np.all(y == np.round(y))):
        raise ValueError("multiclass_metrics: targets must be class indices")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"multiclass_metrics: class index outside 0..{K - 1}")
    P = _check_prob(P, "multiclass_metrics")
    sums = P.sum(axis=1)
    if y.size and np.abs(sums - 1.0).max() > 1e-3:
        raise ValueError("multiclass_metrics: probability rows must sum to 1 (softmax outputs expected)")
    from sklearn.metrics import confusion_matrix, log_loss
    from torchmetrics.functional.classification import multiclass_calibration_error

    want = frozenset(["cross_entropy", "accuracy", "balanced_accuracy", "auroc", "sensitivity", "ece"]
                     if keys is None else _base_keys(keys))
    out: dict[str, float] = {"n": float(y.size)}
    if not y.size:
        nan_keys = [k for k in ("cross_entropy", "accuracy", "balanced_accuracy", "auroc", "ece") if k in want]
        out.update({k: math.nan for k in nan_keys})
        for name in label_names:
            out.update({f"{k}/{name}": math.nan for k in ("auroc", "sensitivity") if k in want})
        return out
    P = P / sums[:, None]
    if "cross_entropy" in want:
        out["cross_entropy"] = float(log_loss(y, P, labels=list(range(K))))
    recall = np.full(K, math.nan)
    if want & {"accuracy", "balanced_accuracy", "sensitivity"}:
        cm = confusion_matrix(y, P.argmax(axis=1), labels=list(range(K)))
        support = cm.sum(axis=1)
        present = support > 0
        recall[present] = np.diag(cm)[present] / support[present]
        out["accuracy"] = float(np.trace(cm) / y.size)
        out["balanced_accuracy"] = float(recall[present].mean())
    per_auc = [auroc(y == c, P[:, c]) for c in range(K)] if "auroc" in want else []
    if "auroc" in want:
        out["auroc"] = _nanmean(per_auc)
    if "ece" in want:
        out["ece"] = float(multiclass_calibration_error(torch.from_numpy(P), torch.from_numpy(y), K,
                                                        n_bins=N_BINS, validate_args=False))
    for c, name in enumerate(label_names):
        if "auroc" in want:
            out[f"auroc/{name}"] = per_auc[c]
        if "sensitivity" in want:
            out[f"sensitivity/{name}"] = float(recall[c])
    if keys is not None:
        out = {k: v for k, v in out.items() if k == "n" or k in keys or k.split("/", 1)[0] in keys}
    return out


def _binary_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:  # the network's (N, 1) sigmoid output
        p = p[:, 0]
    if p.ndim != 1:
        raise ValueError(f"binary task: expected (N,) or (N, 1) probabilities, got shape {p.shape}")
    return p


def choose_thresholds(task: "Task", targets: np.ndarray, probs: np.ndarray) -> np.ndarray | None:
    """Operating thresholds from VALIDATION data: Youden's J per output.

    binary → shape (1,), multilabel → (L,), multiclass → None (the argmax needs none). A label
    with one class in validation gets 0.5 (see :func:`undefined_notes`).
    """
    if task.kind == "binary":
        return np.array([youden_threshold(targets, _binary_probs(probs))])
    if task.kind == "multilabel":
        Y, P = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
        if Y.ndim != 2 or P.shape != Y.shape or Y.shape[1] != len(task.label_names):
            raise ValueError(f"choose_thresholds: targets {Y.shape} and probabilities {P.shape} "
                             f"for {len(task.label_names)} labels")
        return np.array([youden_threshold(Y[:, j], P[:, j]) for j in range(Y.shape[1])])
    if task.kind == "multiclass":
        return None
    raise ValueError(f"unknown task kind {task.kind!r}")


def task_metrics(task: "Task", targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | None = None,
                 keys: Collection[str] | None = None) -> dict[str, float]:
    """The metrics of ``task`` (dispatching on ``task.kind``) at fixed thresholds.

    ``thresholds`` come from :func:`choose_thresholds` on validation data (None: 0.5); they are
    used as given, never re-fitted here. ``keys`` restricts the work to those metrics.
    """
    if task.kind == "binary":
        thr = 0.5 if thresholds is None else float(np.asarray(thresholds, dtype=np.float64).reshape(-1)[0])
        return binary_metrics(targets, _binary_probs(probs), thr, keys=keys)
    if task.kind == "multilabel":
        return multilabel_metrics(targets, probs, thresholds, task.label_names, keys=keys)
    if task.kind == "multiclass":
        return multiclass_metrics(targets, probs, task.label_names, keys=keys)
    raise ValueError(f"unknown task kind {task.kind!r}")


def undefined_notes(task: "Task", targets: np.ndarray, where: str) -> list[str]:
    """One human line per label whose AUROC (and Youden threshold) is undefined on ``targets``.

    e.g. ``"validation: only one class for Tuberculosis (AUROC undefined)"``.
    """
    notes: list[str] = []
    if task.kind in ("binary", "multilabel"):
        Y = np.asarray(targets, dtype=np.float64)
        Y = Y.reshape(-1, 1) if task.kind == "binary" else Y
        names = task.label_names[:1] if task.kind == "binary" else task.label_names
        for j, name in enumerate(names):
            col = Y[:, j]
            col = col[~np.isnan(col)]
            if not col.size:
                notes.append(f"{where}: no labelled images for {name} (AUROC undefined)")
            elif col.min() == col.max():
                notes.append(f"{where}: only one class for {name} (AUROC undefined)")
        return notes
    y = np.asarray(targets).reshape(-1).astype(np.int64)
    present = np.bincount(y, minlength=len(task.label_names)) > 0 if y.size else np.zeros(len(task.label_names), bool)
    absent = [n for n, p in zip(task.label_names, present) if not p]
    if absent:
        notes.append(f"{where}: no images of {', '.join(absent)} (one-vs-rest AUROC undefined)")
    if present.sum() < 2:
        notes.append(f"{where}: fewer than two classes present (AUROC undefined)")
    return notes
