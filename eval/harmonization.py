"""The harmonization audit, ``cxr evaluate harmonization``: does a harmonizer make one site's
images look like another's without erasing or inventing disease?

Given the source tree, its harmonized copy (same files, new pixels: ``cxr harmonize``,
``cxr translate``) and the reference (target-site) tree, four sections:

(a) **indistinguishability**: cross-validated AUROC of three domain detectors telling images
    from the reference tree, before (source vs reference) and after (harmonized vs reference):
    logistic regression on 32-bin intensity histograms (:mod:`eval.domain_gap`), the same on
    the histogram of a Laplacian residual (texture, :func:`cxr.metrics.harmonization.highpass_features`),
    and a small CNN on the images. Folds are patient-level (``StratifiedGroupKFold``, seeded);
    the AUROC is that of the pooled out-of-fold scores with a 95 % patient-bootstrap interval.
    0.5 = indistinguishable, 1.0 = a detector tells them apart every time.
(b) **disease preservation** (``--classifier RUN``): a fixed TB classifier's probabilities on
    the source and the harmonized image of each patient; agreement, label-flip rate at the
    threshold it stored on validation (``thresholds.json``; 0.5 when none), mean ``|Δp|``,
    with patient-bootstrap intervals, and its AUROC on each where the tree has labels.
(c) **erasure and hallucination** (``--truth PHANTOM``): each true lesion's contrast to its
    surrounding lung before and after (erased: fell by more than half), and lesion-like
    changes in the lung fields away from true lesions (:mod:`cxr.metrics.harmonization`).
(d) **paired fidelity** (``--truth``): SSIM and PSNR to the phantom's true render of the same
    subject by the reference site (:func:`eval.paired.pair_metrics`, beside the source's own),
    and LPIPS (AlexNet) only when its weights are in the local torch cache
    (:func:`eval.generative.lpips_available`); the report says which ran.

Everything is written into a temporary folder beside ``--out`` and renamed into place when
complete (as ``cxr evaluate gan`` does): ``audit.json``, ``audit.csv`` (one row per figure),
``per_image.csv`` and ``contact_sheet.png`` (source | harmonized | true target render |
difference). :func:`quick_audit` gives the cheap part (flip rate, histogram detector AUROC)
for several harmonized trees at once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from classifiers.predict import load_classifier, predict_tree
from cxr.data import preprocess
from cxr.data.image import load_image
from cxr.data.io import atomic_write_text, staged_tree
from cxr.data.layouts import load_tree
from cxr.data.record import Sample
from cxr.data.rewrite import check_out
from cxr.data.splits import split_records
from cxr.errors import ConfigError, DataError
from cxr.metrics import harmonization as hm
from cxr.metrics.classification import auroc
from cxr.metrics.intervals import NAN_INTERVAL, patient_bootstrap
from cxr.phantom.sheet import fit_tile, save_png
from eval.domain_gap import histogram_features
from eval.generative import PairDissimilarity, lpips_available
from eval.paired import TRUTH_DIR, pair_metrics, summarize

DETECTORS = ("histogram", "texture", "cnn")
SPLITS = ("all", "train", "val", "test")
SHEET_ROWS = 6
SHEET_TILE = 128


@dataclass(frozen=True)
class AuditOptions:
    source: Path
    harmonized: Path
    reference: Path
    out: Path
    classifier: Path | None = None
    truth: Path | None = None
    split: str = "all"  # which of the source's patient-level splits is audited
    size: int = 64  # square side the detectors see
    folds: int = 5
    seed: int = 0
    detectors: tuple[str, ...] = DETECTORS
    cnn_epochs: int = 8
    n_boot: int = 1000
    device: str = "cpu"
    overwrite: bool = False


@dataclass
class Pairs:
    """The audited images: source and harmonized file of each, keyed by path in the tree."""

    keys: list[str]
    source: list[Sample]
    harmonized: list[Sample]
    patients: list[str]
    reference: list[Sample]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Inputs


def _key_of(image: str, root: Path) -> str:
    """An image's name inside its tree (the member of a zip archive)."""
    image = str(image)
    if "!/" in image:
        return image.split("!/", 1)[1]
    return Path(os.path.relpath(image, root)).as_posix()


