"""Classification metrics against scikit-learn/torchmetrics and hand-computed cases; result files."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, precision_score, recall_score, roc_auc_score

from cxr.data.tasks import get_task
from cxr.errors import DataError
from cxr.metrics import classification as M
from cxr.metrics.results import format_metrics, read_results, write_results

TB, NIH, NINE = get_task("tb"), get_task("nih14"), get_task("nine")


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    assert not caught, [str(w.message) for w in caught]
    return out


# --- AUROC --------------------------------------------------------------------------------

def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)  # many ties
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_is_nan_without_two_classes_and_says_nothing():
    assert math.isnan(_no_warnings(M.auroc, [1, 1, 1], [0.2, 0.4, 0.9]))
    assert math.isnan(_no_warnings(M.auroc, [], []))
    assert math.isnan(_no_warnings(M.auroc, [np.nan, 0, np.nan], [0.1, 0.2, 0.3]))  # one labelled class
    m = _no_warnings(M.binary_metrics, [0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert math.isnan(m["auroc"]) and math.isnan(m["sens_at_95spec"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == pytest.approx(2 / 3) and m["n_pos"] == 0


def test_multilabel_auroc_matches_sklearn_on_fixed_arrays():
    rng = np.random.default_rng(3)
    names = ("a", "b", "c", "d")
    Y = (rng.random((80, 4)) < [0.2, 0.4, 0.5, 0.7]).astype(np.float64)
    P = np.clip(Y * [0.3, 0.1, 0.5, 0.2] + rng.random((80, 4)) * 0.7, 0, 1)
    m = M.multilabel_metrics(Y, P, None, names)
    per = roc_auc_score(Y, P, average=None)
    for j, name in enumerate(names):
        assert m[f"auroc/{name}"] == pytest.approx(per[j], abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, P, average="macro"), abs=1e-12)
    assert m["auroc_labels"] == 4 and m["n"] == 80


def test_multilabel_nan_targets_are_masked_per_column_not_counted_negative():
    rng = np.random.default_rng(4)
    Y = (rng.random((60, 2)) < 0.4).astype(np.float64)
    P = np.clip(Y * 0.4 + rng.random((60, 2)) * 0.6, 0, 1)
    Y[:20, 1] = np.nan  # label b not annotated by the first source
    m = M.multilabel_metrics(Y, P, np.array([0.5, 0.5]), ("a", "b"))
    keep = slice(20, None)
    assert m["auroc/b"] == pytest.approx(roc_auc_score(Y[keep, 1], P[keep, 1]), abs=1e-12)
    assert m["n/b"] == 40 and m["n/a"] == 60
    assert m["sensitivity/b"] == pytest.approx(recall_score(Y[keep, 1], P[keep, 1] >= 0.5))
    # whatever the network says on unlabelled rows changes nothing
    P2 = P.copy()
    P2[:20, 1] = 1.0 - P2[:20, 1]
    m2 = M.multilabel_metrics(Y, P2, np.array([0.5, 0.5]), ("a", "b"))
    assert all(m2[k] == m[k] for k in m if k.endswith("/b"))


def test_multilabel_macro_skips_undefined_labels_and_notes_them():
    rng = np.random.default_rng(5)
    Y = (rng.random((50, 3)) < 0.5).astype(np.float64)
    Y[:, 2] = 0.0  # no positives for the third label
    P = rng.random((50, 3))
    m = _no_warnings(M.multilabel_metrics, Y, P, None, ("x", "y", "z"))
    assert math.isnan(m["auroc/z"]) and m["auroc_labels"] == 2
    assert m["auroc"] == pytest.approx((m["auroc/x"] + m["auroc/y"]) / 2)
    task = type(NIH)("toy", "multilabel", ("x", "y", "z"))
    assert M.undefined_notes(task, Y, "validation") == ["validation: only one class for z (AUROC undefined)"]


# --- binary metrics at a threshold ------------------------------------------------------------

def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(6)
    y = (rng.random(120) < 0.35).astype(np.float64)
    p = np.clip(y * 0.35 + rng.random(120) * 0.65, 0.01, 0.99)
    m = M.binary_metrics(y, p, 0.45)
    pred = p >= 0.45
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, ~pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["f1"] == pytest.approx(2 / (1 / precision_score(y, pred) + 1 / m["sensitivity"]))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["bce"] == pytest.approx(log_loss(y, p), rel=1e-9)
    assert (m["n"], m["n_pos"], m["threshold"]) == (120, y.sum(), 0.45)
    assert tuple(m) == M.BINARY_KEYS


def test_sensitivity_at_95_specificity_matches_torchmetrics_and_a_hand_case():
    import torch
    from torchmetrics.functional.classification import binary_sensitivity_at_specificity

    rng = np.random.default_rng(7)
    y = (rng.random(300) < 0.3).astype(np.float64)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    expected, _ = binary_sensitivity_at_specificity(torch.tensor(p), torch.tensor(y).long(), 0.95)
    assert M.sensitivity_at_specificity(y, p) == pytest.approx(float(expected), abs=1e-6)  # float32
    # 20 negatives: one false positive is exactly 95 % specificity and is allowed
    y = np.array([0] * 20 + [1] * 4)
    s = np.array([0.1] * 19 + [0.9] + [0.95, 0.85, 0.5, 0.05])
    assert M.sensitivity_at_specificity(y, s) == 0.75  # threshold 0.5: 3 of 4 positives, 1 FP
    assert M.sensitivity_at_specificity(y, s, specificity=1.0) == 0.25


def test_ece_on_a_hand_computed_case():
    # bins of width 1/15: 0.25 and 0.85 sit inside bins, far from edges
    p = np.array([0.25] * 4 + [0.85] * 5)
    y = np.array([1, 1, 0, 0] + [1] * 5)
    # |0.25 − 0.5|·4/9 + |0.85 − 1.0|·5/9
    assert M.expected_calibration_error(y, p) == pytest.approx((0.25 * 4 + 0.15 * 5) / 9, abs=1e-9)
    assert M.expected_calibration_error([0, 1, 0, 1], [0.5] * 4) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(M.expected_calibration_error([], []))


def test_logits_and_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="logits passed by mistake"):
        M.binary_metrics([0, 1], [-2.0, 3.0], 0.5)
    with pytest.raises(ValueError, match="3 labels for 2 scores"):
        M.auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="targets must be 0, 1 or NaN"):
        M.auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="sum to 1"):
        M.multiclass_metrics(np.array([0, 1]), np.full((2, 9), 0.5), NINE.label_names)


# --- thresholds come from validation only ---------------------------------------------------

VAL_Y = np.array([0, 0, 0, 1, 1, 1], float)
VAL_P = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7])
TEST_Y = np.array([0, 0, 0, 0, 1, 1, 1, 1], float)
TEST_P = np.array([0.1, 0.2, 0.3, 0.5, 0.35, 0.6, 0.7, 0.8])


def test_youden_threshold_on_hand_cases():
    assert M.youden_threshold(VAL_Y, VAL_P) == 0.4  # separates validation perfectly
    # test: t=0.6 and t=0.35 both give J=0.75; the higher threshold wins the tie
    assert M.youden_threshold(TEST_Y, TEST_P) == 0.6
    assert M.youden_threshold(np.r_[TEST_Y, np.nan], np.r_[TEST_P, 0.99]) == 0.6  # NaN row dropped
    assert M.youden_threshold([1, 1, 0], [0.1, 0.2, 0.9]) > 0.9  # inverted scores: call nothing


def test_thresholds_come_from_validation_only():
    thr = M.choose_thresholds(TB, VAL_Y, VAL_P[:, None])
    assert thr.shape == (1,) and thr[0] == 0.4
    m = M.task_metrics(TB, TEST_Y, TEST_P[:, None], thr)
    # at the validation threshold 0.4 the test negative at 0.5 is called positive and the
    # positive at 0.35 missed: 3/4 each
    assert (m["threshold"], m["sensitivity"], m["specificity"]) == (0.4, 0.75, 0.75)
    # a threshold fitted on the test set itself (0.6) would have reported perfect specificity
    leaked = M.task_metrics(TB, TEST_Y, TEST_P, M.choose_thresholds(TB, TEST_Y, TEST_P))
    assert (leaked["threshold"], leaked["specificity"]) == (0.6, 1.0)
    assert m["auroc"] == leaked["auroc"]  # threshold-free metrics agree


def test_multilabel_thresholds_are_per_label_from_validation():
    yb = np.array([0, 0, 1, 0, 1, 1], float)  # J = 2/3 at 0.6 and at 0.3: the higher wins
    Yv, Pv = np.stack([VAL_Y, yb], axis=1), np.stack([VAL_P, VAL_P], axis=1)
    task = type(NIH)("toy", "multilabel", ("a", "b"))
    thr = M.choose_thresholds(task, Yv, Pv)
    assert thr.tolist() == [0.4, 0.6]
    m = M.task_metrics(task, np.stack([TEST_Y, TEST_Y], 1), np.stack([TEST_P, TEST_P], 1), thr)
    assert (m["threshold/a"], m["sensitivity/a"], m["specificity/a"]) == (0.4, 0.75, 0.75)
    assert (m["threshold/b"], m["sensitivity/b"], m["specificity/b"]) == (0.6, 0.75, 1.0)
    assert M.choose_thresholds(NINE, np.array([0, 1]), np.full((2, 9), 1 / 9)) is None


def test_single_class_validation_gives_half_threshold_and_a_note():
    y = np.zeros(10)
    p = np.linspace(0.1, 0.9, 10)
    thr = _no_warnings(M.choose_thresholds, TB, y, p)
    assert thr.tolist() == [0.5]
    assert M.undefined_notes(TB, y, "validation") == ["validation: only one class for Tuberculosis (AUROC undefined)"]
    assert M.undefined_notes(TB, np.full(3, np.nan), "test") == [
        "test: no labelled images for Tuberculosis (AUROC undefined)"]
    assert M.undefined_notes(TB, np.array([0, 1.0]), "test") == []
    m = _no_warnings(M.task_metrics, TB, y, p, thr)
    assert math.isnan(m["auroc"]) and m["specificity"] == 0.5  # 5 of 10 below 0.5


# --- multi-class --------------------------------------------------------------------------

def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(8)
    y = np.r_[np.arange(9), rng.integers(0, 9, 91)]  # every class present
    logits = rng.normal(size=(100, 9)) + 2.0 * np.eye(9)[y] * (rng.random(100) < 0.6)[:, None]
    P = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)  # float32 softmax
    m = M.task_metrics(NINE, y, P)
    P64 = P.astype(np.float64) / P.astype(np.float64).sum(1, keepdims=True)
    assert m["cross_entropy"] == pytest.approx(log_loss(y, P64), rel=1e-9)
    assert m["accuracy"] == pytest.approx(np.mean(P.argmax(1) == y))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, P.argmax(1)))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, P64, multi_class="ovr", average="macro"), abs=1e-9)
    name = NINE.label_names[4]
    assert m[f"auroc/{name}"] == pytest.approx(roc_auc_score(y == 4, P[:, 4]), abs=1e-9)
    assert m[f"sensitivity/{name}"] == pytest.approx(recall_score(y, P.argmax(1), labels=[4], average=None)[0])


def test_multiclass_ece_is_top_label_and_absent_classes_are_noted():
    names = ("a", "b", "c")
    P = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.05, 0.1, 0.85], [0.05, 0.1, 0.85]])
    y = np.array([0, 1, 2, 2])
    m = _no_warnings(M.multiclass_metrics, y, P, names)
    assert m["ece"] == pytest.approx((2 * 0.2 + 2 * 0.15) / 4, abs=1e-6)  # conf 0.7 acc ½; conf 0.85 acc 1
    task = type(NINE)("toy", "multiclass", names)
    y2 = np.array([0, 0, 2, 2])
    m2 = _no_warnings(M.task_metrics, task, y2, P)
    assert math.isnan(m2["auroc/b"]) and m2["auroc"] == pytest.approx((m2["auroc/a"] + m2["auroc/c"]) / 2)
    assert math.isfinite(m2["cross_entropy"])
    assert M.undefined_notes(task, y2, "test") == ["test: no images of b (one-vs-rest AUROC undefined)"]
    assert M.undefined_notes(task, np.zeros(3, int), "validation")[-1] == \
        "validation: fewer than two classes present (AUROC undefined)"


# --- the contract the trainer relies on -----------------------------------------------------

@pytest.mark.parametrize("task", [TB, NIH, NINE], ids=lambda t: t.name)
def test_headline_metric_is_reported_for_every_task(task):
    rng = np.random.default_rng(9)
    n = 40
    if task.kind == "multiclass":
        y = rng.integers(0, len(task.label_names), n)
        P = rng.dirichlet(np.ones(len(task.label_names)), n)
    else:
        y = (rng.random((n, len(task.label_names))) < 0.4).astype(float)
        y = y[:, 0] if task.kind == "binary" else y
        P = rng.random((n, task.num_outputs))
    thr = M.choose_thresholds(task, y, P)
    m = M.task_metrics(task, y, P, thr)
    key, higher = M.HEADLINE[task.kind]
    assert math.isfinite(m[key]) and isinstance(higher, bool)


def test_key_subsets_give_the_same_numbers_as_the_full_set():
    rng = np.random.default_rng(10)
    Y = (rng.random((60, 14)) < 0.3).astype(float)
    P = rng.random((60, 14))
    full = M.task_metrics(NIH, Y, P, None)
    fast = M.task_metrics(NIH, Y, P, None, keys=("auroc",))
    assert "f1" not in fast and "ece/Mass" not in fast
    assert {k: fast[k] for k in fast if k.startswith("auroc")} == {k: full[k] for k in full if k.startswith("auroc")}
    with pytest.raises(ValueError, match="unknown keys"):
        M.binary_metrics([0, 1], [0.2, 0.8], 0.5, keys=("auc",))


# --- result files ---------------------------------------------------------------------------

def test_results_json_and_csv_content(tmp_path):
    metrics = {"auroc": 0.8125, "sensitivity": math.nan, "n": 40.0}
    intervals = {"auroc": (0.7, 0.9), "sensitivity": (math.nan, math.nan)}
    extra = {"notes": ["test: only one class for X (AUROC undefined)"], "thresholds": np.array([0.25]),
             "n_boot": np.int64(1000)}
    jpath, cpath = write_results(tmp_path / "out", "test", metrics, intervals, extra)
    assert (jpath.name, cpath.name) == ("test.json", "test.csv")
    raw = jpath.read_text()
    assert "NaN" not in raw
    doc = json.loads(raw)
    assert doc["metrics"] == {"auroc": 0.8125, "sensitivity": None, "n": 40.0}
    assert doc["ci_low"] == {"auroc": 0.7, "sensitivity": None} and doc["ci_high"]["auroc"] == 0.9
    assert doc["thresholds"] == [0.25] and doc["n_boot"] == 1000 and doc["name"] == "test"
    with open(cpath, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["metric", "value", "ci_low", "ci_high"], ["auroc", "0.8125", "0.7", "0.9"],
                    ["sensitivity", "", "", ""], ["n", "40.0", "", ""]]
    back, ci, rest = read_results(jpath)
    assert back["auroc"] == 0.8125 and math.isnan(back["sensitivity"]) and ci["auroc"] == (0.7, 0.9)
    assert rest["notes"] == extra["notes"] and not list(tmp_path.glob("out/.*tmp"))


def test_results_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="clash"):
        write_results(tmp_path, "r", {"auroc": 0.5}, extra={"metrics": 1})
    with pytest.raises(ValueError, match="not in the results"):
        write_results(tmp_path, "r", {"auroc": 0.5}, {"f1": (0, 1)})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not a readable results JSON"):
        read_results(bad)
    with pytest.raises(DataError, match="no such results file"):
        read_results(tmp_path / "missing.json")


def test_format_metrics_is_a_fixed_width_table():
    text = format_metrics({"auroc": 0.81234, "n": 40.0, "sensitivity/Nodule": math.nan},
                          {"auroc": (0.7, 0.9)})
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value", "95%", "CI"]
    assert lines[1].split() == ["auroc", "0.8123", "[0.7000,", "0.9000]"]
    assert lines[2].split() == ["n", "40"] and lines[3].split() == ["sensitivity/Nodule", "—"]
    assert len({line.index(line.split()[1]) + len(line.split()[1]) for line in lines[1:]}) == 1  # right-aligned
    assert format_metrics({"a": 1.0, "b": 2.0}, keys=["b", "zzz"]).splitlines()[1].split() == ["b", "2.0000"]
