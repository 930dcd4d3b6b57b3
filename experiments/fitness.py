"""The numbers that show the phantom is fit for purpose (docs/phantom.md), one function each.

A harmonization study needs data with three properties, and each is measured here:

1. **it is read like real data**: the dataset loaders read every phantom tree with the counts
   and labels its truth manifest says (:func:`check_loaders`);
2. **the sites differ**: a histogram site detector separates the two acquisition chains
   (:func:`eval.domain_gap.domain_gap_accuracy`), and **the difference hurts**: a classifier
   trained at one site (:func:`train_classifier`) loses AUROC (:func:`auroc`, with
   :func:`bootstrap_auroc` intervals) at the other, also on the *same subjects* rendered by the
   other chain (:func:`paired_auroc_drop`), and gray-level normalization
   (:func:`match_images`) does not win that loss back (:func:`recovered_fraction`): the shift
   is in texture, sharpness and processing, not only in a gray-level curve;
3. **its truth is right**: every lesion box lies in its anatomical region and matches its mask
   (:func:`check_lesion_boxes`, :func:`check_truth_boxes`).

The maths are pure functions of arrays; :func:`read_manifest` and the ``check_*`` helpers
read a tree written by ``cxr phantom``. ``experiments/phantom_fitness.py`` runs them all and prints a table.
"""

from __future__ import annotations

import csv
import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from classifiers.config import (
    AugmentConfig,
    ClassifierConfig,
    ClassifierDataConfig,
    ClassifierTrainConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
)
from classifiers.data import ImageSet
from classifiers.predict import load_classifier
from classifiers.small_cnn import SmallCNN
from classifiers.trainer import train
from cxr.data.layouts import load_tree
from cxr.data.preprocess import resize_square
from cxr.data.record import Sample
from cxr.data.tasks import get_task
from cxr.errors import DataError
from cxr.metrics import classification as metrics
from cxr.metrics import intervals
from cxr.phantom import writers as W
from harmonize.histogram import fit_reference, match_histogram

TB = "Tuberculosis"
TRUTH_MANIFEST = "phantom_truth/manifest.csv"


# --------------------------------------------------------------------------------------------
# AUROC and its uncertainty
# --------------------------------------------------------------------------------------------