def _key(record: Sample, root: Path) -> str:
    return _key_of(record.image, root)


def _records(path: Path, flag: str) -> list[Sample]:
    if not path.exists():
        raise DataError(path, f"{flag}: no such folder or archive")
    return list(load_tree(path).records)


def read_pairs(source: Path, harmonized: Path, reference: Path, split: str = "all", seed: int = 0) -> Pairs:
    """Match the harmonized tree's images to the source's by path; check the reference."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    src = _records(source, "--source")
    if not src:
        raise DataError(source, "--source: the tree holds no images")
    ref = _records(reference, "--reference")
    if len(ref) < 2:
        raise DataError(reference, f"--reference: {len(ref)} image(s); a domain detector needs at least 2")
    harm = {_key(r, harmonized): r for r in _records(harmonized, "--harmonized")}
    by_key = {_key(r, source): r for r in src}
    missing = sorted(set(by_key) - set(harm))
    extra = sorted(set(harm) - set(by_key))
    if missing or extra:
        what = (f"{len(missing)} of the source's {len(by_key)} images are missing (e.g. {missing[0]})" if missing
                else f"{len(extra)} images are not in the source tree (e.g. {extra[0]})")
        raise DataError(harmonized, f"--harmonized is not a copy of --source {source}: {what}")
    if split != "all":
        chosen = {r.image for r in split_records(src, seed=seed)[split]}
        by_key = {k: r for k, r in by_key.items() if r.image in chosen}
        if not by_key:
            raise DataError(source, f"--split {split}: no images in that split")
    keys = sorted(by_key)
    return Pairs(keys, [by_key[k] for k in keys], [harm[k] for k in keys], [by_key[k].patient_id for k in keys], ref)


def square_images(records: Sequence[Sample], size: int) -> np.ndarray:
    """(N, size, size) float32 [0, 1] images, the centre square of each (cropped, not padded: the
    black padding of a landscape frame would tell a detector the site by aspect ratio alone)."""
    pre = preprocess.Preprocess(size=size, fit="crop")
    return np.stack([preprocess.apply(load_image(r.image), pre) for r in records]).astype(np.float32) \
        if records else np.zeros((0, size, size), np.float32)


# ----------------------------------------------------------------------------------------------
# (a) domain detectors


def _folds(y: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    per_class = min(len(set(g for g, c in zip(groups, y) if c == k)) for k in (0, 1))
    k = min(folds, per_class)
    if k < 2:
        raise DataError("domain detector", f"too few patients for cross-validation ({per_class} in one set)")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y, groups))


def _logistic_scores(x: np.ndarray, y: np.ndarray, splits) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.zeros(len(y))
    for train, test in splits:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        model.fit(x[train], y[train])
        out[test] = model.predict_proba(x[test])[:, 1]
    return out


class TinyDetector(nn.Module):
    """Three strided 3×3 convolutions and a linear head on global average pooling: enough to
    pick up a site's texture, gray levels or borders, small enough to train per fold on a CPU."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).mean(dim=(2, 3))).squeeze(1)


