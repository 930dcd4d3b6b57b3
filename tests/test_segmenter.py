"""Lung segmentation: the scores against hand-computed cases, the Dice + BCE loss, the U-Net's
shapes, a few CPU epochs raising validation Dice, `cxr segment` writing masks the Montgomery
loader reads back at each image's own size, and bad input as one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builders import one_error_line
from classifiers.segmenter import dice_bce_loss, from_grid, probs_to_labels, to_grid
from classifiers.unet import UNet, UNetConfig
from cxr.cli.main import main
from cxr.data.layouts import load_tree
from cxr.data.masks import load_lung_mask
from cxr.engine.checkpoint import CheckpointManager
from cxr.metrics.segmentation import dice, hausdorff95, iou, lung_scores, mean_scores

# ---------------------------------------------------------------------------------------------
# Scores


def test_dice_and_iou_hand_cases():
    a = np.zeros((6, 6), bool)
    a[1:3, 1:3] = True  # 4 pixels
    b = np.zeros((6, 6), bool)
    b[1:3, 1:4] = True  # 6 pixels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 10)
    assert iou(a, b) == pytest.approx(4 / 6)
    empty = np.zeros((6, 6), bool)
    assert (dice(empty, empty), iou(empty, empty), hausdorff95(empty, empty)) == (1.0, 1.0, 0.0)
    assert (dice(a, empty), iou(a, empty)) == (0.0, 0.0)
    assert math.isinf(hausdorff95(a, empty))
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.zeros((5, 6), bool))


def test_hausdorff95_hand_cases():
    a = np.zeros((5, 12), bool)
    a[2, 2] = True
    b = np.zeros((5, 12), bool)
    b[2, 5] = True
    assert hausdorff95(a, b) == pytest.approx(3.0)  # one boundary pixel each, 3 apart
    assert hausdorff95(a, b, spacing=(1.0, 0.5)) == pytest.approx(1.5)  # in mm
    # pooled distances: a→b {0}, b→a {0, 10}: the 95th percentile of [0, 0, 10] is 9
    c = np.zeros((5, 12), bool)
    c[0, 0] = True
    d = np.zeros((5, 12), bool)
    d[0, 0] = d[0, 10] = True
    assert hausdorff95(c, d) == pytest.approx(9.0)
    square = np.zeros((9, 9), bool)
    square[2:7, 2:7] = True
    assert hausdorff95(square, square) == 0.0


def test_lung_scores_per_lung():
    truth = np.zeros((8, 10), np.uint8)
    truth[2:6, 1:4] = 1
    truth[2:6, 6:9] = 2
    pred = truth.copy()
    pred[2:6, 8] = 0  # the right lung loses a column: 8 of 12 pixels kept
    s = lung_scores(pred, truth)
    assert s["dice_left"] == 1.0 and s["iou_left"] == 1.0 and s["hd95_left"] == 0.0
    assert s["dice_right"] == pytest.approx(2 * 8 / 20) and s["iou_right"] == pytest.approx(8 / 12)
    assert s["hd95_right"] == pytest.approx(1.0)
    m = mean_scores([s, lung_scores(truth, truth)])
    assert m["dice"] == pytest.approx((1.0 + (0.8 + 1.0) / 2) / 2)


# ---------------------------------------------------------------------------------------------
# Loss, network, grid mapping


def test_dice_bce_loss_values():
    y = torch.ones(1, 2, 4, 4)
    # logits 0: BCE = log 2; p = 0.5, soft Dice per lung = (2·8 + 1) / (8 + 16 + 1)
    assert float(dice_bce_loss(torch.zeros(1, 2, 4, 4), y)) == pytest.approx(math.log(2) + 1 - 17 / 25, rel=1e-5)
    assert float(dice_bce_loss(torch.full((1, 2, 4, 4), 30.0), y)) == pytest.approx(0.0, abs=1e-5)


def test_unet_any_size_and_model_args():
    net = UNet(UNetConfig(depth=3, width=4))
    assert net(torch.rand(2, 1, 30, 22)).shape == (2, 2, 30, 22)
    assert net.model_args == {"depth": 3, "width": 4, "in_channels": 1, "out_channels": 2}


def test_grid_round_trip_keeps_each_images_size():
    truth = np.zeros((30, 50), np.uint8)
    truth[8:22, 5:20] = 1
    truth[8:22, 30:45] = 2
    _, m = to_grid(np.random.default_rng(0).random((30, 50)).astype(np.float32), truth, 64)
    back = probs_to_labels(from_grid(torch.from_numpy(m), 30, 50))
    assert back.shape == (30, 50)
    assert lung_scores(back, truth)["dice_left"] > 0.95


# ---------------------------------------------------------------------------------------------
# A learnable Montgomery tree: dark lungs at random places, own sizes


def montgomery_with_masks(root: Path, n: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    site = root / "MontgomerySet"
    for sub in ("CXR_png", "ClinicalReadings", "ManualMask/leftMask", "ManualMask/rightMask"):
        (site / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(30, 42)), int(rng.integers(34, 46))
        yy, xx = np.mgrid[0:h, 0:w]
        cy, ry, rx = h * rng.uniform(0.42, 0.58), h * rng.uniform(0.25, 0.33), w * rng.uniform(0.12, 0.17)
        left = ((yy - cy) / ry) ** 2 + ((xx - w * rng.uniform(0.25, 0.32)) / rx) ** 2 < 1
        right = ((yy - cy) / ry) ** 2 + ((xx - w * rng.uniform(0.68, 0.75)) / rx) ** 2 < 1
        img = 0.75 - 0.45 * (left | right) + rng.normal(0, 0.04, (h, w))
        stem = f"MCUCXR_{i + 1:04d}_{i % 2}"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(site / "CXR_png" / f"{stem}.png")
        Image.fromarray(left.astype(np.uint8) * 255).save(site / "ManualMask/leftMask" / f"{stem}.png")
        Image.fromarray(right.astype(np.uint8) * 255).save(site / "ManualMask/rightMask" / f"{stem}.png")
        (site / "ClinicalReadings" / f"{stem}.txt").write_text(
            f"Patient's Sex: {'M' if i % 3 else 'F'}\nPatient's Age: 0{30 + i}Y\n\nnormal\n")
    return site


TINY = ["--config", "segmenter_tiny", "device=cpu", "data.size=32", "model.depth=2", "model.width=8",
        "train.epochs=15", "train.batch_size=4", "optim.lr=0.01", "augment.enabled=false", "train.log_every=100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("seg")
    site = montgomery_with_masks(root)
    run = root / "run"
    assert main(["train-segmenter", "--run-dir", str(run), f"data.train={site}", *TINY]) == 0
    return site, run


def test_training_raises_validation_dice(trained):
    _, run = trained
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    dices = [r["val/dice"] for r in rows if "val/dice" in r]
    assert len(dices) == 15
    assert max(dices) > dices[0] + 0.3 and max(dices) > 0.8
    scores = json.loads((run / "scores_heldout.json").read_text())
    assert scores["n"] >= 3 and scores["dice_left"] > 0.8 and scores["dice_right"] > 0.8
    assert np.isfinite(scores["hd95_left"]) and (run / "checkpoints" / "best").is_dir()


def test_segment_writes_masks_the_montgomery_loader_reads(trained, tmp_path, capsys):
    site, run = trained
    out = tmp_path / "masks"
    assert main(["segment", "--checkpoint", str(run), "--in", str(site), "--out", str(out), "--device", "cpu"]) == 0
    assert "wrote lung masks of 24 images" in capsys.readouterr().out
    # a Montgomery folder from the images and the predicted masks reads back, sizes matching
    again = tmp_path / "again" / "MontgomerySet"
    shutil.copytree(site / "CXR_png", again / "CXR_png")
    shutil.copytree(site / "ClinicalReadings", again / "ClinicalReadings")
    shutil.copytree(out / "ManualMask", again / "ManualMask")
    ds = load_tree(again.parent)
    assert len(ds.records) == 24 and not ds.problems
    dices = []
    for r in ds.records:
        pred = load_lung_mask(r)
        with Image.open(r.image) as im:
            assert pred.shape == (im.height, im.width)
        truth = load_lung_mask(next(t for t in load_tree(site.parent).records if Path(t.image).name == Path(r.image).name))
        dices.append(lung_scores(pred, truth)["dice_left"])
    assert np.mean(dices) > 0.8
    # an output folder that is not empty is refused, nothing written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    assert main(["segment", "--checkpoint", str(run), "--in", str(site), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in one_error_line(capsys)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["x.txt"]


def test_segment_refuses_a_missing_or_foreign_checkpoint(tmp_path, capsys):
    assert main(["segment", "--checkpoint", str(tmp_path / "nope"), "--in", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    assert "nope" in one_error_line(capsys) and not (tmp_path / "o").exists()
    net = UNet(UNetConfig(depth=1, width=2))
    ckpt = CheckpointManager(tmp_path / "other").save(1, {"unet": net}, model_args={"unet": {"family": "classifier"}})
    assert main(["segment", "--checkpoint", str(ckpt), "--in", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a segmenter checkpoint" in one_error_line(capsys) and not (tmp_path / "o").exists()


def test_mask_of_another_size_is_one_line_naming_the_file(tmp_path, capsys):
    site = montgomery_with_masks(tmp_path, n=8)
    bad = site / "ManualMask/rightMask/MCUCXR_0003_0.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(bad)
    run = tmp_path / "run"
    assert main(["train-segmenter", "--run-dir", str(run), f"data.train={site}", *TINY]) == 2
    err = one_error_line(capsys)
    assert str(bad) in err and "differs from image size" in err
    assert not run.exists()  # nothing half-written


def test_tree_without_masks_is_one_line(tmp_path, capsys):
    site = montgomery_with_masks(tmp_path, n=6)
    shutil.rmtree(site / "ManualMask")
    assert main(["train-segmenter", "--run-dir", str(tmp_path / "run"), f"data.train={site}", *TINY,
                 "data.skip_bad=true"]) == 2
    assert "no image with lung masks" in one_error_line(capsys)


def test_too_few_patients_for_validation_is_one_line(tmp_path, capsys):
    site = montgomery_with_masks(tmp_path, n=6)
    run = tmp_path / "run"
    assert main(["train-segmenter", "--run-dir", str(run), f"data.train={site}", *TINY,
                 "data.split_fractions=[1.0,0.0,0.0]"]) == 2
    assert "validation set is empty" in one_error_line(capsys)
    assert not run.exists()
    assert main(["train-segmenter", "--run-dir", str(run), f"data.train={site}", *TINY, "train.batch_size=8"]) == 2
    assert "larger than the training set" in one_error_line(capsys)
    assert not run.exists()


def test_resume_continues_a_copy_of_the_run(trained, tmp_path, capsys):
    site, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["train-segmenter", "--run-dir", str(copy), "--resume", "train.epochs=16"]) == 0
    assert "trained after 16/16 epochs (64 steps)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (copy / "stats.jsonl").read_text().splitlines()]
    assert sum("val/dice" in r for r in rows) == 16
    assert main(["train-classifier", "--run-dir", str(copy), "--resume"]) == 2
    assert "this is a segmenter run" in one_error_line(capsys)
