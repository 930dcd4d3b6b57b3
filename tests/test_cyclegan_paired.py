"""Paired-truth scoring (eval/paired.py) on a phantom-like folder with a known answer."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.data.image import load_image
from cxr.errors import DataError
from cyclegan_helpers import nlm_site
from eval.paired import (
    BASELINES,
    band_reports,
    band_scores,
    band_swap,
    best_field,
    centre_mask,
    examples_figure,
    field_sweep,
    format_bands,
    format_factors,
    format_gains,
    format_scores,
    pair_metrics,
    paired_gain,
    phantom_pairs,
    phantom_report,
    phantom_reports,
    psnr,
    score_pairs,
    split_subset,
    ssim,
    ssim_factors,
    ssim_map,
    summarize,
)


def test_ssim_and_psnr_numbers():
    rng = np.random.default_rng(0)
    x = rng.random((32, 32)).astype(np.float32)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert psnr(x, x) == math.inf
    y = np.clip(x + 0.1, 0, 1)
    mse = float(np.mean((y - x) ** 2))
    assert psnr(y, x) == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    assert ssim(1 - x, x) < 0  # inverted contrast: negative structural correlation
    s = score_pairs([(x, x), (y, x)])
    assert s["n"] == 2 and s["ssim"] == pytest.approx((1 + ssim(y, x)) / 2)
    # Within a mask only the masked pixels count: damage outside it does not lower the score.
    damaged = x.copy()
    damaged[:, 16:] = 0
    left = np.zeros_like(x, dtype=bool)
    left[:, :8] = True
    assert ssim(damaged, x, left) == pytest.approx(1.0, abs=1e-5) and ssim(damaged, x) < 0.8
    assert score_pairs([(damaged, x)], [left])["ssim_lung"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(DataError, match="shapes differ"):
        ssim(x, x[:16])
    with pytest.raises(DataError, match="does not fit"):
        ssim(x, x, np.zeros_like(left))


def test_centre_and_border_are_scored_apart():
    """Damage outside the central 70 % lowers the border SSIM only (windows straddling the
    boundary aside), and the two regions tile the image."""
    m = centre_mask((40, 60))
    assert m.sum() == 28 * 42 and m[6:34, 9:51].all() and not m[:6].any() and not m[:, :9].any()
    # exactly the pixels the discriminators judge with loss.d_field=0.7
    from gan.cyclegan.loss import centre_crop

    for shape in ((40, 60), (64, 52), (64, 64), (33, 47)):
        idx = torch.arange(shape[0] * shape[1]).reshape(1, 1, *shape)
        assert np.array_equal(np.sort(centre_crop(idx, 0.7).flatten().numpy()), np.flatnonzero(centre_mask(shape)))
    rng = np.random.default_rng(1)
    x = rng.random((40, 60)).astype(np.float32)
    framed = x.copy()
    framed[~centre_mask((40, 60), 0.9)] = 1.0  # a bright blade in the outer 5 %
    s = score_pairs([(framed, x)])
    assert s["ssim_centre"] == pytest.approx(1.0, abs=1e-3) and s["ssim_border"] < 0.8
    assert s["ssim"] == pytest.approx((m.sum() * s["ssim_centre"] + (~m).sum() * s["ssim_border"]) / m.size, abs=1e-5)
    assert "centre" in format_scores({"blade": s}) and "border" in format_scores({"blade": s})


@pytest.fixture
def phantom(tmp_path) -> Path:
    """Montgomery-like and Shenzhen-like trees plus phantom_truth/ as `cxr phantom` writes it."""
    root = tmp_path / "phantom"
    mc = nlm_site(root, "montgomery", 10, sizes=[(40, 32), (36, 44)])
    sz = nlm_site(root, "shenzhen", 10, seed=1)
    rows = []
    for tree, folder in (("montgomery", mc), ("shenzhen", sz)):
        for k, png in enumerate(sorted((folder / "CXR_png").iterdir())):
            sid = f"S{len(rows):06d}"
            img = load_image(png)
            renders = {"montgomery": img, "shenzhen": np.clip(img, 0, 1) ** 0.5}  # the "other chain"
            for site, r in renders.items():
                (root / "phantom_truth" / site).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.round(r * 255).astype(np.uint8)).save(root / "phantom_truth" / site / f"{sid}.png")
            lung = np.zeros(img.shape, np.uint8)
            lung[5:-5, 3:img.shape[1] // 2 - 1], lung[5:-5, img.shape[1] // 2 + 1:-3] = 1, 2
            (root / "phantom_truth" / "lung").mkdir(parents=True, exist_ok=True)
            Image.fromarray(lung).save(root / "phantom_truth" / "lung" / f"{sid}.png")
            rows.append({"subject_id": sid, "tree": tree, "image": f"{folder.name}/CXR_png/{png.name}",
                         "geometry": tree, "render_shenzhen": f"phantom_truth/shenzhen/{sid}.png",
                         "render_montgomery": f"phantom_truth/montgomery/{sid}.png",
                         "lung_mask": f"phantom_truth/lung/{sid}.png"})
    with open(root / "phantom_truth" / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_phantom_report_scores_each_method_against_the_same_subject(phantom, tmp_path):
    pairs = phantom_pairs(phantom)
    assert len(pairs) == 10 and pairs[0].site_folder == "MontgomerySet" and pairs[0].rel.startswith("CXR_png/")
    # A perfect translator: the translated tree holds the true Shenzhen-like renders.
    perfect = tmp_path / "perfect"
    shutil.copytree(phantom / "MontgomerySet", perfect)
    for p in pairs:
        shutil.copy(p.truth, perfect / p.rel)
    report = phantom_report(phantom, perfect, split="all")
    assert set(report) == {"untranslated", "histogram", "cyclegan"}
    assert all(s["n"] == 10 for s in report.values())
    assert report["cyclegan"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert report["cyclegan"]["ssim_lung"] == pytest.approx(1.0, abs=1e-5)
    assert report["untranslated"]["ssim"] < 0.99 and report["untranslated"]["ssim_lung"] < 0.99
    assert report["histogram"]["psnr"] > report["untranslated"]["psnr"]  # a tone curve is what matching fixes
    test_only = phantom_report(phantom, perfect, split="test")
    assert 0 < test_only["cyclegan"]["n"] < 10
    # several splits in one call (one histogram fit) score exactly as one call per split
    both = phantom_reports(phantom, perfect, splits=("test", "all"))
    assert list(both) == ["test", "all"] and both["test"] == test_only and both["all"] == report
    assert "cyclegan" in format_scores(report) and "SSIM lung" in format_scores(report)


def test_reports_read_the_source_tree_once_for_every_split(phantom, monkeypatch):
    import eval.paired

    reads = []
    real = eval.paired.load_tree

    def counting(folder, *args, **kwargs):
        reads.append(Path(folder).name)
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(eval.paired, "load_tree", counting)
    reports = phantom_reports(phantom, splits=("val", "test", "all"))
    assert reads.count("MontgomerySet") == 1 and set(reports) == {"val", "test", "all"}
    reads.clear()
    field_sweep(phantom, fields=(1.0, 0.8), splits=("val", "test"))
    assert reads.count("MontgomerySet") == 1


def test_field_sweep_scores_each_field_and_picks_on_the_given_split(phantom):
    sweep = field_sweep(phantom, fields=(1.0, 0.8, 0.6), splits=("all", "test"))
    assert list(sweep) == ["all", "test"] and list(sweep["all"]) == [1.0, 0.8, 0.6]
    report = phantom_report(phantom, split="all", histogram_field=0.8)
    # field 1.0 is the whole-image baseline and 0.8 the central one that phantom_report scores
    assert sweep["all"][1.0]["ssim"] == pytest.approx(report["histogram"]["ssim"], abs=1e-9)
    assert sweep["all"][0.8]["ssim"] == pytest.approx(report["histogram_centre"]["ssim"], abs=1e-9)
    assert sweep["all"][1.0]["n"] == 10 and 0 < sweep["test"][1.0]["n"] < 10
    assert best_field(sweep["all"]) == max(sweep["all"], key=lambda f: sweep["all"][f]["ssim"])


def test_field_sweep_command_picks_on_validation_and_reports_test(phantom, capsys):
    assert _bench().main(["--phantom", str(phantom), "--field-sweep"]) == 0
    out = capsys.readouterr().out
    sweep = field_sweep(phantom)
    chosen = best_field(sweep["val"])
    assert f"chosen on validation: field {chosen:g}; test SSIM {sweep['test'][chosen]['ssim']:.4f}" in out
    assert len([line for line in out.splitlines() if line.startswith((" 1.00", " 0.85", " 0.60"))]) == 3


def test_best_field_prefers_the_wider_field_on_a_tie():
    assert best_field({1.0: {"ssim": 0.8}, 0.85: {"ssim": 0.9}, 0.7: {"ssim": 0.9}}) == 0.85
    assert best_field({1.0: {"ssim": 0.8, "psnr": 20.0}, 0.85: {"ssim": 0.9, "psnr": 19.0}}, "psnr") == 1.0


def test_missing_truth_and_unknown_site_are_one_line(phantom, tmp_path):
    with pytest.raises(DataError, match="no renders for site 'vindr'"):
        phantom_pairs(phantom, target_site="vindr")
    with pytest.raises(DataError, match="no phantom truth manifest"):
        phantom_pairs(tmp_path / "nowhere")


def test_target_truth_keeps_the_source_exposure():
    """The paired truth is "this exposure developed by the target site": the Shenzhen-like render
    of a Montgomery-like exposure keeps its frame, collimation blades and lead marker at the same
    pixels, so a translator that removes them is scored down against it, as it should be."""
    from dataclasses import replace

    from cxr.phantom import chains as C
    from test_phantom_chains import toy_projection

    home = replace(C.load_chain("montgomery"), collimation_prob=1.0, collimation=(0.08, 0.08),
                   marker_prob=1.0, marker_left_prob=1.0)
    target = C.load_chain("shenzhen")
    pair = C.acquire_all(toy_projection(64, tb=False), [home, target], home, 64, seed=5)
    src, truth = pair["montgomery"], pair["shenzhen"]
    geom = truth.geometry
    assert geom == src.geometry and truth.image.shape == src.image.shape == (geom.height, geom.width)
    assert geom.frame in home.frames and geom.frame not in target.frames  # the source's frame
    x0, y0, x1, y1 = geom.field
    blades = np.ones(truth.image.shape, bool)
    blades[y0:y1, x0:x1] = False
    mk = geom.marker
    g = C.glyph(mk.letter, mk.scale)
    for img in (src.image, truth.image):
        assert img[blades].mean() > img[~blades].mean() + 0.1  # the blades are burnt into both
        patch = img[mk.y:mk.y + g.shape[0], mk.x:mk.x + g.shape[1]]
        assert patch[g].mean() > patch[~g].mean() + 0.2  # and so is the marker, in the same place
    # Removing the blades (what the target site's unbordered images teach an unpaired translator)
    # costs SSIM against this truth even when the rest is perfect.
    erased = truth.image.copy()
    erased[blades] = truth.image[~blades].mean()
    assert ssim(erased, truth.image) < 0.9


def test_examples_figure_shows_source_translation_and_truth_per_subject(phantom, tmp_path):
    pairs = phantom_pairs(phantom)[:3]
    perfect = tmp_path / "perfect"
    shutil.copytree(phantom / "MontgomerySet", perfect)
    for p in pairs:
        shutil.copy(p.truth, perfect / p.rel)
    out = examples_figure(pairs, perfect, tmp_path / "fig" / "examples.png", tile=48, caption_h=10)
    img = np.asarray(Image.open(out))
    assert img.shape == (3 * (48 + 10), 3 * 48)
    # The middle column holds the translation, here the truth itself: it equals the last column.
    row = img[:48]
    assert np.array_equal(row[:, 48:96], row[:, 96:144]) and not np.array_equal(row[:, :48], row[:, 96:144])
    with pytest.raises(ValueError, match="no pairs"):
        examples_figure([], perfect, tmp_path / "empty.png")


def _bench():
    """experiments/paired_proof.py as a module."""
    from experiments import paired_proof

    return paired_proof


def test_checkpoint_curve_scores_every_kept_checkpoint(phantom, tmp_path):
    from cyclegan_helpers import tiny_config
    from gan.cyclegan.trainer import train

    bench = _bench()
    cfg = tiny_config(phantom / "MontgomerySet", phantom / "ChinaSet_AllFiles", tmp_path / "cache",
                      "train.steps=2", "train.ckpt_every=1", "train.keep_last=0", "model.residual=true")
    run = train(cfg, tmp_path / "run").run_dir
    curve = bench.checkpoint_curve(phantom, run)
    assert [name for name, _ in curve] == ["step-00000001", "step-00000002"]
    n_test = len(split_subset(phantom_pairs(phantom), "test"))
    assert all(s["n"] == n_test and 0 < s["ssim"] <= 1 and "ssim_lung" in s for _, s in curve)
    assert curve[0][1]["ssim"] != curve[1][1]["ssim"]  # each checkpoint's own generator


def test_prematch_trains_and_translates_the_histogram_matched_tree(phantom, tmp_path):
    """data.prematch=histogram (here by its deprecated flag --prematch histogram): the trainer
    matches domain A first, the CycleGAN sees only the matched images, the translation of the
    original tree applies the same match."""
    import json

    bench = _bench()
    run = tmp_path / "run"
    assert bench.main(["--phantom", str(phantom), "--run-dir", str(run), "--size", "32", "--steps", "1",
                       "--prematch", "histogram", "--", "train.ckpt_every=0", "train.image_every=0"]) == 0
    matched = run / "prematched" / "MontgomerySet"
    names = sorted(p.name for p in (matched / "CXR_png").iterdir())
    assert names == sorted(p.name for p in (phantom / "MontgomerySet" / "CXR_png").iterdir())
    # every image the generator saw in domain A is a matched one
    seen = [line for line in (run / "images_seen.txt").read_text().splitlines() if "MontgomerySet" in line]
    assert seen and all("prematched" in line for line in seen)
    # the matched tree has the Shenzhen-like reference's gray levels, not the source's
    src, out = load_image(phantom / "MontgomerySet" / "CXR_png" / names[0]), load_image(matched / "CXR_png" / names[0])
    assert not np.array_equal(src, out)
    results = json.loads((run / "paired" / "results.json").read_text())
    assert results["prematch"] == "histogram" and results["test"]["cyclegan"]["n"] > 0
    # validation is reported too (options are chosen on it); val and test are both non-empty and
    # together leave images for training
    n = {split: results[split]["cyclegan"]["n"] for split in ("val", "test", "all")}
    assert n["val"] > 0 and n["val"] + n["test"] < n["all"]
    assert "prematch: histogram" in (run / "config.yaml").read_text()  # the flag is the config key
    # data.prematch_field: a run matched on the central field (the manifest records it), whose
    # report adds that matching as a baseline of its own; a finished run (--run) is scored with
    # its own config's match.
    first = load_image(matched / "CXR_png" / names[0])
    run2 = tmp_path / "run2"
    assert bench.main(["--phantom", str(phantom), "--run-dir", str(run2), "--size", "32", "--steps", "1", "--",
                       "data.prematch=histogram", "data.prematch_field=0.7", "train.ckpt_every=0",
                       "train.image_every=0"]) == 0
    matched2 = run2 / "prematched" / "MontgomerySet"
    assert json.loads((matched2 / "cxr_harmonization.json").read_text())["field"] == 0.7
    assert not np.array_equal(first, load_image(matched2 / "CXR_png" / names[0]))
    assert bench.main(["--phantom", str(phantom), "--run", str(run2), "--size", "32", "--weights", "raw"]) == 0
    results = json.loads((run2 / "paired-raw" / "results.json").read_text())
    assert results["prematch_field"] == 0.7 and results["weights"] == "raw"
    assert {"untranslated", "histogram", "histogram_centre", "cyclegan"} == set(results["test"])
    # The translation went through the run's match: it equals translating the matched tree.
    from gan.cyclegan.translate import load_translator, translate_tree

    plain = load_translator(run2, "a2b", weights="raw")
    plain.prematch = None
    translate_tree(matched2, tmp_path / "plain", plain)
    out = run2 / "paired-raw" / "MontgomerySet_a2b" / "CXR_png"
    assert all(np.array_equal(load_image(out / n), load_image(tmp_path / "plain" / "CXR_png" / n)) for n in names)


def test_portrait_and_landscape_frames_are_scored_apart():
    rng = np.random.default_rng(3)
    tall, wide = rng.random((40, 32)), rng.random((32, 40))
    worse = np.clip(wide + 0.2 * rng.standard_normal(wide.shape), 0, 1)
    s = score_pairs([(tall, tall), (worse, wide)])
    assert s["n_portrait"] == 1 and s["n_landscape"] == 1
    assert s["ssim_portrait"] == pytest.approx(1.0, abs=1e-5)
    assert s["ssim_landscape"] == pytest.approx(ssim(worse, wide))
    assert s["ssim"] == pytest.approx((s["ssim_portrait"] + s["ssim_landscape"]) / 2)
    assert "landscape" in format_scores({"m": s})
    only_tall = score_pairs([(tall, tall)])
    assert only_tall["n_landscape"] == 0 and math.isnan(only_tall["ssim_landscape"])
    assert "landscape" not in format_scores({"m": only_tall})  # one orientation: no split columns


def test_ssim_factors_multiply_to_the_ssim_map_and_tell_gray_level_from_texture():
    rng = np.random.default_rng(4)
    truth = np.clip(0.5 + 0.15 * rng.standard_normal((48, 40)), 0, 1).astype(np.float32)
    lum, cs = ssim_factors(truth * 0.9 + 0.05, truth)
    assert torch.allclose(lum * cs, ssim_map(truth * 0.9 + 0.05, truth), atol=1e-5)
    darker = np.clip(truth - 0.2, 0, 1)  # a gray-level error: edges and texture kept
    noisy = np.clip(truth + 0.15 * rng.standard_normal(truth.shape), 0, 1)  # texture lost, mean kept
    s = score_pairs([(darker, truth)])
    n = score_pairs([(noisy, truth)])
    assert s["luminance"] < 0.95 < s["cs"]
    assert n["cs"] < 0.8 < 0.99 < n["luminance"]
    assert s["luminance_portrait"] == s["luminance"] and math.isnan(s["cs_landscape"])
    both = score_pairs([(darker, truth), (noisy.T, truth.T)])
    assert both["cs_landscape"] == pytest.approx(n["cs"], abs=1e-6)
    assert both["luminance_portrait"] == pytest.approx(s["luminance"], abs=1e-6)
    title, *table = format_factors({"m": both}).splitlines()
    assert title.startswith("SSIM's factors")
    assert table[0].split() == ["method", "l", "cs", "l_portrait", "cs_portrait", "l_landscape", "cs_landscape"]
    assert [float(v) for v in table[1].split()[1:]] == pytest.approx(
        [both[k] for k in ("luminance", "cs", "luminance_portrait", "cs_portrait", "luminance_landscape",
                           "cs_landscape")], abs=1e-4)
    assert format_factors({"m": s}).splitlines()[1].split() == ["method", "l", "cs"]  # one orientation


def test_band_swap_puts_the_truths_coarse_or_fine_part_in_and_says_where_an_error_lives():
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:48, 0:40] / 48.0
    truth = np.clip(0.5 + 0.2 * np.sin(6 * x) * np.cos(5 * y) + 0.05 * rng.standard_normal((48, 40)), 0, 1)
    truth = truth.astype(np.float32)
    shading = (truth + 0.25 * (x - 0.4)).astype(np.float32)  # a smooth gray-level error only
    grain = (truth + 0.1 * rng.standard_normal(truth.shape)).astype(np.float32)  # a pixel-scale error only
    # the two swapped images add up to the prediction plus the truth, exactly
    coarse, fine = band_swap(shading, truth, 4.0)
    np.testing.assert_allclose(coarse + fine, shading + truth, atol=1e-5)
    assert band_swap(truth, truth, 2.0)[0] == pytest.approx(truth, abs=1e-6)
    s = band_scores([(shading, truth)], sigmas=(1.0, 8.0))
    g = band_scores([(grain, truth)], sigmas=(1.0, 8.0))
    assert list(s) == ["as is", "truth coarse σ1", "truth fine σ1", "truth coarse σ8", "truth fine σ8"]
    # a shading error is won back by the truth's coarse part, not by its fine part ...
    assert s["truth coarse σ8"]["ssim"] > 0.99 and s["truth fine σ8"]["ssim"] < s["as is"]["ssim"] + 0.02
    # ... and grain by the fine part at a small σ, not by the coarse part
    assert g["truth fine σ1"]["ssim"] > g["as is"]["ssim"] + 0.2
    assert g["truth coarse σ8"]["ssim"] < g["as is"]["ssim"] + 0.02
    title, head, *rows = format_bands(g).splitlines()
    assert title.startswith("Where the error lives") and head.split() == ["swap", "SSIM", "l", "cs"]
    assert rows[0].split()[:3] == ["as", "is", f"{g['as is']['ssim']:.4f}"] and len(rows) == 5
    with pytest.raises(DataError, match="shapes differ"):
        band_swap(truth, truth.T, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        band_swap(truth, truth, 0.0)


def test_band_reports_score_a_translated_tree_per_split_and_the_command_prints_them(phantom, tmp_path, capsys):
    import json

    perfect = tmp_path / "perfect"
    shutil.copytree(phantom / "MontgomerySet", perfect)
    for p in phantom_pairs(phantom):
        shutil.copy(p.truth, perfect / p.rel)
    report = band_reports(phantom, perfect, splits=("test", "all"), sigmas=(2.0,))
    assert list(report) == ["test", "all"] and report["all"]["as is"]["n"] == 10
    assert all(s["ssim"] == pytest.approx(1.0, abs=1e-5) for s in report["all"].values())
    # through the benchmark: a one-step run, then --run --bands adds the table and the JSON key
    bench = _bench()
    run = tmp_path / "run"
    assert bench.main(["--phantom", str(phantom), "--run-dir", str(run), "--size", "32", "--steps", "1",
                       "--", "train.ckpt_every=0", "train.image_every=0"]) == 0
    assert "bands" not in json.loads((run / "paired" / "results.json").read_text())
    capsys.readouterr()
    # --seed moves training and the histogram reference, never the scored split (data.split_seed)
    assert bench.main(["--phantom", str(phantom), "--run", str(run), "--size", "32", "--seed", "1", "--bands"]) == 0
    printed = capsys.readouterr().out
    assert "Where the error lives" in printed and "truth fine σ8" in printed
    bands = json.loads((run / "paired" / "results.json").read_text())["bands"]
    assert set(bands) == {"val", "test"} and bands["test"]["as is"]["n"] > 0
    assert bands["test"]["as is"]["ssim"] == pytest.approx(
        json.loads((run / "paired" / "results.json").read_text())["test"]["cyclegan"]["ssim"], abs=1e-6)


def test_patient_bootstrap_intervals_of_the_mean_ssim_and_of_paired_gains():
    rng = np.random.default_rng(6)
    truth = [np.clip(0.5 + 0.2 * rng.standard_normal((24, 20)), 0, 1).astype(np.float32) for _ in range(12)]
    noise = [0.02 + 0.02 * k for k in range(12)]  # every image damaged by another amount
    worse = [np.clip(t + a * rng.standard_normal(t.shape), 0, 1).astype(np.float32) for t, a in zip(truth, noise)]
    ids = [f"P{k // 2}" for k in range(12)]  # two images per patient
    s = score_pairs(zip(worse, truth), patient_ids=ids)
    assert s["ssim_lo"] < s["ssim"] < s["ssim_hi"] < 1.0
    # every image equal: nothing to resample, the interval is the point
    same = score_pairs([(t, t) for t in truth], patient_ids=ids)
    assert same["ssim_lo"] == pytest.approx(1.0, abs=1e-5) and same["ssim_hi"] == pytest.approx(1.0, abs=1e-5)
    assert "ssim_lo" not in score_pairs(zip(worse, truth))  # no ids, no interval
    # resampling patients, not images: with each patient's two images alike the interval is
    # wider than the one that takes twelve images as twelve patients
    alike = [worse[k - k % 2] for k in range(12)]
    rows = [pair_metrics(a, truth[k - k % 2]) for k, a in enumerate(alike)]
    by_patient = summarize(rows, ids)
    by_image = summarize(rows, [str(k) for k in range(12)])
    assert by_patient["ssim_hi"] - by_patient["ssim_lo"] > by_image["ssim_hi"] - by_image["ssim_lo"]
    # paired gains: the truth over the damaged images is positive with an interval above 0;
    # a method against itself gains exactly nothing
    perfect = [pair_metrics(t, t) for t in truth]
    damaged = [pair_metrics(w, t) for w, t in zip(worse, truth)]
    g, lo, hi = paired_gain(perfect, damaged, ids)
    assert 0 < lo < g < hi and g == pytest.approx(1.0 - s["ssim"], abs=1e-6)
    assert paired_gain(damaged, damaged, ids) == (0.0, 0.0, 0.0)


def test_harmonization_scores_give_intervals_and_gains_over_both_baselines(phantom, tmp_path):
    perfect = tmp_path / "perfect"
    shutil.copytree(phantom / "MontgomerySet", perfect)
    for p in phantom_pairs(phantom):
        shutil.copy(p.truth, perfect / p.rel)
    report = phantom_report(phantom, perfect, split="all", histogram_field=0.7)
    assert BASELINES == ("untranslated", "histogram")
    for name in BASELINES:
        assert not any(k.startswith("gain_vs") for k in report[name])
    for name in ("cyclegan", "histogram_centre"):
        for base in BASELINES:
            g, lo, hi = (report[name][f"gain_vs_{base}{k}"] for k in ("", "_lo", "_hi"))
            assert g == pytest.approx(report[name]["ssim"] - report[base]["ssim"], abs=1e-9) and lo <= g <= hi
    assert report["cyclegan"]["gain_vs_untranslated_lo"] > 0  # the truth is clearly above the source
    assert all(s["ssim_lo"] <= s["ssim"] <= s["ssim_hi"] for s in report.values())
    table = format_scores(report).splitlines()
    assert "95 % CI" in table[0]
    lo, hi = (float(v) for v in table[1].split()[4].split("-"))
    assert (lo, hi) == pytest.approx((report["untranslated"]["ssim_lo"], report["untranslated"]["ssim_hi"]), abs=1e-4)
    gains = format_gains(report).splitlines()
    assert gains[0].startswith("SSIM gained over each baseline") and len(gains) == 1 + 4
    assert gains[1].startswith("histogram_centre - untranslated: +") or gains[1].startswith("histogram_centre - untranslated: -")
    assert any(line.startswith("cyclegan - histogram: +") for line in gains)
    assert format_gains({"untranslated": report["untranslated"]}) == ""
