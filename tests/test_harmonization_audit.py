"""The harmonization audit (``cxr evaluate harmonization``): planted erasures and blobs are
found, domain AUROC reads 0.5 for one distribution and 1 for two, flip-rate maths, the command
end to end on a tiny phantom, and one error line for each bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from builders import one_error_line
from classifier_helpers import tiny_config
from classifiers.trainer import train
from cxr.cli.main import main
from cxr.metrics import harmonization as hm
from cxr.phantom.generate import PhantomConfig, generate
from eval.harmonization import detector_auroc, quick_audit
from harmonize.trees import harmonize_tree

H = W = 128


def toy_chest(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, lung mask, lesion mask): smooth textured lungs with one bright round lesion."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    lung = (((xx - 40) / 22) ** 2 + ((yy - 64) / 40) ** 2 < 1) | (((xx - 88) / 22) ** 2 + ((yy - 64) / 40) ** 2 < 1)
    img = 0.7 - 0.35 * lung + 0.03 * ndi.gaussian_filter(rng.normal(size=(H, W)), 2) * 10
    img += 0.01 * rng.normal(size=(H, W))
    lesion = (xx - 40) ** 2 + (yy - 50) ** 2 < 6 ** 2
    img = img + 0.2 * lesion
    return np.clip(img, 0, 1).astype(np.float32), lung, lesion


def test_a_flattened_lesion_counts_as_erased_and_a_kept_one_does_not():
    img, lung, lesion = toy_chest()
    c_src = hm.lesion_contrast(img, lesion, lung)
    assert c_src > 1.0
    flat = img.copy()
    flat[lesion] = img[hm.ring_mask(lesion, lung)].mean()  # the planted erasure
    gamma = img ** 0.8  # a global curve keeps the lesion
    c = np.array([hm.lesion_contrast(x, lesion, lung) for x in (img, flat, gamma)])
    assert abs(c[1]) < 0.2 * c_src
    np.testing.assert_array_equal(hm.erased(np.full(3, c_src), c), [0.0, 1.0, 0.0])
    # a lesion invisible in the source is not scored
    assert math.isnan(hm.erased(np.array([0.05]), np.array([0.0]))[0])


def test_a_planted_blob_is_a_hallucination_and_global_changes_are_not():
    img, lung, lesion = toy_chest(1)
    yy, xx = np.mgrid[0:H, 0:W]
    disc = (xx - 88) ** 2 + (yy - 80) ** 2 < 4 ** 2
    planted = np.clip(img + 0.15 * disc, 0, 1)
    blobs = hm.residual_blobs(img, planted, lung, lesion)
    assert len(blobs) == 1
    assert blobs[0]["peak"] > 0 and abs(blobs[0]["y"] - 80) < 2 and abs(blobs[0]["x"] - 88) < 2
    assert hm.residual_blobs(img, img.copy(), lung, lesion) == []
    assert hm.residual_blobs(img, img ** 0.7, lung, lesion) == []  # a gray-level curve
    haze = img + 0.1 * np.exp(-((xx - 64) ** 2 + (yy - 64) ** 2) / 60.0 ** 2)
    assert hm.residual_blobs(img, haze.astype(np.float32), lung, lesion) == []  # a smooth shading
    # the planted blob is outside the lung: not counted; inside the true lesion: not counted
    assert hm.residual_blobs(img, planted, lung & ~disc, lesion) == []
    assert hm.residual_blobs(img, planted, lung, lesion | disc) == []


def _texture_set(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = [np.clip(0.4 + shift + 0.1 * ndi.gaussian_filter(rng.normal(size=(32, 32)), 1.5) * 4, 0, 1)
           for _ in range(n)]
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("kind", ["histogram", "texture", "cnn"])
def test_domain_auroc_is_half_for_one_distribution_and_one_for_a_shift(kind):
    a, same, shifted = _texture_set(40, 0), _texture_set(40, 1), _texture_set(40, 2, shift=0.25)
    y = np.r_[np.zeros(40), np.ones(40)]
    groups = [f"p{i}" for i in range(80)]
    kw = {"seed": 0, "n_boot": 50, "cnn_epochs": 15}
    if kind == "texture":  # texture: a finer grain rather than a brighter image
        rng = np.random.default_rng(3)
        shifted = np.stack([np.clip(0.4 + 0.1 * ndi.gaussian_filter(rng.normal(size=(32, 32)), 0.5) * 2, 0, 1)
                            for _ in range(40)]).astype(np.float32)
    null = detector_auroc(kind, np.concatenate([a, same]), y, groups, **kw)
    shift = detector_auroc(kind, np.concatenate([a, shifted]), y, groups, **kw)
    assert abs(null["auroc"] - 0.5) < 0.2, null
    assert shift["auroc"] > 0.95, shift
    assert shift["lo"] <= shift["auroc"] <= shift["hi"] and null["folds"] == 5


def test_flip_rate_maths_on_hand_made_predictions():
    p_src = np.array([0.9, 0.8, 0.2, 0.1, 0.6, 0.4, 0.7, 0.3])
    p_harm = np.array([0.9, 0.4, 0.2, 0.7, 0.6, 0.4, 0.65, 0.35])
    out = hm.prediction_changes(p_src, p_harm, threshold=0.5)
    assert out["flip_rate"] == pytest.approx(2 / 8) and out["agreement"] == pytest.approx(6 / 8)
    assert out["flip_pos_to_neg"] == pytest.approx(1 / 8) and out["flip_neg_to_pos"] == pytest.approx(1 / 8)
    assert out["mean_abs_dp"] == pytest.approx((0.4 + 0.6 + 0.05 + 0.05) / 8)
    # the stored threshold, not 0.5, decides: at 0.75 image 7 (0.7 -> 0.65) does not flip, image 2 (0.8 -> 0.4) does
    assert hm.prediction_changes(p_src, p_harm, threshold=0.75)["flip_rate"] == pytest.approx(1 / 8)
    ci = hm.prediction_changes_ci(p_src, p_harm, 0.5, [f"p{i // 2}" for i in range(8)], n_boot=200)
    assert ci["flip_rate_lo"] <= 0.25 <= ci["flip_rate_hi"] and ci["flip_rate_hi"] <= 1.0
    assert hm.drop_recovered(0.9, 0.6, 0.75) == pytest.approx(0.5)
    assert math.isnan(hm.drop_recovered(0.6, 0.7, 0.8))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "phantom"
    generate(PhantomConfig(preset="nlm", out=out, size=48, n=48, seed=3, workers=1))
    return out


def _run(*argv: str) -> int:
    return main(["evaluate", "harmonization", *argv])


def test_cli_end_to_end_with_a_classical_method_and_a_classifier(phantom, tmp_path, capsys):
    src, ref = phantom / "MontgomerySet", phantom / "ChinaSet_AllFiles"
    harmonized = tmp_path / "mc_hist"
    harmonize_tree(src, harmonized, ref)
    run = tmp_path / "clf"
    train(tiny_config("tb", ref, tmp_path / "cache", "train.epochs=1"), run)
    out = tmp_path / "audit"
    assert _run("--source", str(src), "--harmonized", str(harmonized), "--reference", str(ref),
                "--classifier", str(run), "--truth", str(phantom), "--out", str(out), "--size", "32",
                "--folds", "3", "--cnn-epochs", "2", "--n-boot", "50") == 0
    assert sorted(p.name for p in out.iterdir()) == ["audit.csv", "audit.json", "contact_sheet.png", "per_image.csv"]
    report = json.loads((out / "audit.json").read_text())
    n = len(list((src / "CXR_png").glob("*.png")))
    assert report["n_images"] == n
    for det in ("histogram", "texture", "cnn"):
        for cond in ("before", "after"):
            assert 0.0 <= report["indistinguishability"][det][cond]["auroc"] <= 1.0
    b = report["disease_preservation"]
    thr = json.loads((run / "thresholds.json").read_text())["thresholds"][0] \
        if (run / "thresholds.json").exists() else b["threshold"]
    assert b["threshold"] == pytest.approx(thr) and b["threshold_from"].startswith("validation")
    assert b["flip_rate"] == pytest.approx(1 - b["agreement"]) and 0 <= b["flip_rate"] <= 1
    c, d = report["erasure_hallucination"], report["paired_fidelity"]
    assert c["n_images"] == n and c["n_lesions"] > 0 and 0.0 <= c["erase_rate"] <= 1.0
    assert d["target_site"] == "shenzhen" and 0 < d["harmonized"]["ssim"] <= 1 and "ssim" in d["measures"]
    rows = list(csv.DictReader(open(out / "per_image.csv", encoding="utf-8")))
    assert len(rows) == n and {r["flipped"] for r in rows} <= {"0", "1"}
    flips = sum(int(r["flipped"]) for r in rows)
    assert flips / n == pytest.approx(b["flip_rate"])
    figures = {(r["section"], r["metric"], r["condition"]) for r in csv.DictReader(open(out / "audit.csv"))}
    assert ("indistinguishability", "domain_auroc_cnn", "after") in figures
    assert ("erasure_hallucination", "erase_rate", "harmonized") in figures
    with Image.open(out / "contact_sheet.png") as im:
        assert im.size[0] == 4 * 128
    assert "flip rate" in capsys.readouterr().out

    cheap = quick_audit(src, {"histogram": harmonized}, ref, classifier=run, n_boot=20)
    assert list(cheap) == ["none", "histogram"] and cheap["none"]["flip_rate"] == 0.0
    assert cheap["histogram"]["flip_rate"] == pytest.approx(b["flip_rate"])


def test_identical_tree_audits_clean(phantom, tmp_path):
    src, ref = phantom / "MontgomerySet", phantom / "ChinaSet_AllFiles"
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    out = tmp_path / "audit"
    assert _run("--source", str(src), "--harmonized", str(copy), "--reference", str(ref), "--truth", str(phantom),
                "--out", str(out), "--size", "32", "--folds", "3", "--detectors", "histogram", "--n-boot", "20") == 0
    r = json.loads((out / "audit.json").read_text())
    a = r["indistinguishability"]["histogram"]
    assert a["before"]["auroc"] == pytest.approx(a["after"]["auroc"])
    assert r["erasure_hallucination"]["erase_rate"] == 0.0
    assert r["erasure_hallucination"]["hallucinations_per_image"] == 0.0


def _args(src: Path, harm: Path, ref: Path, out: Path, *extra: str) -> list[str]:
    return ["--source", str(src), "--harmonized", str(harm), "--reference", str(ref), "--out", str(out),
            "--size", "32", "--folds", "3", "--detectors", "histogram", "--n-boot", "20", *extra]


def test_bad_inputs_are_one_error_line_and_write_nothing(phantom, tmp_path, capsys):
    src, ref = phantom / "MontgomerySet", phantom / "ChinaSet_AllFiles"
    out = tmp_path / "audit"
    one = tmp_path / "one" / "ChinaSet_AllFiles"
    shutil.copytree(ref, one)
    for png in sorted((one / "CXR_png").glob("*.png"))[1:]:
        png.unlink()
        (one / "ClinicalReadings" / f"{png.stem}.txt").unlink()
    assert _run(*_args(src, src, one, out)) == 2
    assert "at least 2" in one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(*_args(src, src, empty, out)) == 2
    one_error_line(capsys)
    fewer = tmp_path / "fewer"
    shutil.copytree(src, fewer)
    next((fewer / "CXR_png").glob("*.png")).unlink()
    assert _run(*_args(src, fewer, ref, out)) == 2
    assert "missing" in one_error_line(capsys)
    assert not out.exists()


def test_missing_masks_give_one_note_and_a_fallback(phantom, tmp_path, capsys):
    truth = tmp_path / "phantom"
    shutil.copytree(phantom, truth)
    manifest = truth / "phantom_truth" / "manifest.csv"
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    mc = [r for r in rows if r["tree"] == "montgomery"]
    mc[0]["lung_mask"] = ""
    dropped = mc[1]["image"]
    rows = [r for r in rows if r["image"] != dropped]
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    src2 = truth / "MontgomerySet"
    out = tmp_path / "audit"
    assert _run(*_args(src2, src2, truth / "ChinaSet_AllFiles", out, "--truth", str(truth))) == 0
    err = capsys.readouterr().err
    assert err.count("no phantom truth for 1 of") == 1 and err.count("no lung mask for 1 of") == 1
    r = json.loads((out / "audit.json").read_text())
    assert r["erasure_hallucination"]["n_images"] == r["n_images"] - 1
