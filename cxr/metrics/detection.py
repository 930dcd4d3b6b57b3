"""Detection maths for VinDr-CXR: box IoU, COCO-style average precision at one IoU threshold, the
competition's "No finding" rows and its submission strings.

The competition ("VinBigData Chest X-ray Abnormalities Detection") scored mAP at IoU 0.4 over
15 classes: the 14 findings (class ids 0..13) and "No finding" (14). An image predicted as
having no finding is written ``14 1 0 0 1 1`` (class 14, score 1, the box [0, 0, 1, 1]); an
image every reader called normal gets a class-14 truth box [0, 0, 1, 1], so a correct "No
finding" call is a true positive of class 14. We report mAP both ways: with class 14
(the competition's figure) and over the findings alone.

AP of one class (COCO's definition, as pycocotools and torchmetrics compute it): in each image
the detections, by descending score (at most ``max_dets``), are matched greedily to the
still-unmatched truth box of highest IoU, a match needing IoU >= t; over all images the
detections are sorted by score, precision p_k = TP_k / k and recall r_k = TP_k / G (G truth
boxes) after the k-th; precision is made non-increasing from the right,
p̂_k = max_{j >= k} p_j, and AP is its mean at the 101 recalls 0, 0.01, ..., 1:

    AP = (1/101) Σ_{r ∈ {0, .01, …, 1}} p̂_{k(r)},   k(r) = the first k with r_k >= r (p̂ = 0 if none)

mAP is the mean over the classes that have at least one truth box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

NO_FINDING_CLASS = 14
NO_FINDING_BOX = (0.0, 0.0, 1.0, 1.0)
COMPETITION_IOU = 0.4
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class Boxes:
    """Boxes of one image: ``boxes`` (N, 4) x_min, y_min, x_max, y_max; ``labels`` (N,) class ids;
    ``scores`` (N,) for predictions, None for truth."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None

    @staticmethod
    def make(boxes: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int] | np.ndarray,
             scores: Sequence[float] | np.ndarray | None = None) -> "Boxes":
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        s = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(lab) != len(b) or (s is not None and len(s) != len(b)):
            raise ValueError(f"{len(b)} boxes, {len(lab)} labels, {None if s is None else len(s)} scores")
        return Boxes(b, lab, s)

    @staticmethod
    def empty(predicted: bool = False) -> "Boxes":
        return Boxes.make(np.zeros((0, 4)), [], [] if predicted else None)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> "Boxes":
        return Boxes(self.boxes[keep], self.labels[keep], None if self.scores is None else self.scores[keep])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of boxes ``a`` (N, 4) and ``b`` (M, 4) in x_min, y_min,
    x_max, y_max (continuous coordinates: a box's area is width × height); 0 where both are empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_image(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou_threshold: float,
                max_dets: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """One image and one class: the kept detections' scores (descending) and whether each is a
    true positive (greedy matching to the unmatched truth box of highest IoU >= the threshold)."""
    order = np.argsort(-scores, kind="mergesort")[:max_dets]
    pred, scores = pred[order], scores[order]
    tp = np.zeros(len(order), dtype=bool)
    if len(truth) and len(pred):
        ious = box_iou(pred, truth)
        taken = np.zeros(len(truth), dtype=bool)
        for i in range(len(pred)):
            best, m = min(iou_threshold, 1 - 1e-10), -1
            for g in range(len(truth)):
                if taken[g] or ious[i, g] < best:
                    continue
                best, m = ious[i, g], g
            if m >= 0:
                taken[m], tp[i] = True, True
    return scores, tp


def average_precision(scores: np.ndarray, tp: np.ndarray, n_truth: int) -> float:
    """101-point interpolated AP (module docstring) of detections with ``scores`` and true-positive
    flags ``tp`` (concatenated over images) against ``n_truth`` truth boxes; NaN without truth."""
    if n_truth == 0:
        return math.nan
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    hits = np.asarray(tp, dtype=bool)[order]
    tps = np.cumsum(hits)
    fps = np.cumsum(~hits)
    recall = tps / n_truth
    precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.mean(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)))