def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present (:func:`cxr.metrics.classification.auroc`).

    The undefined case is returned as NaN rather than raised, so a bootstrap resample that
    happens to hold one class is skipped instead of stopping the whole report.
    """
    return metrics.auroc(labels, scores)


def _interval(values: Sequence[float], level: float) -> tuple[float, float]:
    """Central ``level`` percentile interval of bootstrap values; NaNs when there are none."""
    if not len(values):
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`auroc` (resampling images with replacement).

    Each phantom subject has one image here, so this is :func:`cxr.metrics.intervals.patient_bootstrap`
    with one patient per image. Resamples that draw a single class are skipped (their AUROC is
    undefined).
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.size != s.size:
        raise ValueError(f"bootstrap_auroc: {y.size} labels for {s.size} scores")
    ci = intervals.patient_bootstrap(lambda idx: {"auroc": auroc(y[idx], s[idx])}, y.size, np.arange(y.size),
                                     n_boot=n_boot, seed=seed, level=level, min_finite=0.0)
    return ci.get("auroc", (math.nan, math.nan))


def paired_auroc_drop(labels: np.ndarray, scores_home: np.ndarray, scores_away: np.ndarray,
                      n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """``AUC(home) − AUC(away)`` on the same subjects, with a paired bootstrap interval.

    Each resample draws subjects, so both renders of a subject stay together: the interval
    reflects the shift, not which subjects happened to be drawn.
    """
    y = np.asarray(labels).reshape(-1)
    a = np.asarray(scores_home, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_away, dtype=np.float64).reshape(-1)
    if not y.size == a.size == b.size:
        raise ValueError(f"paired_auroc_drop: {y.size} labels, {a.size} and {b.size} scores")
    drop = auroc(y, a) - auroc(y, b)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        v = auroc(y[idx], a[idx]) - auroc(y[idx], b[idx])
        if not math.isnan(v):
            values.append(v)
    return (float(drop), *_interval(values, level))


def unpaired_auroc_drop(labels_home: np.ndarray, scores_home: np.ndarray, labels_away: np.ndarray,
                        scores_away: np.ndarray, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """``AUC(home) − AUC(away)`` on two independent test sets, with a bootstrap interval that
    resamples each set on its own."""
    ya, sa = np.asarray(labels_home).reshape(-1), np.asarray(scores_home, dtype=np.float64).reshape(-1)
    yb, sb = np.asarray(labels_away).reshape(-1), np.asarray(scores_away, dtype=np.float64).reshape(-1)
    drop = auroc(ya, sa) - auroc(yb, sb)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        i = rng.integers(0, ya.size, ya.size)
        j = rng.integers(0, yb.size, yb.size)
        v = auroc(ya[i], sa[i]) - auroc(yb[j], sb[j])
        if not math.isnan(v):
            values.append(v)
    return (float(drop), *_interval(values, level))


def recovered_fraction(auc_home: float, auc_away: float, auc_harmonized: float) -> float:
    """Share of the cross-site AUROC drop a harmonization wins back: 0 none, 1 all of it."""
    drop = auc_home - auc_away
    if not math.isfinite(drop) or abs(drop) < 1e-12:
        return math.nan
    return float((auc_harmonized - auc_away) / drop)


# --------------------------------------------------------------------------------------------
# Histogram matching (the intensity-normalization baseline)
# --------------------------------------------------------------------------------------------

def match_images(images: Sequence[np.ndarray], reference_images: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Each image's gray levels remapped onto the reference set's histogram.

    Uses :mod:`harmonize.histogram` (reference = mean quantile function of the set). Matching
    is monotone per image: it moves no edge, removes no grain and cannot undo spatially varying
    processing (range compression, unsharp masking), so it cannot undo a shift made of those.
    """
    reference = fit_reference(reference_images)
    return [match_histogram(im, reference) for im in images]


