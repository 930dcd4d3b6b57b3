"""`cxr evaluate gan` end to end on tiny Shenzhen-like trees, its pieces, and its refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import one_error_line
from classifier_helpers import shenzhen_tree
from classifiers.small_cnn import SmallCNN, SmallCNNConfig
from cxr.cli.main import main
from cxr.data.record import Sample
from cxr.metrics.ssim import ssim_terms
from eval import gan_features
from eval.generative import (
    ImageGroup,
    PairDissimilarity,
    class_index,
    diversity,
    memorization,
    ms_ssim_betas,
    nearest_by_ssim,
)

FAST = ["--size", "32", "--kid-subsets", "10"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gan_eval")
    return shenzhen_tree(root / "real", n=40, seed=0), shenzhen_tree(root / "fake", n=30, seed=5)


def test_evaluate_gan_end_to_end_with_the_trained_extractor(trees, tmp_path, capsys):
    real, fake = trees
    out = tmp_path / "eval"
    assert main(["evaluate", "gan", "--real", str(real), "--fake", str(fake), "--out", str(out),
                 "--extractor", "trained", *FAST]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "metrics.csv", "memorization.csv", "examples.png",
                                               "closest_pairs.png", "runs"}
    assert not list(tmp_path.glob(".eval.*"))  # no temporary folder or claim left
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) == {"extractor", "inputs", "diversity_measure", "overall", "classes", "memorization", "cas",
                           "notes"}
    name = report["extractor"]["name"]
    assert report["extractor"]["kind"] == "trained" and name.startswith("trained-small_cnn-") and len(name) == 30
    assert f"extractor: {name}" in printed
    assert set(report["classes"]) == {"Tuberculosis", "normal"}
    overall = report["overall"]
    assert (overall["n_train"], overall["n_fake"], overall["n_heldout"]) == (28, 30, 8)
    for row in [overall, *report["classes"].values()]:
        assert row["fd"] >= 0 and row["fd_heldout"] > 0
        assert row["relative_fd"] == pytest.approx(row["fd"] / row["fd_heldout"])
        for k in ("precision", "recall", "coverage", "memorized_share_features", "memorized_share_ssim"):
            assert 0.0 <= row[k] <= 1.0
        assert row["density"] >= 0 and 0 < row["diversity_fake"] < 1 and 0 < row["diversity_real"] < 1
    mem = report["memorization"]
    assert mem["percentile"] == 1.0 and 0 <= mem["features"]["share"] <= 1 and mem["ssim"]["max_ssim"] <= 1
    assert report["diversity_measure"] in ("lpips-alex", "1-ms-ssim")
    cas = report["cas"]
    assert cas["task"] == "tb"
    for origin, n_train in (("synthetic", 24), ("real", 28)):
        assert cas[origin]["n_train"] == n_train and cas[origin]["n_test"] == 8
        assert 0 <= cas[origin]["metrics"]["auroc"] <= 1 and len(cas[origin]["intervals"]["auroc"]) == 2
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scope"], r["class"]) for r in rows] == [("overall", ""), ("class", "Tuberculosis"), ("class", "normal")]
    assert {r["extractor"] for r in rows} == {name}
    assert float(rows[0]["relative_fd"]) == pytest.approx(overall["relative_fd"], rel=1e-5)
    with open(out / "memorization.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 30

    # same inputs, same seed: the same extractor name (its hash covers weights and training images)
    again = tmp_path / "again"
    assert main(["evaluate", "gan", "--real", str(real), "--fake", str(fake), "--out", str(again),
                 "--extractor", "trained", "--no-cas", *FAST]) == 0
    second = json.loads((again / "metrics.json").read_text())
    assert second["extractor"]["name"] == name and second["cas"] is None
    assert second["overall"]["fd"] == pytest.approx(overall["fd"], rel=1e-6)


def test_a_set_against_itself_scores_like_itself(trees, tmp_path):
    real, _ = trees
    out = tmp_path / "self"
    assert main(["evaluate", "gan", "--real", str(real), "--fake", str(real), "--out", str(out), "--no-cas",
                 *FAST]) == 0
    o = json.loads((out / "metrics.json").read_text())["overall"]
    # the "generated" set holds the 28 training images themselves (and 12 unseen ones): every real
    # point has a generated twin, and at least those 28 sit nearer than any held-out image does
    assert o["recall"] == 1.0 and o["coverage"] == 1.0 and o["precision"] >= 28 / 40
    assert o["memorized_share_ssim"] >= 28 / 40 and o["memorized_share_features"] >= 28 / 40
    assert json.loads((out / "metrics.json").read_text())["memorization"]["features"]["min_distance"] == 0.0


def test_refusals_are_one_line_and_write_nothing(trees, tmp_path, capsys):
    real, fake = trees
    base = ["evaluate", "gan", "--real", str(real), "--no-cas", *FAST]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*base, "--fake", str(empty), "--out", str(tmp_path / "o1")]) == 2
    assert str(empty) in one_error_line(capsys)
    normals = shenzhen_tree(tmp_path / "normals", n=12, positives=False)
    assert main([*base, "--fake", str(normals), "--out", str(tmp_path / "o2")]) == 2
    assert "no generated image of class 'Tuberculosis'" in one_error_line(capsys)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("keep")
    assert main([*base, "--fake", str(fake), "--out", str(busy)]) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert (busy / "x.txt").read_text() == "keep"
    if not gan_features.available("inception"):
        assert main([*base, "--fake", str(fake), "--out", str(tmp_path / "o3"), "--extractor", "inception"]) == 2
        assert "not in the local cache" in one_error_line(capsys)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_auto_picks_a_local_extractor():
    kind = gan_features.resolve_kind("auto")
    assert kind in ("inception", "xrv", "trained") and gan_features.available(kind)


def test_penultimate_features_and_weights_hash():
    torch.manual_seed(0)
    model = SmallCNN(SmallCNNConfig(width=4, num_classes=1))
    model.input_size = 32
    ext = gan_features.penultimate_extractor(model, "x", torch.device("cpu"))
    feats = ext.embed(np.random.default_rng(0).random((5, 32, 32)).astype(np.float32), batch_size=2)
    assert feats.shape == (5, 32) and ext.dims == 32
    h = gan_features.weights_hash(model, ["a.png", "b.png"])
    assert h == gan_features.weights_hash(model, ["b.png", "a.png"]) and len(h) == 12
    assert h != gan_features.weights_hash(model, ["a.png"])


def test_the_xrv_extractor_gives_1024_pooled_features():
    ext = gan_features.xrv_extractor(torch.device("cpu"), weights=None)  # random weights: nothing to download
    feats = ext.embed(np.random.default_rng(0).random((2, 32, 32)).astype(np.float32))
    assert feats.shape == (2, 1024) and ext.dims == 1024 and np.isfinite(feats).all()


def test_diversity_and_ssim_neighbours():
    assert ms_ssim_betas(32) == pytest.approx((0.0448 / 0.3304, 0.2856 / 0.3304))
    assert len(ms_ssim_betas(256)) == 5 and sum(ms_ssim_betas(64)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    same = np.repeat(rng.random((1, 32, 32)).astype(np.float32), 6, axis=0)
    noise = rng.random((6, 32, 32)).astype(np.float32)
    measure = PairDissimilarity(32, torch.device("cpu"))
    assert diversity(same, measure, 0) == pytest.approx(0.0, abs=1e-5)
    assert diversity(noise, measure, 0) > 0.5
    best, idx = nearest_by_ssim(noise[[3, 1]], noise)
    assert idx.tolist() == [3, 1] and best == pytest.approx([1.0, 1.0], abs=1e-5)
    # equal to cxr.metrics.ssim's SSIM (mean of l·cs) against every reference, in small chunks too
    query, ref = rng.random((3, 32, 32)).astype(np.float32), rng.random((5, 32, 32)).astype(np.float32)
    lum, cs = ssim_terms(torch.from_numpy(np.repeat(query, 5, 0)[:, None]), torch.from_numpy(np.tile(ref, (3, 1, 1))[:, None]))
    table = (lum * cs).mean(dim=(1, 2, 3)).view(3, 5).numpy()
    best, idx = nearest_by_ssim(query, ref, budget=1)
    assert idx.tolist() == table.argmax(axis=1).tolist() and best == pytest.approx(table.max(axis=1), abs=1e-6)


def _group(name: str, images: np.ndarray) -> ImageGroup:
    recs = [Sample(f"{name}{k}.png", f"{name}{k}", "s", [0], ("TB",)) for k in range(len(images))]
    return ImageGroup(name, recs, images, images.reshape(len(images), -1)[:, :8].astype(np.float64))


def test_memorization_searches_a_seeded_subset_by_ssim():
    """ssim_images limits the SSIM search (the expensive part) to a subset of the generated and
    held-out images; the feature search still covers all, and the searched ones match a full search."""
    rng = np.random.default_rng(1)
    train, held = rng.random((10, 32, 32)).astype(np.float32), rng.random((6, 32, 32)).astype(np.float32)
    fake = np.concatenate([train[:3], rng.random((5, 32, 32)).astype(np.float32)])  # 3 copies of training images
    full = memorization(_group("t", train), _group("f", fake), _group("h", held))
    part = memorization(_group("t", train), _group("f", fake), _group("h", held), ssim_images=4, seed=0)
    assert full["ssim"]["searched"] == 8 and part["ssim"]["searched"] == 4 and part["ssim"]["heldout_searched"] == 4
    s_full = np.array([r["ssim"] for r in full["rows"]])
    s_part = np.array([r["ssim"] for r in part["rows"]])
    searched = np.isfinite(s_part)
    assert searched.sum() == 4 and np.allclose(s_part[searched], s_full[searched])
    assert [r["nearest_train_ssim"] is None for r in part["rows"]] == (~searched).tolist()
    assert (part["i_ssim"] >= 0).tolist() == searched.tolist()
    assert s_full[:3] == pytest.approx(1.0, abs=1e-5) and part["features"] == full["features"]
    again = memorization(_group("t", train), _group("f", fake), _group("h", held), ssim_images=4, seed=0)
    assert [r["ssim"] for r in again["rows"]] == pytest.approx(list(s_part), nan_ok=True)


def test_class_index_puts_multi_label_records_in_each_class():
    rows = [Sample("a", "p", "s", [1, 0], ("A", "B")), Sample("b", "p", "s", [1, 1], ("A", "B")),
            Sample("c", "p", "s", [0, 0], ("A", "B"))]
    assert {k: v.tolist() for k, v in class_index(rows).items()} == {"A": [0, 1], "B": [1], "normal": [2]}
