"""The cross-domain table: seed-mean AUROC with a patient-bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.errors import DataError
from cxr.metrics.cross_domain import change_interval, condition_result, format_table, read_predictions


def test_condition_result_is_the_seed_mean_with_patient_interval():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40).astype(float)
    probs = np.stack([np.clip(0.3 * y + rng.uniform(0, 0.7, y.size), 0, 1) for _ in range(3)])
    pids = [f"p{i // 2}" for i in range(y.size)]  # two images per patient
    r = condition_result("x", y, probs, pids, n_boot=300, seed=1)
    expect = [roc_auc_score(y, p) for p in probs]
    assert r.per_seed == pytest.approx(expect) and r.auroc == pytest.approx(np.mean(expect))
    assert r.ci_low < r.auroc < r.ci_high and (r.n_images, r.n_patients) == (80, 40)
    assert r.seed_sd == pytest.approx(np.std(expect, ddof=1))
    with pytest.raises(ValueError, match="predictions"):
        condition_result("bad", y[:-1], probs, pids)


def test_table_and_predictions_file(tmp_path):
    a = condition_result("home", np.array([0, 1, 0, 1.]), np.array([[.1, .9, .2, .8]]), list("abcd"), n_boot=0)
    b = condition_result("away", np.array([0, 1, 0, 1.]), np.array([[.6, .4, .2, .8]]), list("abcd"), n_boot=0)
    table = format_table([a, b], reference="home").splitlines()
    assert table[0].split()[-3] == "change" and table[1].split()[-1] == "+0.000"
    assert float(table[2].split()[-3]) == pytest.approx(b.auroc - a.auroc)
    csv = tmp_path / "predictions_test.csv"
    csv.write_text("image,patient_id,origin,p_Tuberculosis,pred_Tuberculosis,true_Tuberculosis\n"
                   "x.png,p1,real,0.25,0,1\ny.png,p2,real,0.75,1,\n")
    preds = read_predictions(csv)
    assert preds["x.png"] == ("p1", 0.25, 1.0) and np.isnan(preds["y.png"][2])
    csv.write_text("image,patient_id\nx.png,p1\n")
    with pytest.raises(DataError, match="missing column"):
        read_predictions(csv)


def test_change_interval_is_paired_on_the_same_patients():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 50).astype(float)
    base = np.clip(0.35 * y + rng.uniform(0, 0.65, y.size), 0, 1)
    pids = [f"p{i}" for i in range(y.size)]
    a = condition_result("a", y, base[None], pids, n_boot=400, seed=1)
    # A monotone transform ranks every resample identically: the paired change is exactly 0.
    same = condition_result("b", y, (base ** 2)[None], pids, n_boot=400, seed=1)
    assert change_interval(a, same) == (0.0, 0.0)
    # Drawn independently, the same two conditions' difference spreads like two AUROC intervals.
    unpaired = condition_result("b", y, (base ** 2)[None], pids, n_boot=400, seed=2)
    lo, hi = change_interval(a, unpaired)
    assert lo < 0 < hi and hi - lo > a.ci_high - a.ci_low
    # A real change is inside its paired interval.
    noisy = condition_result("c", y, np.clip(base + rng.normal(0, 0.15, y.size), 0, 1)[None], pids,
                             n_boot=400, seed=1)
    lo, hi = change_interval(a, noisy)
    assert lo < noisy.auroc - a.auroc < hi