def highpass(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """The fine-scale residual ``x − G_σ * x``, offset to mid-gray and clipped to [0, 1].

    Grain, sharpness and edge enhancement live in this residual, and a monotone gray-level
    remapping barely changes it; the histogram site detector
    (:func:`eval.domain_gap.domain_gap_accuracy`) applied to it is a *texture* site detector.
    """
    from scipy import ndimage

    x = np.asarray(image, dtype=np.float32)
    return np.clip(0.5 + (x - ndimage.gaussian_filter(x, sigma, mode="nearest")), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The small classifier
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FitnessTrainConfig:
    """How :func:`train_classifier` trains; defaults train 128² TB screening on ~460 images in ~50 s on one core."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3  # 2e-3 left one seed in three at chance for most of its 20 epochs
    weight_decay: float = 1e-3
    shift_px: int = 6  # random translation (augmentation), pixels each way
    width: int = 8  # SmallCNNConfig.width
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.shift_px < 0:
            raise ValueError(f"FitnessTrainConfig: need epochs, batch_size >= 1, lr > 0, shift_px >= 0; "
                             f"got {self}")


def trainer_config(config: FitnessTrainConfig, seed: int) -> ClassifierConfig:
    """The classifier trainer's configuration that :func:`train_classifier` runs.

    TB task, the small CNN (``width``, ``dropout``), AdamW with its cosine decay, the last
    epoch kept (``train.select: last``, no early stopping), no bootstrap; the only augmentation
    is a random translation of up to ``shift_px`` pixels each way, edges repeated, on every
    image. On the CPU: the caller's torch RNG is then the only one training draws from (see
    :func:`train_classifier`).
    """
    s = SmallCNN.input_size
    return ClassifierConfig(
        seed=seed, device="cpu", task="tb",
        data=ClassifierDataConfig(size=s, on_device=False),
        model=ModelConfig(name="small_cnn", options={"width": config.width, "dropout": config.dropout}),
        optim=OptimConfig(lr=config.lr, weight_decay=config.weight_decay),
        augment=AugmentConfig(enabled=config.shift_px > 0, degrees=0.0, scale=(1.0, 1.0),
                              translate=config.shift_px / s, brightness=0.0, contrast=0.0, p=1.0),
        train=ClassifierTrainConfig(batch_size=config.batch_size, epochs=config.epochs, patience=0, select="last",
                                    keep_last=1),
        eval=EvalConfig(n_boot=0))


def _image_set(name: str, images: np.ndarray, labels: np.ndarray) -> ImageSet:
    """Arrays as one of the trainer's prepared sets (one patient per image, named by its index)."""
    task = get_task("tb")
    y = np.asarray(labels, dtype=np.float32).reshape(-1, 1)
    records = [Sample(image=f"image-{i}", patient_id=f"subject-{i}", site="phantom", labels=y[i],
                      label_names=task.label_names) for i in range(len(y))]
    return ImageSet(name, records, torch.as_tensor(images)[:, None], y, task.targets(y))


def train_classifier(images: np.ndarray, labels: np.ndarray, seed: int,
                     config: FitnessTrainConfig = FitnessTrainConfig()) -> tuple[SmallCNN, list[float]]:
    """Train a :class:`SmallCNN` for a binary label; return it and the mean loss of each epoch.

    ``images``: (N, S, S) float in the network's ``input_range``, S = ``SmallCNN.input_size``.
    The classifier trainer does the training (:func:`classifiers.trainer.train` with
    :func:`trainer_config`, on prepared sets, in a temporary run folder): binary cross-entropy
    on the logit, ``−[y log σ(z) + (1 − y) log(1 − σ(z))]``, AdamW with a cosine learning-rate
    decay, exact batch-norm statistics over the training images before each validation.

    Validation: none. Every image trains and the last epoch is kept (``train.select: last``),
    as this check has always trained. Holding out a stratified validation part instead (one
    subject per image, so at the patient level) and keeping the best validation AUROC was
    tried and not adopted: it trains on fewer images, and on a small validation part the AUROC
    saturates at 1 after an epoch or two and the earliest such epoch is kept (on the 24-image
    test set, epoch 1 of 8: AUROC 0.61 on fresh images). The trainer still wants a validation
    set for its per-epoch log and its thresholds, both discarded here: it gets the training
    images, so nothing about validation is reported. The returned network holds the last
    epoch's weights with exact batch-norm statistics over the training images.

    Every random choice (initialization, batch order, augmentation, dropout) follows
    ``seed``; the caller's global torch, numpy and python RNG states are restored afterwards,
    so training has no effect on anything else.
    """
    x = np.asarray(images, dtype=np.float32)
    y = np.asarray(labels, dtype=np.float32).reshape(-1)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"train_classifier: {x.shape[0]} images for {y.shape[0]} labels")
    s = SmallCNN.input_size
    if x.ndim != 3 or x.shape[1:] != (s, s):
        raise ValueError(f"train_classifier: expected (N, {s}, {s}) images, got {x.shape}")
    sets = {k: _image_set(k, x, y) for k in ("train", "val")}  # validation = training images (see above)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="fitness-") as run_dir:
            result = train(trainer_config(config, seed), run_dir, echo=lambda _msg: None, sets=sets)
            with open(Path(run_dir) / "summary.csv", newline="", encoding="utf-8") as f:
                losses = [float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]
            model = load_classifier(result.best).model.net  # the SmallCNN inside the trainer's wrapper
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    model.eval()
    return model, losses


def predict(model: SmallCNN, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits of the first output for (N, S, S) images, as float64."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))[:, None]
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model(x[start:start + batch_size])[:, 0])
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def network_input(image: np.ndarray, size: int = SmallCNN.input_size) -> np.ndarray:
    """A decoded [0, 1] image as the network wants it: long side ``size``, padded square."""
    return resize_square(np.asarray(image, dtype=np.float32), size, "pad")


# --------------------------------------------------------------------------------------------
# Truth: boxes, masks, regions
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TruthLesion:
    """One lesion from the truth manifest (box in image pixels, exclusive ends)."""

    finding: str
    kind: str
    box: tuple[int, int, int, int]
    region: str = "lung"


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x0, y0, x1, y1) box of a boolean mask, exclusive ends; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