def mean_average_precision(preds: Sequence[Boxes], truths: Sequence[Boxes],
                           iou_threshold: float = COMPETITION_IOU, max_dets: int = 100) -> dict:
    """Hand-checkable mAP over images (``preds[i]`` and ``truths[i]`` are the same image):
    ``{"map": mean AP over classes with truth, "per_class": {class id: AP}}`` (NaN map when no
    class has truth)."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} images")
    classes = sorted({int(c) for t in truths for c in t.labels})
    per_class: dict[int, float] = {}
    for c in classes:
        all_scores, all_tp, n_truth = [], [], 0
        for p, t in zip(preds, truths):
            pk, tk = p.labels == c, t.labels == c
            n_truth += int(tk.sum())
            s, hit = match_image(p.boxes[pk], p.scores[pk], t.boxes[tk], iou_threshold, max_dets)
            all_scores.append(s)
            all_tp.append(hit)
        per_class[c] = average_precision(np.concatenate(all_scores), np.concatenate(all_tp), n_truth)
    return {"map": float(np.mean(list(per_class.values()))) if per_class else math.nan, "per_class": per_class}


def torchmetrics_map(preds: Sequence[Boxes], truths: Sequence[Boxes], iou_threshold: float = COMPETITION_IOU) -> dict:
    """The same figure from ``torchmetrics.detection.MeanAveragePrecision`` (pycocotools backend),
    the reference implementation; same return shape as :func:`mean_average_precision`."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} images")
    if not any(len(t) for t in truths):
        return {"map": math.nan, "per_class": {}}
    metric = MeanAveragePrecision(iou_thresholds=[iou_threshold], class_metrics=True)
    metric.update(
        [{"boxes": torch.as_tensor(p.boxes, dtype=torch.float32), "scores": torch.as_tensor(p.scores, dtype=torch.float32),
          "labels": torch.as_tensor(p.labels, dtype=torch.int64)} for p in preds],
        [{"boxes": torch.as_tensor(t.boxes, dtype=torch.float32), "labels": torch.as_tensor(t.labels, dtype=torch.int64)}
         for t in truths])
    out = metric.compute()
    classes = out["classes"].reshape(-1).tolist()
    values = out["map_per_class"].reshape(-1).tolist()
    with_truth = {int(c) for t in truths for c in t.labels}
    per_class = {int(c): float(v) for c, v in zip(classes, values) if int(c) in with_truth}
    return {"map": float(np.mean(list(per_class.values()))) if per_class else math.nan, "per_class": per_class}


# ---------------------------------------------------------------------------------------------
# "No finding", the competition's way


def predicts_no_finding(pred: Boxes, threshold: float) -> bool:
    """An image is called "No finding" when none of its finding boxes scores ``threshold`` or more."""
    findings = pred.labels != NO_FINDING_CLASS
    return not bool(np.any(pred.scores[findings] >= threshold))


def no_finding_prediction(pred: Boxes, threshold: float) -> Boxes:
    """The competition's prediction: the single row ``14 1 0 0 1 1`` for an image called "No
    finding" (:func:`predicts_no_finding`; its low-scoring boxes dropped), else its finding boxes."""
    if predicts_no_finding(pred, threshold):
        return Boxes.make([NO_FINDING_BOX], [NO_FINDING_CLASS], [1.0])
    return pred.select(pred.labels != NO_FINDING_CLASS)


def no_finding_truth(truth: Boxes) -> Boxes:
    """The competition's truth: an image without finding boxes gets a class-14 box [0, 0, 1, 1]."""
    findings = truth.select(truth.labels != NO_FINDING_CLASS)
    if len(findings):
        return findings
    return Boxes.make([NO_FINDING_BOX], [NO_FINDING_CLASS])


def findings_only(boxes: Boxes) -> Boxes:
    return boxes.select(boxes.labels != NO_FINDING_CLASS)


