"""VinDr-CXR detection: IoU and mAP@0.4 against hand-computed cases (the "No finding" rows
included) and against torchmetrics, weighted boxes fusion of the readers, a few CPU epochs of
the tiny Faster R-CNN on a VinDr-like phantom tree (loss falls, outputs well formed, resume),
`cxr detect` writing the competition's CSV in each image's original pixels, and bad input as one
line with nothing half-written."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

import classifiers.detector as D
from builders import one_error_line
from classifiers.detection_data import (
    FusionConfig,
    detection_records,
    fuse_boxes,
    grid_to_stored,
    image_id,
    load_detection_set,
    stored_to_grid,
    stored_to_original,
)
from cxr.cli.main import main
from cxr.data.record import VINDR, Box
from cxr.errors import CxrError
from cxr.metrics.detection import (
    NO_FINDING_CLASS,
    Boxes,
    average_precision,
    box_iou,
    competition_scores,
    mean_average_precision,
    no_finding_baseline,
    no_finding_prediction,
    no_finding_truth,
    parse_prediction_string,
    prediction_string,
    torchmetrics_map,
    tune_no_finding_threshold,
)

TINY = ["--config", "detector_tiny", "device=cpu", "train.epochs=3", "train.log_every=1"]

# ---------------------------------------------------------------------------------------------
# IoU and AP


def test_box_iou_hand_cases():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    expected = np.array([[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]])
    np.testing.assert_allclose(box_iou(a, b), expected)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_average_precision_hand_case():
    # two truth boxes; detections by score: hit, miss, hit -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1;
    # interpolated: 1 up to recall 0.5 (51 of the 101 points), 2/3 above (50 points)
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 2) == pytest.approx(
        (51 + 50 * 2 / 3) / 101)
    assert average_precision(np.array([]), np.array([], bool), 3) == 0.0
    assert math.isnan(average_precision(np.array([0.5]), np.array([False]), 0))


def test_map_matches_the_hand_case_and_torchmetrics():
    truth = [Boxes.make([[0, 0, 10, 10], [20, 20, 30, 30]], [2, 2])]
    # the 0.8 box overlaps the first truth box at IoU 0.36 < 0.4: a false positive; 0.7 hits the second
    pred = [Boxes.make([[0, 0, 10, 10], [0, 0, 6, 6], [21, 21, 30, 31]], [2, 2, 2], [0.9, 0.8, 0.7])]
    hand = mean_average_precision(pred, truth, 0.4)
    assert hand["per_class"] == {2: pytest.approx((51 + 50 * 2 / 3) / 101)}
    assert torchmetrics_map(pred, truth, 0.4)["map"] == pytest.approx(hand["map"], abs=1e-6)
    # at IoU 0.3 the 0.8 box would match the first truth box were it free; it is taken, so nothing changes
    assert mean_average_precision(pred, truth, 0.3)["map"] == pytest.approx(hand["map"])


def test_map_agrees_with_torchmetrics_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(8):
        preds, truths = [], []
        for _ in range(5):
            n, m = int(rng.integers(0, 4)), int(rng.integers(0, 6))
            xy, wh = rng.random((n, 2)) * 50, rng.random((n, 2)) * 30 + 2
            t = Boxes.make(np.c_[xy, xy + wh], rng.integers(0, 3, n))
            pxy, pwh = rng.random((m, 2)) * 50, rng.random((m, 2)) * 30 + 2
            b = np.c_[pxy, pxy + pwh]
            k = min(n, m)
            b[:k] = t.boxes[:k] + np.clip(rng.normal(0, 3, (k, 4)), -1, 1)  # near misses and hits
            preds.append(Boxes.make(b, rng.integers(0, 3, m), rng.random(m)))
            truths.append(t)
        ours, ref = mean_average_precision(preds, truths), torchmetrics_map(preds, truths)
        assert ours["per_class"].keys() == ref["per_class"].keys()
        assert ours["map"] == pytest.approx(ref["map"], abs=1e-6)


def test_no_finding_rows_the_competition_way():
    nf = NO_FINDING_CLASS
    truths = [Boxes.make(np.zeros((0, 4)), []),  # A: every reader said "No finding"
              Boxes.make([[10, 10, 20, 20]], [3]),  # B
              Boxes.make([[40, 40, 50, 50]], [5])]  # C
    preds = [Boxes.make([[0, 0, 5, 5]], [3], [0.2]),  # A: only a weak box -> called "No finding" (right)
             Boxes.make([[10, 10, 20, 20]], [3], [0.9]),  # B: found
             Boxes.make([[40, 40, 50, 50]], [5], [0.3])]  # C: found, but too weakly -> "No finding" (wrong)
    called = [no_finding_prediction(p, 0.5) for p in preds]
    assert [prediction_string(c) for c in called] == ["14 1 0 0 1 1", "3 0.9 10 10 20 20", "14 1 0 0 1 1"]
    assert no_finding_truth(truths[0]).labels.tolist() == [nf]
    assert no_finding_truth(truths[0]).boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    for exact in (True, False):
        s = competition_scores(preds, truths, 0.5, exact=exact)
        # with class 14: AP3 = 1, AP5 = 0 (C's box was replaced by the "No finding" row), AP14 = 1
        # (A's row first, a hit, then C's, a false positive: precision 1 at recall 1)
        assert s["per_class"] == {3: pytest.approx(1.0), 5: pytest.approx(0.0), nf: pytest.approx(1.0)}
        assert s["map"] == pytest.approx(2 / 3)
        # without it, every raw box counts: A's weak class-3 box is a false positive after B's hit
        assert s["map_findings"] == pytest.approx(1.0) and s["called_no_finding"] == 2
    # tuning: up to 0.2 A's weak box survives (A is not called normal: 2/3); at 0.25 and 0.3 every call is
    # right (1); from 0.35 C is called normal (2/3); the tie goes to the threshold nearest 0.5
    best, sweep = tune_no_finding_threshold(preds, truths, prefer=0.5)
    assert best == 0.3 and sweep[0.25] == pytest.approx(1.0) and sweep[0.2] == pytest.approx(2 / 3)
    assert sweep[0.35] == pytest.approx(2 / 3) and len(sweep) == 19
    # the baseline: three "No finding" rows of equal score; ties keep image order (pycocotools too),
    # so A's hit comes first and AP14 = 1, while both findings get AP 0
    for exact in (True, False):
        base = competition_scores(no_finding_baseline(3), truths, 0.5, exact=exact)
        assert base["map"] == pytest.approx(1 / 3) and base["map_findings"] == 0.0


def test_prediction_string_round_trip():
    b = Boxes.make([[1.26, 2, 300.04, 4000.5], [0, 0, 1, 1]], [0, 14], [0.12345, 1.0])
    text = prediction_string(b)
    assert text == "0 0.1235 1.3 2 300 4000.5 14 1 0 0 1 1"
    back = parse_prediction_string(text)
    assert back.labels.tolist() == [0, 14] and back.boxes.tolist()[1] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="groups of 6"):
        parse_prediction_string("1 0.5 0 0 1")


# ---------------------------------------------------------------------------------------------
# Fusion and coordinates


def test_wbf_of_identical_boxes_returns_the_box():
    same = [Box("Nodule/Mass", 10, 20, 30, 60, reader=r) for r in ("R1", "R2", "R3")]
    boxes, labels, scores = fuse_boxes(same, 100, 80)
    np.testing.assert_allclose(boxes, [[10, 20, 30, 60]], atol=1e-4)
    assert labels.tolist() == [VINDR.index("Nodule/Mass")] and scores.tolist() == pytest.approx([1.0])
    # one reader's box is kept, scored by the share of readers that drew it
    lone = same + [Box("Cardiomegaly", 40, 40, 90, 70, reader="R2")]
    boxes, labels, scores = fuse_boxes(lone, 100, 80)
    assert sorted(labels.tolist()) == sorted([VINDR.index("Nodule/Mass"), VINDR.index("Cardiomegaly")])
    assert sorted(scores.tolist()) == pytest.approx([1 / 3, 1.0])
    # overlapping boxes of two readers fuse to their mean; "none" keeps every box as drawn
    two = [Box("ILD", 10, 10, 20, 20, reader="R1"), Box("ILD", 12, 10, 22, 20, reader="R2")]
    np.testing.assert_allclose(fuse_boxes(two, 100, 100)[0], [[11, 10, 21, 20]], atol=1e-4)
    assert len(fuse_boxes(two, 100, 100, FusionConfig(method="none"))[0]) == 2


def test_grid_and_original_coordinates_round_trip():
    boxes = np.array([[3.0, 5.0, 80.0, 100.0]])
    h, w, size = 128, 105, 64  # a portrait image padded into the square
    grid = stored_to_grid(boxes, h, w, size)
    assert grid[0, 0] > 3 * size / h  # shifted right by the padding
    np.testing.assert_allclose(grid_to_stored(grid, h, w, size), boxes, atol=1e-9)
    np.testing.assert_allclose(stored_to_original(boxes, h, w, (4020, 4892)),
                               boxes * [4020 / w, 4892 / h, 4020 / w, 4892 / h])


# ---------------------------------------------------------------------------------------------
# Training on a VinDr-like phantom


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("vindr") / "vindr"
    assert main(["phantom", "--preset", "vindr", "--out", str(root), "--size", "64", "--n", "32",
                 "--workers", "0"]) == 0
    return root


@pytest.fixture(scope="module")
def trained(tree, tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("det") / "run"
    assert main(["train-detector", "--run-dir", str(run), f"data.train={tree}", *TINY]) == 0
    return run


def test_targets_fuse_readers_and_keep_negatives(tree):
    records = detection_records(tree)
    s = load_detection_set(records, 64, FusionConfig())
    negatives = [i for i, b in enumerate(s.boxes) if len(b) == 0]
    assert negatives and len(negatives) < len(s)  # "No finding" images are empty targets, not errors
    assert all(not records[i].boxes for i in negatives)
    assert s.images.shape == (len(records), 1, 64, 64)
    for b, lab in zip(s.boxes, s.labels):
        assert b.shape[1:] == (4,) and len(b) == len(lab)
        assert bool((b[:, 2] > b[:, 0]).all() and (b >= 0).all() and (b <= 64).all())
    # three readers per abnormal image, fused: fewer targets than reader boxes
    assert sum(len(b) for b in s.boxes) < sum(len(r.boxes) for r in records)


def test_training_lowers_the_loss_and_scores_the_sets(trained):
    rows = [json.loads(line) for line in (trained / "stats.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) >= 6 and np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])
    assert (trained / "checkpoints" / "best").is_dir()
    scores = json.loads((trained / "scores_heldout.json").read_text())
    for key in ("map", "map_findings", "baseline_map", "per_class", "called_no_finding"):
        assert key in scores
    assert 0.0 <= scores["map"] <= 1.0 and scores["baseline_map_findings"] == 0.0
    # the "No finding" threshold tuned on validation travels with the best checkpoint
    threshold = D.checkpoint_threshold(trained / "checkpoints" / "best", -1.0)
    assert 0.05 <= threshold <= 0.95 and scores["no_finding_threshold"] == threshold
    summary = list(csv.DictReader(open(trained / "summary.csv")))
    assert "val_map40" in summary[0] and "val_map40_findings" in summary[0]


def test_outputs_have_the_right_structure(trained, tree):
    net, args, _ = D.load_detector(trained, torch.device("cpu"))
    assert args["family"] == "detector" and args["input"]["size"] == 64
    found = D.predict_grid(net, torch.rand(3, 1, 64, 64), 2, torch.device("cpu"))
    assert len(found) == 3
    for b in found:
        assert b.boxes.shape == (len(b), 4) and b.scores.shape == (len(b),)
        assert ((b.labels >= 0) & (b.labels < len(VINDR))).all()
        assert ((b.boxes >= 0) & (b.boxes <= 64)).all() and ((b.scores >= 0) & (b.scores <= 1)).all()
    with pytest.raises(ValueError, match="detector input"):
        net([torch.rand(1, 32, 32)])


def test_resume_continues_the_run(trained, tree, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train-detector", "--run-dir", str(run), "--resume", "train.epochs=4"]) == 0
    summary = list(csv.DictReader(open(run / "summary.csv")))
    assert [r["epoch"] for r in summary if r.get("val_map40")][-1] == "4"


# ---------------------------------------------------------------------------------------------
# cxr detect


def _read_submission(path: Path) -> dict[str, Boxes]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "PredictionString"]
    return {r[0]: parse_prediction_string(r[1]) for r in rows[1:]}


def _original_dims(tree: Path) -> dict[str, tuple[int, int]]:
    with open(tree / "train_meta.csv", newline="") as f:
        return {r["image_id"]: (int(r["dim1"]), int(r["dim0"])) for r in csv.DictReader(f)}


def test_detect_writes_the_competition_csv_in_original_pixels(trained, tree, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    assert main(["detect", "--checkpoint", str(trained), "--in", str(tree), "--out", str(out),
                 "--no-finding-threshold", "0"]) == 0
    subs = _read_submission(out)
    dims = _original_dims(tree)
    assert set(subs) == {image_id(r) for r in detection_records(tree)}
    for ident, b in subs.items():
        w, h = dims[ident]
        assert ((b.boxes[:, [0, 2]] <= w + 0.1).all() and (b.boxes[:, [1, 3]] <= h + 0.1).all()
                and (b.boxes >= 0).all())
    assert max(float(b.boxes[:, 2].max()) for b in subs.values() if len(b)) > 64  # not the stored 64 px
    # threshold 1: every image is called "No finding"
    assert main(["detect", "--checkpoint", str(trained), "--in", str(tree), "--out", str(out), "--overwrite",
                 "--no-finding-threshold", "1"]) == 0
    assert {prediction_string(b) for b in _read_submission(out).values()} == {"14 1 0 0 1 1"}


def test_detect_maps_the_fused_truth_back_to_train_csv(tree, monkeypatch):
    """An oracle that predicts the fused truth on the grid: the written boxes equal weighted boxes
    fusion of train.csv's rows in the original pixels (the resized tree's train_meta.csv)."""
    records = detection_records(tree)
    s = load_detection_set(records, 64, FusionConfig())
    oracle = iter([Boxes.make(b.numpy(), lab.numpy(), np.full(len(lab), 0.9)) for b, lab in zip(s.boxes, s.labels)])
    monkeypatch.setattr(D, "predict_grid", lambda net, images, *a, **k: [next(oracle) for _ in range(len(images))])
    rows = D.detect_records(None, records, 64, torch.device("cpu"), 0.5, batch_size=5, check_meta=True)
    subs = {ident: parse_prediction_string(prediction_string(b)) for ident, b in rows}  # as written
    dims = _original_dims(tree)
    with open(tree / "train.csv", newline="") as f:
        by_image: dict[str, list[Box]] = {}
        for r in csv.DictReader(f):
            if r["class_name"] != "No finding":
                by_image.setdefault(r["image_id"], []).append(
                    Box(r["class_name"], *(float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")), reader=r["rad_id"]))
    checked = 0
    for ident, got in subs.items():
        if ident not in by_image:
            assert prediction_string(got) == "14 1 0 0 1 1"
            continue
        w, h = dims[ident]
        want, labels, _ = fuse_boxes(by_image[ident], w, h)
        order_got, order_want = np.lexsort(got.boxes.T[::-1]), np.lexsort(want.T[::-1])
        np.testing.assert_allclose(got.boxes[order_got], want[order_want], atol=0.06)
        assert got.labels[order_got].tolist() == labels[order_want].tolist()
        checked += 1
    assert checked >= 5


# ---------------------------------------------------------------------------------------------
# Bad input


def _copy(tree: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tree, dst, ignore=shutil.ignore_patterns("phantom_truth"))
    return dst


def _append_row(tree: Path, row: str) -> int:
    text = (tree / "train.csv").read_text()
    (tree / "train.csv").write_text(text + row + "\n")
    return len(text.splitlines()) + 1


def test_a_box_outside_its_image_is_refused_naming_the_row(tree, tmp_path, capsys):
    bad = _copy(tree, tmp_path)
    ident = next(image_id(r) for r in detection_records(tree) if r.boxes)
    w, h = _original_dims(tree)[ident]
    line = _append_row(bad, f"{ident},Nodule/Mass,8,R99,{w + 10},{h + 10},{w + 50},{h + 40}")
    run = tmp_path / "run"
    assert main(["train-detector", "--run-dir", str(run), f"data.train={bad}", *TINY]) == 2
    err = one_error_line(capsys)
    assert f"train.csv:{line}" in err and "no area inside the image" in err
    assert not run.exists()  # the failed run leaves no folder


def test_a_box_past_the_edge_is_clipped(tree, tmp_path):
    bad = _copy(tree, tmp_path)
    rec = next(r for r in detection_records(tree) if r.boxes)
    w, h = _original_dims(tree)[image_id(rec)]
    _append_row(bad, f"{image_id(rec)},Nodule/Mass,8,R99,{w - 100},{h - 100},{w + 300},{h + 300}")
    s = load_detection_set([r for r in detection_records(bad) if image_id(r) == image_id(rec)], 64, FusionConfig())
    assert s.clipped == 1 and float(s.boxes[0].max()) <= 64


def test_x_max_below_x_min_is_one_line(tree, tmp_path, capsys):
    bad = _copy(tree, tmp_path)
    ident = next(image_id(r) for r in detection_records(tree))
    line = _append_row(bad, f"{ident},Nodule/Mass,8,R99,300,100,200,200")
    assert main(["train-detector", "--run-dir", str(tmp_path / "run"), f"data.train={bad}", *TINY]) == 2
    err = one_error_line(capsys)
    assert f"train.csv:{line}" in err and "x_max < x_min" in err


def test_detect_refuses_bad_requests_and_writes_nothing(trained, tree, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    out.write_text("keep me\n")
    assert main(["detect", "--checkpoint", str(trained), "--in", str(tree), "--out", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys) and out.read_text() == "keep me\n"
    # a resized tree whose train_meta.csv lacks an image: one line naming it, no file written
    bad = _copy(tree, tmp_path)
    meta = (bad / "train_meta.csv").read_text().splitlines()
    negative = next(image_id(r) for r in detection_records(tree) if not r.boxes)
    (bad / "train_meta.csv").write_text("\n".join(m for m in meta if not m.startswith(negative)) + "\n")
    out2 = tmp_path / "sub2.csv"
    assert main(["detect", "--checkpoint", str(trained), "--in", str(bad), "--out", str(out2)]) == 2
    err = one_error_line(capsys)
    assert negative in err and "train_meta.csv" in err and not out2.exists()
    assert main(["detect", "--checkpoint", str(trained), "--in", str(tmp_path / "nope"), "--out", str(out2)]) == 2
    assert "no such folder" in one_error_line(capsys)
    assert main(["detect", "--checkpoint", str(tmp_path), "--in", str(tree), "--out", str(out2)]) == 2
    one_error_line(capsys)
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_tree_of_another_layout_is_one_line(tmp_path, capsys):
    nlm = tmp_path / "nlm"
    assert main(["phantom", "--preset", "nlm", "--out", str(nlm), "--size", "32", "--n", "8", "--workers", "0"]) == 0
    capsys.readouterr()
    site = next(p for p in nlm.iterdir() if p.is_dir() and p.name != "phantom_truth")
    assert main(["train-detector", "--run-dir", str(tmp_path / "run"), f"data.train={site}", *TINY]) == 2
    assert "no VinDr-CXR boxes" in one_error_line(capsys)


def test_detect_on_the_dicom_release_keeps_its_pixels(trained, tmp_path):
    dcm = tmp_path / "dcm"
    assert main(["phantom", "--preset", "vindr", "--out", str(dcm), "--size", "48", "--n", "6", "--format", "dicom",
                 "--workers", "0"]) == 0
    out = tmp_path / "sub.csv"
    assert main(["detect", "--checkpoint", str(trained), "--in", str(dcm), "--out", str(out),
                 "--no-finding-threshold", "0"]) == 0
    subs = _read_submission(out)
    assert len(subs) == 6 and any(len(b) for b in subs.values())
    for b in subs.values():  # no train_meta.csv: the DICOM is the original, at most 48 pixels a side
        assert (b.boxes <= 48 + 0.1).all() and ((b.boxes[:, 2] > b.boxes[:, 0]) & (b.boxes[:, 3] > b.boxes[:, 1])).all()


def test_local_resnet_weights_load_into_the_one_channel_stem(tmp_path):
    ref = resnet18(weights=None)  # random, built here: nothing is downloaded
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    det = D.Detector(D.DetectorModelConfig(backbone="resnet18", fpn=False, anchor_sizes=(16, 32)), 64)
    report = D.load_weights(det, tmp_path / "r18.pth")
    assert report["loaded"] == len([k for k in ref.state_dict() if not k.startswith("fc.")])
    assert torch.allclose(det.net.backbone.body.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    torch.save({"conv1.weight": ref.conv1.weight, "layer9.weight": ref.conv1.weight}, tmp_path / "odd.pth")
    with pytest.raises(CxrError, match="unexpected key 'backbone.body.layer9.weight'"):
        D.load_weights(det, tmp_path / "odd.pth")