PLEURA_BELOW = 0.25  # a pleural collection reaches this fraction of the field's height below it
# ... and this fraction of its width beside it: a frame rotated by a few degrees swings the
# recess below the field sideways past the field's own outer columns
PLEURA_SIDE = 0.03


def _inside(box: Sequence[int], outer: Sequence[int]) -> bool:
    return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]


def check_lesion_boxes(lung_mask: np.ndarray, lesions: Sequence[TruthLesion],
                       lesion_masks: Sequence[np.ndarray] | None = None,
                       min_inside: float = 0.99) -> list[str]:
    """Problems with one image's lesions, one line each (empty list: all good).

    * every box is non-empty and inside the image;
    * a ``"lung"`` lesion's box lies inside the lung field (the bounding box of both lungs) and,
      given its mask, at least ``min_inside`` of the mask's pixels are lung pixels;
    * a ``"heart"`` lesion (cardiomegaly, hiatal hernia) lies in the thorax: between the lungs'
      outer edges, below their apices, its centre above their bases (the heart rests on the
      diaphragm, so an enlarged one may reach below the lowest lung pixel in projection);
    * a ``"pleura"`` lesion (effusion) starts inside the lung field, reaches at most
      :data:`PLEURA_BELOW` of the field's height below it (the fluid fills the posterior
      recess behind the diaphragm) and :data:`PLEURA_SIDE` of its width beside it, and some
      of its mask is lung;
    * given masks, each box is exactly the tight box of its mask.
    """
    lung = np.asarray(lung_mask) > 0
    h, w = lung.shape
    field = mask_box(lung)
    problems: list[str] = []
    if lesion_masks is not None and len(lesion_masks) != len(lesions):
        return [f"{len(lesion_masks)} lesion masks for {len(lesions)} boxes"]
    for k, les in enumerate(lesions):
        name = f"lesion {k} ({les.finding}/{les.kind}) box {list(les.box)}"
        x0, y0, x1, y1 = les.box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            problems.append(f"{name}: empty or outside the {w}x{h} image")
            continue
        if les.region not in ("lung", "heart", "pleura"):
            problems.append(f"{name}: unknown region {les.region!r}")
            continue
        if field is None:
            problems.append(f"{name}: the image has no lung field")
            continue
        if les.region == "lung" and not _inside(les.box, field):
            problems.append(f"{name}: outside the lung field {list(field)}")
        if les.region == "heart" and not (field[0] <= x0 and x1 <= field[2] and field[1] <= y0
                                          and (y0 + y1) / 2 < field[3]):
            problems.append(f"{name}: heart-region lesion outside the thorax (lung field {list(field)})")
        if les.region == "pleura":
            side, below = PLEURA_SIDE * (field[2] - field[0]), PLEURA_BELOW * (field[3] - field[1])
            if not (field[0] - side <= x0 and x1 <= field[2] + side and field[1] <= y0 < field[3]
                    and y1 <= field[3] + below):
                problems.append(f"{name}: pleural lesion outside the lung field and its recess {list(field)}")
        if lesion_masks is None:
            continue
        m = np.asarray(lesion_masks[k]) > 0
        if m.shape != lung.shape:
            problems.append(f"{name}: mask is {m.shape[1]}x{m.shape[0]}, image {w}x{h}")
            continue
        tight = mask_box(m)
        if tight != tuple(les.box):
            problems.append(f"{name}: does not match its mask's box {list(tight) if tight else None}")
        if les.region == "lung" and m.any():
            inside = float(lung[m].mean())
            if inside < min_inside:
                problems.append(f"{name}: only {inside:.0%} of its mask is lung")
        if les.region == "pleura" and m.any() and not (lung & m).any():
            problems.append(f"{name}: no pixel of its mask is lung")
    return problems


# --------------------------------------------------------------------------------------------
# Reading a phantom tree
# --------------------------------------------------------------------------------------------