def _cnn_scores(images: np.ndarray, y: np.ndarray, splits, epochs: int, seed: int, device: str) -> np.ndarray:
    x = torch.from_numpy(images[:, None])
    t = torch.from_numpy(y.astype(np.float32))
    out = np.zeros(len(y))
    for f, (train, test) in enumerate(splits):
        torch.manual_seed(seed * 1000 + f)
        gen = torch.Generator().manual_seed(seed * 1000 + f)
        model = TinyDetector().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        pos = float(t[train].mean())
        weight = torch.tensor([1.0 / max(1 - pos, 1e-3), 1.0 / max(pos, 1e-3)])
        tr = torch.as_tensor(train)
        for _ in range(epochs):
            for b in tr[torch.randperm(len(tr), generator=gen)].split(32):
                xb, yb = x[b].to(device), t[b].to(device)
                loss = nn.functional.binary_cross_entropy_with_logits(model(xb), yb, weight=weight[yb.long()].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            out[test] = torch.sigmoid(model(x[torch.as_tensor(test)].to(device))).cpu().numpy()
    return out


def detector_auroc(kind: str, images: np.ndarray, y: np.ndarray, groups: Sequence[str], folds: int = 5,
                   seed: int = 0, n_boot: int = 1000, cnn_epochs: int = 8, device: str = "cpu") -> dict[str, float]:
    """Cross-validated AUROC (pooled out-of-fold scores, patient-level folds) of detector
    ``kind`` telling ``y == 1`` images from ``y == 0``, with a 95 % patient-bootstrap interval."""
    y = np.asarray(y, dtype=np.int64)
    splits = _folds(y, groups, folds, seed)
    if kind == "histogram":
        scores = _logistic_scores(histogram_features(images), y, splits)
    elif kind == "texture":
        scores = _logistic_scores(hm.highpass_features(images), y, splits)
    elif kind == "cnn":
        scores = _cnn_scores(images, y, splits, cnn_epochs, seed, device)
    else:
        raise ConfigError(f"unknown domain detector {kind!r} (choose from {', '.join(DETECTORS)})")
    value = auroc(y, scores)
    lo, hi = patient_bootstrap(lambda i: {"a": auroc(y[i], scores[i])}, len(y), list(groups), n_boot, seed)["a"] \
        if n_boot else NAN_INTERVAL
    return {"auroc": value, "lo": lo, "hi": hi, "folds": len(splits), "n": int(len(y)), "n_target": int(y.sum())}


def indistinguishability(candidates: Mapping[str, np.ndarray], candidate_patients: Sequence[str],
                         reference: np.ndarray, reference_patients: Sequence[str],
                         detectors: Sequence[str] = DETECTORS, folds: int = 5, seed: int = 0,
                         n_boot: int = 1000, cnn_epochs: int = 8, device: str = "cpu") -> dict[str, dict[str, dict]]:
    """``{detector: {candidate name: detector_auroc}}`` of each candidate set vs the reference set
    (the reference is label 0, the candidate label 1)."""
    groups = [f"ref:{p}" for p in reference_patients] + [f"cand:{p}" for p in candidate_patients]
    out: dict[str, dict[str, dict]] = {}
    for kind in detectors:
        out[kind] = {}
        for name, images in candidates.items():
            x = np.concatenate([reference, images])
            y = np.r_[np.zeros(len(reference)), np.ones(len(images))]
            out[kind][name] = detector_auroc(kind, x, y, groups, folds, seed, n_boot, cnn_epochs, device)
    return out


# ----------------------------------------------------------------------------------------------
# (b) a fixed classifier's decisions


def classifier_probabilities(checkpoint: Path, tree: Path, keys: Sequence[str], workdir: Path,
                             device: str = "cpu") -> np.ndarray:
    """The classifier's TB probability for each image ``keys`` names in ``tree`` (via :func:`predict_tree`)."""
    csv_path = workdir / f"predictions-{uuid.uuid4().hex[:8]}.csv"
    predict_tree(checkpoint, tree, csv_path, device=device, workers=0)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    csv_path.unlink()
    label = next(c for c in rows[0] if c.startswith("p_"))
    by_key = {}
    for r in rows:
        by_key[_key_of(r["image"], tree)] = float(r[label])
    return np.array([by_key.get(k, math.nan) for k in keys])


def classifier_threshold(checkpoint: Path) -> tuple[float, str]:
    """The decision threshold stored with a binary classifier (chosen on validation), and where from."""
    clf = load_classifier(checkpoint)
    if clf.task.kind == "multiclass" or len(clf.task.label_names) != 1:
        raise ConfigError(f"--classifier {checkpoint}: task {clf.task.name!r} is not a single-label binary task "
                          "(the audit flips one decision per image)")
    if clf.thresholds is None:
        return 0.5, "0.5 (no validation threshold stored)"
    return float(np.asarray(clf.thresholds).reshape(-1)[0]), "validation (thresholds.json)"


def disease_preservation(checkpoint: Path, pairs: Pairs, source: Path, harmonized: Path, workdir: Path,
                         n_boot: int = 1000, seed: int = 0, device: str = "cpu") -> tuple[dict, np.ndarray, np.ndarray]:
    """Section (b): the decision changes and, where labelled, each tree's AUROC."""
    thr, where = classifier_threshold(checkpoint)
    p_src = classifier_probabilities(checkpoint, source, pairs.keys, workdir, device)
    p_harm = classifier_probabilities(checkpoint, harmonized, pairs.keys, workdir, device)
    out: dict[str, Any] = {"threshold": thr, "threshold_from": where, "n": len(pairs.keys),
                           **hm.prediction_changes_ci(p_src, p_harm, thr, pairs.patients, n_boot, seed)}
    y = np.array([float(r.labels[0]) if r.labels.size else math.nan for r in pairs.source])
    if np.isfinite(y).any():
        out["auroc_source"], out["auroc_harmonized"] = auroc(y, p_src), auroc(y, p_harm)
    return out, p_src, p_harm


# ----------------------------------------------------------------------------------------------
# (c) and (d): the phantom's truth


@dataclass(frozen=True)
class Truth:
    """One image's truth: lung labels, lesion masks, the target site's render."""

    lung: Path | None
    lesions: tuple[Path, ...]
    render: Path | None


def _norm(path: Path) -> str:
    return os.path.normpath(os.path.abspath(str(path)))


def read_truth(root: Path, source_records: Sequence[Sample], reference_records: Sequence[Sample]
               ) -> tuple[dict[str, Truth], str]:
    """``{image path: Truth}`` for the source images the phantom manifest knows, and the
    reference site's name (whose renders are the paired truth)."""
    manifest = root / TRUTH_DIR / "manifest.csv"
    if not manifest.is_file():
        raise DataError(manifest, "--truth: no phantom truth manifest (write the phantom with `cxr phantom`)")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_image = {_norm(root / r["image"]): r for r in rows if r.get("image")}
    sites = [c[len("render_"):] for c in (rows[0] if rows else {}) if c.startswith("render_")]
    ref_sites = {by_image[_norm(Path(r.image))]["tree"] for r in reference_records if _norm(Path(r.image)) in by_image}
    src_sites = {by_image[_norm(Path(r.image))]["tree"] for r in source_records if _norm(Path(r.image)) in by_image}
    target = next(iter(ref_sites), None) if len(ref_sites) == 1 else None
    if target is None:
        others = [s for s in sites if s not in src_sites]
        target = others[0] if len(others) == 1 else None
    if target is None or target not in sites:
        raise DataError(manifest, f"--truth: cannot tell which site's renders match --reference (sites: {', '.join(sites)})")
    out = {}
    for r in source_records:
        row = by_image.get(_norm(Path(r.image)))
        if row is None:
            continue
        lesions = []
        boxes = json.loads(row.get("boxes") or "[]")
        for k, m in enumerate(json.loads(row.get("lesion_masks") or "[]")):
            region = boxes[k].get("region", "lung") if k < len(boxes) else "lung"
            if region != "heart":  # an enlarged heart is no lesion with a surround
                lesions.append(root / m)
        render = row.get(f"render_{target}")
        out[r.image] = Truth(root / row["lung_mask"] if row.get("lung_mask") else None, tuple(lesions),
                             root / render if render else None)
    return out, target


def truth_sections(pairs: Pairs, truth: Mapping[str, Truth], size: int, n_boot: int = 1000, seed: int = 0,
                   device: str = "cpu", settings: hm.BlobSettings = hm.BlobSettings()
                   ) -> tuple[dict, dict, list[dict]]:
    """Sections (c) and (d) and per-image rows, for the pairs the truth covers."""
    notes: list[str] = []
    have = [i for i, r in enumerate(pairs.source) if r.image in truth]
    if len(have) < len(pairs.keys):
        notes.append(f"no phantom truth for {len(pairs.keys) - len(have)} of {len(pairs.keys)} images "
                     f"(e.g. {pairs.keys[next(i for i in range(len(pairs.keys)) if i not in set(have))]}): "
                     "left out of erasure, hallucination and paired scores")
    no_lung = sum(1 for i in have if truth[pairs.source[i].image].lung is None)
    if no_lung:
        notes.append(f"no lung mask for {no_lung} of {len(have)} images: hallucinations searched in the "
                     "central 70 % of the image instead")
    lesion_rows, image_rows, paired_src, paired_harm = [], [], [], []
    lpips_pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for i in have:
        t = truth[pairs.source[i].image]
        src = load_image(pairs.source[i].image)
        harm = load_image(pairs.harmonized[i].image)
        if src.shape != harm.shape:
            raise DataError(pairs.harmonized[i].image, f"shape {harm.shape} differs from the source's {src.shape}")
        lung = load_image(t.lung) > 0 if t.lung else preprocess.centre_mask(src.shape, 0.7)
        masks = [load_image(m) > 0.5 for m in t.lesions]
        for k, m in enumerate(masks):
            cs, ch = hm.lesion_contrast(src, m, lung), hm.lesion_contrast(harm, m, lung)
            lesion_rows.append({"image": pairs.keys[i], "patient": pairs.patients[i], "lesion": k,
                                "area": int(m.sum()), "contrast_source": cs, "contrast_harmonized": ch})
        union = np.any(masks, axis=0) if masks else None
        blobs = hm.residual_blobs(src, harm, lung, union, settings)
        row = {"image": pairs.keys[i], "patient": pairs.patients[i], "lesions": len(masks),
               "hallucinations": len(blobs)}
        if t.render is not None:
            target = load_image(t.render)
            if target.shape != harm.shape:
                raise DataError(t.render, f"truth render of shape {target.shape} does not fit the image's {harm.shape}")
            m_src, m_harm = pair_metrics(src, target, lung), pair_metrics(harm, target, lung)
            paired_src.append((m_src, pairs.patients[i]))
            paired_harm.append((m_harm, pairs.patients[i]))
            row.update({"ssim_source": m_src["ssim"], "ssim": m_harm["ssim"], "psnr": m_harm["psnr"]})
            lpips_pairs.append((src, harm, target))
        image_rows.append(row)

    cs = np.array([r["contrast_source"] for r in lesion_rows])
    ch = np.array([r["contrast_harmonized"] for r in lesion_rows])
    gone = hm.erased(cs, ch)
    for r, g in zip(lesion_rows, gone):
        r["erased"] = g
    lesion_patients = [r["patient"] for r in lesion_rows]
    erase, erase_ci = hm.mean_ci(gone, lesion_patients, n_boot, seed)
    _, kept = hm.contrast_kept(cs, ch)
    kept_mean, kept_ci = hm.mean_ci(kept, lesion_patients, n_boot, seed)
    counts = np.array([r["hallucinations"] for r in image_rows], np.float64)
    img_patients = [r["patient"] for r in image_rows]
    hall, hall_ci = hm.mean_ci(counts, img_patients, n_boot, seed)
    share, share_ci = hm.mean_ci((counts > 0).astype(np.float64), img_patients, n_boot, seed)
    section_c = {"n_images": len(image_rows), "n_lesions": len(lesion_rows),
                 "n_lesions_visible": int(np.isfinite(gone).sum()),
                 "erase_rate": erase, "erase_rate_lo": erase_ci[0], "erase_rate_hi": erase_ci[1],
                 "contrast_kept": kept_mean, "contrast_kept_lo": kept_ci[0], "contrast_kept_hi": kept_ci[1],
                 "hallucinations_per_image": hall, "hallucinations_per_image_lo": hall_ci[0],
                 "hallucinations_per_image_hi": hall_ci[1], "images_with_hallucination": share,
                 "images_with_hallucination_lo": share_ci[0], "images_with_hallucination_hi": share_ci[1],
                 "rule": {"visible_contrast": hm.VISIBLE_CONTRAST, "erase_fall": hm.ERASE_FALL,
                          "blobs": settings.__dict__}, "lesions": lesion_rows}

    section_d: dict[str, Any] = {}
    if paired_harm:
        ids = [p for _, p in paired_harm]
        section_d = {"source": summarize([m for m, _ in paired_src], ids, n_boot, seed),
                     "harmonized": summarize([m for m, _ in paired_harm], ids, n_boot, seed)}
        if lpips_available():
            measure = PairDissimilarity(size, torch.device(device))
            pre = preprocess.Preprocess(size=size, fit="pad")
            sq = [[preprocess.apply(a, pre) for a in trio] for trio in lpips_pairs]
            for name, col in (("source", 0), ("harmonized", 1)):
                d = measure(np.stack([s[col] for s in sq]), np.stack([s[2] for s in sq]))
                section_d[name]["lpips"] = float(d.mean())
            section_d["measures"] = ["ssim", "psnr", "lpips-alex"]
        else:
            section_d["measures"] = ["ssim", "psnr"]
            notes.append("LPIPS not computed: torchvision's AlexNet weights are not in the local torch cache")
    section_c["notes"] = notes
    return section_c, section_d, image_rows


# ----------------------------------------------------------------------------------------------
# The sheet and the files


def contact_sheet(pairs: Pairs, truth: Mapping[str, Truth], out: Path, rows: int = SHEET_ROWS,
                  tile: int = SHEET_TILE) -> Path:
    """Source | harmonized | true target render (blank where unknown) | difference (mid gray 0,
    ×2), for the first images with lesions (then any)."""
    from PIL import Image, ImageDraw

    order = sorted(range(len(pairs.keys)), key=lambda i: (-len(truth[pairs.source[i].image].lesions)
                                                          if pairs.source[i].image in truth else 0, i))
    chosen = order[:rows]
    cap = 12
    sheet = Image.new("L", (4 * tile, len(chosen) * (tile + cap) + cap), 0)
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(("source", "harmonized", "target truth", "difference x2")):
        draw.text((j * tile + 2, 0), name, fill=255)
    for row, i in enumerate(chosen):
        src, harm = load_image(pairs.source[i].image), load_image(pairs.harmonized[i].image)
        t = truth.get(pairs.source[i].image)
        target = load_image(t.render) if t is not None and t.render is not None else None
        diff = np.clip(0.5 + 2 * (harm - src), 0, 1) if harm.shape == src.shape else np.zeros_like(src)
        y = cap + row * (tile + cap)
        for col, img in enumerate((src, harm, target, diff)):
            if img is not None:
                sheet.paste(fit_tile(img, tile), (col * tile, y))
        draw.text((2, y + tile), pairs.keys[i][-30:], fill=255)
    return save_png(sheet, out)


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, Path):
        return str(v)
    return v


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def figures_csv(report: dict[str, Any]) -> str:
    """One row per figure: section, metric, condition, value, lo, hi."""
    rows = []
    for det, conds in report.get("indistinguishability", {}).items():
        for cond, r in conds.items():
            rows.append(("indistinguishability", f"domain_auroc_{det}", cond, r["auroc"], r["lo"], r["hi"]))
    b = report.get("disease_preservation") or {}
    for key in ("agreement", "flip_rate", "flip_pos_to_neg", "flip_neg_to_pos", "mean_abs_dp"):
        if key in b:
            rows.append(("disease_preservation", key, "harmonized", b[key], b[f"{key}_lo"], b[f"{key}_hi"]))
    for key in ("auroc_source", "auroc_harmonized"):
        if key in b:
            rows.append(("disease_preservation", key, "", b[key], None, None))
    c = report.get("erasure_hallucination") or {}
    for key in ("erase_rate", "contrast_kept", "hallucinations_per_image", "images_with_hallucination"):
        if key in c:
            rows.append(("erasure_hallucination", key, "harmonized", c[key], c[f"{key}_lo"], c[f"{key}_hi"]))
    d = report.get("paired_fidelity") or {}
    for cond in ("source", "harmonized"):
        for key in ("ssim", "psnr", "ssim_lung", "lpips"):
            if key in d.get(cond, {}):
                lo, hi = (d[cond].get("ssim_lo"), d[cond].get("ssim_hi")) if key == "ssim" else (None, None)
                rows.append(("paired_fidelity", key, cond, d[cond][key], lo, hi))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["section", "metric", "condition", "value", "lo", "hi"])
    for r in rows:
        w.writerow([_cell(x) for x in r])
    return buf.getvalue()


