"""Patient-level, label-stratified, seeded train/val/test splits.

Leakage is the classic error of chest X-ray papers (the same patient's follow-up films in
train and test), so every split here assigns whole *patients*. Stratification uses iterative
stratification at patient level (Sechidis et al., 2011): patients are visited rarest label
first and each goes to the split whose quota for that label is furthest from met, so even
rare multi-label findings keep their prevalence in every split. When the source ships an
official split (NIH ``train_val_list.txt`` / ``test_list.txt``) it is kept and only the
validation set is carved, by patient, out of its training part.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from cxr.data.record import Sample
from cxr.errors import ConfigError

SPLITS = ("train", "val", "test")


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) == 0 or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ConfigError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    return f


def stratified_patient_split(patient_ids: Sequence[str], labels: np.ndarray,
                             fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                             names: Sequence[str] = SPLITS) -> np.ndarray:
    """Assign every image a split name so that no patient spans two splits.

    ``labels`` is (N, L) with 1/0/NaN (NaN counts as not positive). Returns an object array of
    split names, one per image. Pure: same inputs and seed, same answer.
    """
    frac = _check_fractions(fractions)
    if len(names) != len(frac):
        raise ConfigError(f"{len(names)} split names for {len(frac)} fractions")
    labels = np.nan_to_num(np.asarray(labels, dtype=np.float64).reshape(len(patient_ids), -1)) > 0.5
    codes, uniques = pd.factorize(pd.Series(list(patient_ids), dtype="object"), sort=True)
    n_pat, n_lab = len(uniques), labels.shape[1]
    # Per patient: images, and positives per label (images with the finding).
    pat_images = np.bincount(codes, minlength=n_pat).astype(np.float64)
    pat_pos = np.zeros((n_pat, n_lab))
    np.add.at(pat_pos, codes, labels)
    want_img = frac * pat_images.sum()
    want_pos = frac[:, None] * pat_pos.sum(0)[None, :]
    have_img = np.zeros(len(frac))
    have_pos = np.zeros((len(frac), n_lab))

    rng = np.random.default_rng(seed)
    totals = pat_pos.sum(0)
    rarity = np.where(pat_pos > 0, totals[None, :], np.inf)
    rarest = rarity.argmin(1)  # the patient's rarest positive label
    rarest_count = rarity.min(1)  # inf for patients with no positive label
    # Rarest label first; within it, patients with many images first (they are the hardest to
    # place once quotas fill up); random order among equals.
    order = np.lexsort((rng.random(n_pat), -pat_images, rarest_count))
    safe_img = np.where(want_img > 0, want_img, 1.0)
    assign = np.empty(n_pat, dtype=np.int64)
    for p in order:
        # Deficits are relative to each split's quota, so a 10% split is not starved by a 70% one.
        img_deficit = (want_img - have_img) / safe_img
        if np.isfinite(rarest_count[p]):
            lab = rarest[p]
            score = (want_pos[:, lab] - have_pos[:, lab]) / np.maximum(want_pos[:, lab], 1e-9)
            score = score + 0.1 * img_deficit
        else:
            score = img_deficit
        score = np.where(frac > 0, score, -np.inf)
        s = int(np.argmax(score))
        assign[p] = s
        have_img[s] += pat_images[p]
        have_pos[s] += pat_pos[p]
    return np.asarray(names, dtype=object)[assign[codes]]


def split_records(records: Sequence[Sample], fractions: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int = 0, use_official: bool = True) -> dict[str, list[Sample]]:
    """Split records into ``{"train", "val", "test"}`` by patient.

    With ``use_official`` and records that carry an official split (``sample.split`` of
    ``"train"``/``"test"``), the official test set is kept as is and validation is carved by
    patient out of the official training part in the proportion val / (train + val).
    """
    records = list(records)
    if not records:
        return {name: [] for name in SPLITS}
    official = [r.split for r in records]
    if use_official and all(s in SPLITS for s in official) and "test" in official:
        frac = _check_fractions(fractions)
        out: dict[str, list[Sample]] = {"test": [r for r in records if r.split == "test"]}
        trainval = [r for r in records if r.split != "test"]
        inner = frac[:2] / frac[:2].sum() if frac[:2].sum() > 0 else np.array([1.0, 0.0])
        names = stratified_patient_split([r.patient_id for r in trainval],
                                         np.stack([r.labels for r in trainval]) if trainval else np.zeros((0, 1)),
                                         inner, seed, names=("train", "val"))
        out["train"] = [r for r, n in zip(trainval, names) if n == "train"]
        out["val"] = [r for r, n in zip(trainval, names) if n == "val"]
        return out
    labels = np.stack([r.labels for r in records])
    names = stratified_patient_split([r.patient_id for r in records], labels, fractions, seed)
    return {name: [r for r, n in zip(records, names) if n == name] for name in SPLITS}