def read_manifest(root: Path) -> list[dict[str, Any]]:
    """Rows of ``phantom_truth/manifest.csv``; ``findings`` as a tuple, boxes as TruthLesions."""
    path = Path(root) / TRUTH_MANIFEST
    if not path.is_file():
        raise DataError(path, "no truth manifest (not a tree written by `cxr phantom`)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["findings"] = tuple(x for x in r["findings"].split("|") if x)
        r["boxes"] = [TruthLesion(b["finding"], b["kind"], tuple(int(v) for v in b["box"]),
                                  b.get("region", "lung")) for b in json.loads(r["boxes"])]
        r["lesion_masks"] = json.loads(r["lesion_masks"])
    return rows


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def check_truth_boxes(root: Path, rows: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """:func:`check_lesion_boxes` over every subject of a tree (its lung and lesion masks)."""
    root = Path(root)
    rows = read_manifest(root) if rows is None else rows
    problems: list[str] = []
    n_boxes = 0
    kinds: dict[str, int] = {}
    for r in rows:
        if not r["boxes"]:
            continue
        lung = _read_mask(root / r["lung_mask"])
        masks = [_read_mask(root / p) for p in r["lesion_masks"]]
        n_boxes += len(r["boxes"])
        for b in r["boxes"]:
            kinds[f"{b.finding}/{b.kind}"] = kinds.get(f"{b.finding}/{b.kind}", 0) + 1
        problems += [f"{r['subject_id']}: {p}" for p in check_lesion_boxes(lung, r["boxes"], masks)]
    return {"subjects": len(rows), "boxes": n_boxes, "kinds": dict(sorted(kinds.items())),
            "problems": problems, "ok": not problems}


def expected_labels(preset: str, findings: Sequence[str]) -> set[str]:
    """The labels a loader should report for an image whose subject has ``findings``."""
    if preset == "nlm":
        return {TB} if TB in findings else set()
    if preset == "nine":
        return {findings[0]} if findings else {"No Finding"}
    return set(findings)


def check_loaders(root: Path, preset: str, rows: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Load each tree of a phantom folder with the foundation loaders and compare to the truth.

    Per tree: the detected layout, images expected and read, label mismatches (the loader's
    positive labels vs :func:`expected_labels`), images missing, loader problems, and for the
    NLM sets the readings' sex and age vs the subject's.
    """
    root = Path(root)
    rows = read_manifest(root) if rows is None else rows
    trees = {"shenzhen": W.SHENZHEN_DIR, "montgomery": W.MONTGOMERY_DIR} if preset == "nlm" \
        else {preset: ""}
    out: dict[str, Any] = {}
    for tree, folder in trees.items():
        base = root / folder if folder else root
        expected = {r["image"][len(folder) + 1:] if folder else r["image"]: r
                    for r in rows if r["tree"] == tree}
        ds = load_tree(base, skip_bad=True)  # collect every problem rather than stop at one
        seen, mismatched, demographics, positives = set(), [], [], {}
        for rec in ds.records:
            rel = Path(rec.image).resolve().relative_to(base.resolve()).as_posix()
            seen.add(rel)
            for name in rec.findings:
                positives[name] = positives.get(name, 0) + 1
            truth = expected.get(rel)
            if truth is None:
                mismatched.append(f"{rel}: not in the truth manifest")
                continue
            want = expected_labels(preset, truth["findings"])
            got = set(rec.findings)
            if got != want:
                mismatched.append(f"{rel}: loader labels {sorted(got)}, truth {sorted(want)}")
            if preset == "nlm" and (rec.sex != truth["sex"] or rec.age is None
                                    or int(rec.age) != int(float(truth["age"]))):
                demographics.append(f"{rel}: reading says {rec.sex} {rec.age}, truth "
                                    f"{truth['sex']} {truth['age']}")
        missing = sorted(set(expected) - seen)
        out[tree] = {
            "layout": ds.layout, "expected": len(expected), "read": len(ds.records),
            "positives": dict(sorted(positives.items())),
            "label_mismatches": mismatched, "missing": missing,
            "demographic_mismatches": demographics,
            "problems": [str(p) for p in ds.problems],
        }
        out[tree]["ok"] = (len(ds.records) == len(expected) and not mismatched and not missing
                           and not demographics and not ds.problems)
    return out
