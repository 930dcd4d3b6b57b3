"""Patient-level stratified splits, checked on the real NIH ChestX-ray14 metadata."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.data.record import NIH14, Sample
from cxr.data.splits import split_records, stratified_patient_split
from cxr.errors import ConfigError


@pytest.fixture(scope="module")
def nih():
    from cxr.data.sources.nih import read_nih_metadata, shipped_nih_metadata_path

    df = read_nih_metadata(shipped_nih_metadata_path())
    return df["patient_id"].astype(str).to_numpy(), df[list(NIH14)].to_numpy(dtype=np.float32)


def test_real_nih_split_has_no_leakage_and_keeps_prevalence(nih):
    pids, labels = nih
    assert len(pids) == 112_120 and len(set(pids)) == 30_805
    split = stratified_patient_split(pids, labels, (0.7, 0.1, 0.2), seed=0)
    sets = {name: set(pids[split == name]) for name in ("train", "val", "test")}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    whole = labels.mean(0)
    for name, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        m = split == name
        assert abs(m.mean() - frac) < 0.01
        assert np.abs(labels[m].mean(0) - whole).max() < 0.01, name  # within 1 percentage point


def test_split_is_seeded_and_pure():
    rng = np.random.default_rng(0)
    pids = rng.integers(0, 300, 1000).astype(str)
    labels = (rng.random((1000, 3)) < [0.3, 0.1, 0.02]).astype(np.float32)
    a = stratified_patient_split(pids, labels, seed=1)
    assert (a == stratified_patient_split(pids, labels, seed=1)).all()
    assert (a != stratified_patient_split(pids, labels, seed=2)).any()


def test_nan_labels_count_as_not_positive():
    pids = np.arange(100).astype(str)
    labels = np.full((100, 2), np.nan, np.float32)
    labels[:10, 0] = 1
    split = stratified_patient_split(pids, labels, (0.5, 0.0, 0.5), seed=0)
    assert set(split) == {"train", "test"}
    assert (split[:10] == "train").sum() == 5


def test_official_test_split_is_kept_and_val_carved_by_patient():
    recs = []
    for i in range(200):
        pid = f"p{i // 2}"
        recs.append(Sample(image=f"{i}.png", patient_id=pid, site="nih", labels=np.zeros(14), label_names=NIH14,
                           split="test" if i // 2 < 20 else "train"))
    out = split_records(recs, (0.7, 0.1, 0.2), seed=0)
    assert len(out["test"]) == 40 and all(r.split == "test" for r in out["test"])
    assert len(out["val"]) == pytest.approx(160 * 0.125, abs=2)
    assert not {r.patient_id for r in out["val"]} & {r.patient_id for r in out["train"]}


@pytest.mark.parametrize("fractions", [(0.5, 0.6), (-0.1, 0.6, 0.5), ()])
def test_bad_fractions(fractions):
    with pytest.raises(ConfigError):
        stratified_patient_split(["a"], np.zeros((1, 1)), fractions)