def competition_scores(preds: Sequence[Boxes], truths: Sequence[Boxes], threshold: float,
                       iou_threshold: float = COMPETITION_IOU, exact: bool = False) -> dict:
    """mAP@``iou_threshold`` with "No finding" scored the competition's way (``map``, over the 15
    classes) and over the findings alone (``map_findings``: raw finding boxes, no class 14; an image
    without truth boxes only adds false positives), with per-class APs and the number of images
    called "No finding". ``exact``: the hand implementation instead of torchmetrics."""
    score = mean_average_precision if exact else torchmetrics_map
    nf_preds = [no_finding_prediction(p, threshold) for p in preds]
    with_nf = score(nf_preds, [no_finding_truth(t) for t in truths], iou_threshold)
    findings = score([findings_only(p) for p in preds], [findings_only(t) for t in truths], iou_threshold)
    return {"map": with_nf["map"], "map_findings": findings["map"], "per_class": with_nf["per_class"],
            "per_class_findings": findings["per_class"],
            "called_no_finding": sum(int(len(p) == 1 and p.labels[0] == NO_FINDING_CLASS) for p in nf_preds),
            "images": len(preds)}


NO_FINDING_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05, 0.10, ..., 0.95


def tune_no_finding_threshold(preds: Sequence[Boxes], truths: Sequence[Boxes], prefer: float = 0.5,
                              iou_threshold: float = COMPETITION_IOU,
                              grid: Sequence[float] = NO_FINDING_GRID) -> tuple[float, dict[float, float]]:
    """The "No finding" threshold of ``grid`` that maximises mAP with class 14 (the hand
    implementation), ties going to the one nearest ``prefer``; and the mAP at each."""
    truths14 = [no_finding_truth(t) for t in truths]
    sweep = {float(t): mean_average_precision([no_finding_prediction(p, t) for p in preds], truths14,
                                              iou_threshold)["map"] for t in grid}
    best = max(sweep, key=lambda t: (np.nan_to_num(sweep[t], nan=-1.0), -abs(t - prefer)))
    return best, sweep


def no_finding_baseline(n_images: int) -> list[Boxes]:
    """Every image predicted "No finding" (the row ``14 1 0 0 1 1``): the baseline to beat."""
    return [Boxes.make([NO_FINDING_BOX], [NO_FINDING_CLASS], [1.0]) for _ in range(n_images)]


# ---------------------------------------------------------------------------------------------
# Submission strings


def _num(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def prediction_string(pred: Boxes, box_digits: int = 1, score_digits: int = 4) -> str:
    """``class score x_min y_min x_max y_max ...`` space-separated (the competition's
    ``PredictionString``); the "No finding" row reads ``14 1 0 0 1 1``."""
    parts = []
    for box, label, score in zip(pred.boxes, pred.labels, pred.scores):
        parts.append(" ".join([str(int(label)), _num(float(score), score_digits),
                               *(_num(float(v), box_digits) for v in box)]))
    return " ".join(parts)


def parse_prediction_string(text: str) -> Boxes:
    """The inverse of :func:`prediction_string`; a malformed string raises ValueError."""
    tokens = text.split()
    if len(tokens) % 6:
        raise ValueError(f"a prediction string holds groups of 6 numbers, got {len(tokens)} tokens")
    rows = [tokens[i:i + 6] for i in range(0, len(tokens), 6)]
    labels = []
    for r in rows:
        if not r[0].isdecimal() or int(r[0]) > NO_FINDING_CLASS:
            raise ValueError(f"class {r[0]!r} is not a class id 0..{NO_FINDING_CLASS}")
        labels.append(int(r[0]))
    return Boxes.make([[float(v) for v in r[2:]] for r in rows], labels, [float(r[1]) for r in rows])


def concat(parts: Iterable[Boxes]) -> Boxes:
    items = list(parts)
    if not items:
        return Boxes.empty(predicted=True)
    scores = None if any(p.scores is None for p in items) else np.concatenate([p.scores for p in items])
    return Boxes(np.concatenate([p.boxes for p in items]), np.concatenate([p.labels for p in items]), scores)
