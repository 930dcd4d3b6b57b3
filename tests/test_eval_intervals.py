"""Patient-level bootstrap, Student-t intervals over seeds, paired differences."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from cxr.data.tasks import get_task
from cxr.metrics import intervals as I
from cxr.metrics.classification import auroc, choose_thresholds


def _toy(n: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.float64)
    return y, 1 / (1 + np.exp(-rng.normal(signal * (2 * y - 1), 1.0)))


def _auroc_fn(y, s):
    return lambda idx: {"auroc": auroc(y[idx], s[idx])}


def test_groups_bring_every_image_of_a_drawn_patient():
    ids = np.array(["b", "a", "b", "c", "b", "a"])
    order, starts, counts = I.patient_groups(ids)
    assert counts.tolist() == [2, 3, 1]  # a, b, c
    assert sorted(order[starts[1]:starts[1] + 3].tolist()) == [0, 2, 4]
    seen = []

    def fn(idx):
        seen.append(idx.copy())
        return {"x": float(len(idx))}

    I.patient_bootstrap(fn, 6, ids, n_boot=50, seed=1)
    size = Counter(ids.tolist())
    for idx in seen:
        per_patient = Counter(ids[idx].tolist())
        for patient, k in per_patient.items():
            assert k % size[patient] == 0  # whole patients only, repeated when drawn twice
        assert sum(k // size[p] for p, k in per_patient.items()) == 3  # as many draws as patients
    assert any(len(idx) != 6 for idx in seen)  # sizes vary with who was drawn


def test_duplicated_images_do_not_narrow_the_patient_interval():
    y, s = _toy(60, seed=2)
    copies = 4
    y4, s4 = np.repeat(y, copies), np.repeat(s, copies)
    patients = np.repeat(np.arange(60), copies)
    base = I.patient_bootstrap(_auroc_fn(y, s), 60, np.arange(60), n_boot=200, seed=0)["auroc"]
    by_patient = I.patient_bootstrap(_auroc_fn(y4, s4), 240, patients, n_boot=200, seed=0)["auroc"]
    by_image = I.patient_bootstrap(_auroc_fn(y4, s4), 240, np.arange(240), n_boot=200, seed=0)["auroc"]
    # four identical films per patient carry no more information than one: same interval
    assert by_patient == pytest.approx(base, abs=1e-12)
    # an image-level bootstrap treats them as 240 independent cases: ~half as wide (1/√4)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_image) < 0.7 * width(by_patient)
    assert by_patient[0] < auroc(y, s) < by_patient[1]


def test_bootstrap_is_seeded_and_shrinks_with_more_patients():
    y, s = _toy(80, seed=3)
    a = I.patient_bootstrap(_auroc_fn(y, s), 80, np.arange(80), n_boot=200, seed=5)
    assert a == I.patient_bootstrap(_auroc_fn(y, s), 80, np.arange(80), n_boot=200, seed=5)
    assert a != I.patient_bootstrap(_auroc_fn(y, s), 80, np.arange(80), n_boot=200, seed=6)
    y2, s2 = _toy(1280, seed=3)
    b = I.patient_bootstrap(_auroc_fn(y2, s2), 1280, np.arange(1280), n_boot=200, seed=5)
    assert b["auroc"][1] - b["auroc"][0] < 0.5 * (a["auroc"][1] - a["auroc"][0])  # 16× n → ~4× narrower


def test_nan_replicates_are_skipped_until_too_few_remain():
    y = np.zeros(10)
    y[0] = 1.0  # one positive patient: ~35 % of resamples draw none and have no AUROC
    s = np.linspace(0.1, 0.9, 10)
    ci = I.patient_bootstrap(_auroc_fn(y, s), 10, np.arange(10), n_boot=200, seed=0, min_finite=0.5)
    assert all(math.isfinite(v) for v in ci["auroc"])
    strict = I.patient_bootstrap(_auroc_fn(y, s), 10, np.arange(10), n_boot=200, seed=0, min_finite=0.9)
    assert all(math.isnan(v) for v in strict["auroc"])
    never = I.patient_bootstrap(lambda idx: {"m": math.nan}, 10, np.arange(10), n_boot=20)
    assert all(math.isnan(v) for v in never["m"])


def test_bootstrap_refuses_bad_arguments():
    with pytest.raises(ValueError, match="3 patient ids for 4 images"):
        I.patient_bootstrap(lambda i: {}, 4, ["a", "b", "c"])
    with pytest.raises(ValueError, match="n_boot"):
        I.patient_bootstrap(lambda i: {}, 1, ["a"], n_boot=0)
    with pytest.raises(ValueError, match="not between 0 and 1"):
        I.patient_bootstrap(lambda i: {}, 1, ["a"], level=95)
    assert I.patient_bootstrap(lambda i: {"x": 1.0}, 0, []) == {}


def test_task_bootstrap_keeps_validation_thresholds_and_skips_counts():
    tb = get_task("tb")
    y, s = _toy(120, seed=4)
    yv, sv = _toy(60, seed=5)
    thr = choose_thresholds(tb, yv, sv)
    patients = np.repeat(np.arange(40), 3)
    ci = I.bootstrap_task_metrics(tb, y, s[:, None], thr, patients, n_boot=50, seed=0)
    assert not {"n", "n_pos", "threshold"} & set(ci)
    assert {"auroc", "sensitivity", "specificity", "f1", "ece", "bce", "sens_at_95spec"} <= set(ci)
    lo, hi = ci["sensitivity"]
    assert 0.0 <= lo <= hi <= 1.0
    nih = get_task("nih14")
    rng = np.random.default_rng(6)
    Y = (rng.random((90, 14)) < 0.3).astype(float)
    P = np.clip(Y * 0.3 + rng.random((90, 14)) * 0.7, 0, 1)
    ci = I.bootstrap_task_metrics(nih, Y, P, None, np.arange(90), n_boot=20, keys=("auroc",))
    assert set(ci) == {"auroc"} | {f"auroc/{n}" for n in nih.label_names}


def test_paired_difference():
    y, s_good = _toy(150, seed=7, signal=1.5)
    rng = np.random.default_rng(8)
    s_bad = np.clip(s_good + rng.normal(0, 0.5, s_good.size), 0, 1)
    assert I.paired_difference_ci(auroc, y, s_good, s_good, np.arange(150), n_boot=50) == (0.0, 0.0, 0.0)
    diff, lo, hi = I.paired_difference_ci(auroc, y, s_good, s_bad, np.arange(150), n_boot=200)
    assert diff == pytest.approx(auroc(y, s_good) - auroc(y, s_bad))
    assert 0.0 < lo < diff < hi


def test_mean_ci_is_a_student_t_interval():
    mean, lo, hi = I.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} · sd(=1) / √3
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-9)
    assert I.mean_ci([1.0, 2.0, 3.0, math.nan])[1] == pytest.approx(lo)  # NaN seed left out
    m1 = I.mean_ci([0.8])
    assert m1[0] == 0.8 and math.isnan(m1[1]) and math.isnan(m1[2])
    assert all(math.isnan(v) for v in I.mean_ci([]))
    assert I.mean_ci([0.7, 0.7]) == (0.7, 0.7, 0.7)
    narrow = I.mean_ci([1.0, 2.0, 3.0], level=0.5)
    assert lo < narrow[1] < narrow[2] < hi