def per_image_csv(pairs: Pairs, p_src: np.ndarray | None, p_harm: np.ndarray | None, threshold: float | None,
                  image_rows: Sequence[dict]) -> str:
    by_key = {r["image"]: r for r in image_rows}
    head = ["image", "patient_id", "p_source", "p_harmonized", "flipped", "lesions", "hallucinations",
            "ssim_source", "ssim", "psnr"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for i, k in enumerate(pairs.keys):
        r = by_key.get(k, {})
        ps = float(p_src[i]) if p_src is not None else None
        ph = float(p_harm[i]) if p_harm is not None else None
        flip = int((ps >= threshold) != (ph >= threshold)) if ps is not None and threshold is not None else None
        w.writerow([_cell(x) for x in (k, pairs.patients[i], ps, ph, flip, r.get("lesions"), r.get("hallucinations"),
                                         r.get("ssim_source"), r.get("ssim"), r.get("psnr"))])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The audit


def audit_harmonization(opts: AuditOptions, echo: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the audit and write it into ``opts.out`` (see the module docstring); returns the report."""
    for src in (opts.source, opts.harmonized, opts.reference, *([opts.truth] if opts.truth else [])):
        check_out(src, opts.out, opts.overwrite)
    if opts.size < 16:
        raise DataError("--size", f"must be at least 16 pixels, got {opts.size}")
    if opts.folds < 2:
        raise DataError("--folds", f"must be at least 2, got {opts.folds}")
    bad = [d for d in opts.detectors if d not in DETECTORS]
    if bad:
        raise ConfigError(f"--detectors {','.join(bad)}: choose from {', '.join(DETECTORS)}")
    pairs = read_pairs(opts.source, opts.harmonized, opts.reference, opts.split, opts.seed)
    threshold = classifier_threshold(opts.classifier) if opts.classifier is not None else None
    truth: dict[str, Truth] = {}
    target = None
    if opts.truth is not None:
        truth, target = read_truth(opts.truth, pairs.source, pairs.reference)
        if not truth:
            raise DataError(opts.truth, f"--truth: the phantom manifest names none of the {len(pairs.keys)} "
                                        f"audited images of {opts.source}")
    with staged_tree(opts.out) as tmp:
        report = _audit(opts, pairs, truth, target, threshold, tmp, echo)
    return report


def _audit(opts: AuditOptions, pairs: Pairs, truth: dict[str, Truth], target: str | None,
           threshold: tuple[float, str] | None, tmp: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    notes: list[str] = []
    report: dict[str, Any] = {
        "source": opts.source, "harmonized": opts.harmonized, "reference": opts.reference,
        "classifier": opts.classifier, "truth": opts.truth, "split": opts.split, "seed": opts.seed,
        "n_images": len(pairs.keys), "n_patients": len(set(pairs.patients)), "n_reference": len(pairs.reference)}
    echo(f"(a) domain detectors at {opts.size}²: {len(pairs.keys)} images and {len(pairs.reference)} reference images")
    ref = square_images(pairs.reference, opts.size)
    cands = {"before": square_images(pairs.source, opts.size), "after": square_images(pairs.harmonized, opts.size)}
    report["indistinguishability"] = indistinguishability(
        cands, pairs.patients, ref, [r.patient_id for r in pairs.reference], opts.detectors, opts.folds, opts.seed,
        opts.n_boot, opts.cnn_epochs, opts.device)
    p_src = p_harm = None
    if opts.classifier is not None:
        echo(f"(b) classifier {opts.classifier} on both trees")
        with tempfile.TemporaryDirectory(prefix="cxr-audit-") as work:
            report["disease_preservation"], p_src, p_harm = disease_preservation(
                opts.classifier, pairs, opts.source, opts.harmonized, Path(work), opts.n_boot, opts.seed, opts.device)
    image_rows: list[dict] = []
    if truth:
        echo(f"(c, d) lesions, hallucinations and paired fidelity against {opts.truth} (target site {target})")
        c, d, image_rows = truth_sections(pairs, truth, opts.size, opts.n_boot, opts.seed, opts.device)
        notes += c.pop("notes")
        report["erasure_hallucination"] = c
        report["paired_fidelity"] = {"target_site": target, **d}
    for n in notes:
        echo(f"note: {n}")
    report["notes"] = notes
    report = jsonable(report)
    atomic_write_text(tmp / "audit.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(tmp / "audit.csv", figures_csv(report))
    atomic_write_text(tmp / "per_image.csv", per_image_csv(pairs, p_src, p_harm, threshold[0] if threshold else None,
                                                           image_rows))
    contact_sheet(pairs, truth, tmp / "contact_sheet.png")
    return report


def quick_audit(source: str | Path, harmonized: Mapping[str, str | Path], reference: str | Path,
                classifier: str | Path | None = None, split: str = "all", size: int = 64, seed: int = 0,
                n_boot: int = 200) -> dict[str, dict[str, float]]:
    """The cheap part of the audit for several harmonized copies of one source tree:
    ``{method: {"domain_auroc", "domain_auroc_lo", "domain_auroc_hi", "flip_rate", ...}}``, the
    histogram detector's AUROC against the reference and, given a classifier, its flip rate.
    ``"none"`` (the source itself) comes first. Nothing is written."""
    source, reference = Path(source), Path(reference)
    trees = {"none": source, **{k: Path(v) for k, v in harmonized.items()}}
    pairs = {name: read_pairs(source, tree, reference, split, seed) for name, tree in trees.items()}
    first = pairs["none"]
    ref = square_images(first.reference, size)
    ref_patients = [r.patient_id for r in first.reference]
    thr = classifier_threshold(Path(classifier))[0] if classifier is not None else None
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-audit-") as work:
        p0 = (classifier_probabilities(Path(classifier), source, first.keys, Path(work))
              if classifier is not None else None)
        for name, pr in pairs.items():
            a = indistinguishability({name: square_images(pr.harmonized, size)}, pr.patients, ref, ref_patients,
                                     ("histogram",), seed=seed, n_boot=n_boot)["histogram"][name]
            row = {"domain_auroc": a["auroc"], "domain_auroc_lo": a["lo"], "domain_auroc_hi": a["hi"]}
            if classifier is not None:
                p = classifier_probabilities(Path(classifier), trees[name], pr.keys, Path(work))
                row.update(hm.prediction_changes(p0, p, thr))
            out[name] = row
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """A few lines for the terminal."""
    def f(v: Any, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [f"{report['n_images']} images ({report['n_patients']} patients), {report['n_reference']} reference images"]
    for det, conds in report["indistinguishability"].items():
        b, a = conds["before"], conds["after"]
        lines.append(f"(a) {det:<9} domain AUROC before {f(b['auroc'])} [{f(b['lo'])}, {f(b['hi'])}]  "
                     f"after {f(a['auroc'])} [{f(a['lo'])}, {f(a['hi'])}]  (0.5 = indistinguishable)")
    b = report.get("disease_preservation")
    if b:
        lines.append(f"(b) flip rate {f(b['flip_rate'])} [{f(b['flip_rate_lo'])}, {f(b['flip_rate_hi'])}] at "
                     f"threshold {b['threshold']:.3f} ({b['threshold_from']}); agreement {f(b['agreement'])}; "
                     f"mean |dp| {f(b['mean_abs_dp'])}")
    c = report.get("erasure_hallucination")
    if c:
        lines.append(f"(c) erase rate {f(c['erase_rate'])} [{f(c['erase_rate_lo'])}, {f(c['erase_rate_hi'])}] of "
                     f"{c['n_lesions_visible']} visible lesions; hallucinations per image "
                     f"{f(c['hallucinations_per_image'])} [{f(c['hallucinations_per_image_lo'])}, "
                     f"{f(c['hallucinations_per_image_hi'])}]")
    d = report.get("paired_fidelity") or {}
    if d.get("harmonized"):
        h, s = d["harmonized"], d["source"]
        extra = f", LPIPS {f(h['lpips'])} (source {f(s['lpips'])})" if "lpips" in h else ""
        lines.append(f"(d) vs the true {d['target_site']} render: SSIM {f(h['ssim'])} (source {f(s['ssim'])}), "
                     f"PSNR {f(h['psnr'], '.2f')} dB (source {f(s['psnr'], '.2f')}){extra}; "
                     f"measures: {', '.join(d['measures'])}")
    return "\n".join(lines)
