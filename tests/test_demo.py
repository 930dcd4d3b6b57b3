"""`cxr demo` end to end on a small phantom: every stage runs and the summary says so."""

from __future__ import annotations

import json
import re

from PIL import Image

from cxr.cli.main import main
from cxr.data.layouts import load_tree
from cxr.data.splits import split_records


def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "48", "--n", "60", "--workers", "1", "--gan-steps", "3",
                 "--seeds", "2", "--clf-epochs", "1", "--stylegan-steps", "2"]) == 0
    text = capsys.readouterr().out
    summary = text.split("== cxr demo summary ==", 1)[1]
    assert "phantom (nlm preset, 48 px)" in summary
    assert "datasets inspect ChinaSet_AllFiles: layout shenzhen" in summary and "0 problems" in summary
    assert "domain gap" in summary and "accuracy" in summary
    assert (out / "phantom" / "MontgomerySet" / "CXR_png").is_dir()
    assert "CycleGAN (resnet6, 64 px, 3 steps" in summary
    assert "SSIM to the paired truth" in summary and "untranslated" in summary and "histogram" in summary
    # the CycleGAN learns from the histogram-matched Montgomery-like tree, border tied to it
    seen_a = [line for line in (out / "runs" / "cyclegan" / "images_seen.txt").read_text().splitlines()
              if "CXR_png" in line and "MCUCXR" in line]
    assert seen_a and all(str(out / "harmonized" / "histogram") in line for line in seen_a)
    assert "lambda_border: 10.0" in (out / "runs" / "cyclegan" / "config.yaml").read_text()
    assert "on the histogram-matched Montgomery-like tree" in summary
    for method in ("cyclegan", "histogram", "histogram_centre"):  # harmonized trees read back like the source
        assert len(load_tree(out / "harmonized" / method)) == len(load_tree(out / "phantom" / "MontgomerySet"))
    scores = (out / "paired_scores.txt").read_text()
    assert "cyclegan" in scores and "histogram_centre" in scores and "histogram_centre" in summary
    # a 95 % patient-bootstrap interval beside each SSIM, and the CycleGAN's paired gains
    assert "95 % CI" in scores.splitlines()[0] and "cyclegan - histogram:" in scores
    assert "CycleGAN minus histogram matching" in summary and "over patients" in summary
    factors = scores.split("SSIM's factors")[1].splitlines()[1:]  # the factor table follows the scores
    assert factors[0].split()[:3] == ["method", "l", "cs"] and [r.split()[0] for r in factors[1:]] == [
        "untranslated", "histogram", "histogram_centre", "cyclegan"]
    assert json.loads((out / "harmonized" / "histogram_centre" / "cxr_harmonization.json").read_text())["field"] == 0.85
    assert "TB classifier (small CNN" in summary and "2 seeds" in summary
    table = (out / "cross_domain.txt").read_text().splitlines()
    assert [line.split("  ")[0] for line in table[1:]] == [
        "held-out, same site (in-domain)", "Montgomery-like, as is", "Montgomery-like, histogram-matched",
        "Montgomery-like, histogram-matched (centre)", "Montgomery-like, lung-histogram", "Montgomery-like, percentile",
        "Montgomery-like, zscore", "Montgomery-like, clahe", "Montgomery-like, fda",
        "Montgomery-like, histogram-matched + CycleGAN", "Montgomery-like, histogram-matched + FastCUT"]
    # every classical harmonizer and FastCUT wrote a tree that reads back like the source
    for method in ("lung-histogram", "percentile", "zscore", "clahe", "fda", "fastcut"):
        assert len(load_tree(out / "harmonized" / method)) == len(load_tree(out / "phantom" / "MontgomerySet"))
    assert "FastCUT (cut_tiny, 3 steps" in summary
    assert json.loads((out / "harmonized" / "fastcut" / "cxr_translation.json").read_text())["method"] == "fastcut"
    # the harmonizer table: a row per method with SSIM, cross-site AUROC, site-detector AUROC, flip rate
    audit = (out / "harmonizers.txt").read_text().splitlines()
    assert audit[0].split()[:2] == ["method", "SSIM"]
    assert [r.split()[0] for r in audit[1:]] == ["none", "histogram", "histogram_centre", "lung-histogram",
                                                "percentile", "zscore", "clahe", "fda", "cyclegan", "fastcut"]
    for r in audit[1:]:
        ci = r"\[(?:[\d.]+|nan), (?:[\d.]+|nan)\]"  # a 1-epoch classifier on 60 images may be constant
        m = re.fullmatch(rf"\S+ +([\d.]+) +([\d.]+) {ci} +([\d.]+) {ci} +([\d.]+)%", r)
        assert m, r
        assert 0 < float(m.group(1)) <= 1 and 0 <= float(m.group(3)) <= 1 and 0 <= float(m.group(4)) <= 100
    assert re.search(r"^  none .* 0\.0%$", summary, re.M)  # the source against itself flips nothing
    # The Montgomery-like rows score the same test-split images in every condition.
    counts = {line.split()[-8] for line in table[2:]}
    assert len(counts) == 1 and 0 < int(counts.pop()) < 60
    with Image.open(out / "contact_sheet.png") as im:
        assert im.width == 2 * 48  # one column per site
    assert (out / "summary.txt").read_text().splitlines()[0].startswith("phantom (nlm preset")
    # augmentation: a StyleGAN2-ADA on the Shenzhen-like training split, its synthetic set judged,
    # classifiers with synthetic and duplicated real images added
    gan = re.search(r"StyleGAN2-ADA \(tiny, 32 px, 2 steps, ADA p [\d.]+, \d+ s\) on the Shenzhen-like "
                    r"training split .*; (\d+) synthetic images at its TB prevalence ([\d.]+)", summary)
    n_train = len(split_records(load_tree(out / "phantom" / "ChinaSet_AllFiles").records, (0.7, 0.1, 0.2), seed=0)
                  ["train"])
    assert gan and int(gan.group(1)) == n_train == len(load_tree(out / "synthetic"))
    assert 0 < float(gan.group(2)) < 1
    judged = re.search(r"synthetic set .*relative FD ([\d.]+), KID (-?[\d.e-]+); memorization: ([\d.]+)% .*"
                       r"([\d.]+)% by SSIM", summary)
    assert judged and float(judged.group(1)) > 0 and 0 <= float(judged.group(3)) <= 100
    assert json.loads((out / "gan_eval" / "metrics.json").read_text())["extractor"]["kind"] == "trained"
    assert "TB classifier with added images (32 px, 1 epochs, 1 seed each" in summary
    rows = {}
    for name in ("real only", "real + synthetic 0.5", "real + synthetic 1", "real + duplicated real 1"):
        m = re.search(rf"^  {re.escape(name)} +(\d+) +([\d.]+) \[[\d.]+, [\d.]+\] +([\d.]+) \[", summary, re.M)
        assert m, name
        assert 0 <= float(m.group(2)) <= 1 and 0 <= float(m.group(3)) <= 1
        rows[name] = int(m.group(1))
    assert rows == {"real only": n_train, "real + synthetic 0.5": n_train + round(0.5 * n_train),
                    "real + synthetic 1": 2 * n_train, "real + duplicated real 1": 2 * n_train}
    used = json.loads((out / "runs" / "duplicated-1" / "classifier-tb-seed0" / "run.json").read_text())
    assert used["sets"]["train"]["images"] == 2 * n_train and used["sets"]["train"]["origins"] == {"real": 2 * n_train}
    assert (out / "augmentation.txt").read_text().startswith("training set")
    # localization: lung Dice per chain, Grad-CAM's pointing game beside the null map
    seg = re.search(r"lung segmentation .*: Dice on the test subjects shenzhen-like ([\d.]+), montgomery-like ([\d.]+)",
                    summary)
    assert seg and all(0 <= float(v) <= 1 for v in seg.groups())
    cam = re.search(r"Grad-CAM of the TB classifier on (\d+) Montgomery-like images with lesions: pointing game "
                    r"([\d.]+)% .*null two-lung map ([\d.]+)%", summary)
    assert cam and int(cam.group(1)) > 0 and 0 <= float(cam.group(2)) <= 100
    assert list((out / "explain" / "overlays").rglob("*.png"))


def test_demo_refuses_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_demo_refuses_bad_counts_before_any_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_scores_the_split_its_cyclegan_kept_out_whatever_the_seed(tmp_path, monkeypatch, capsys):
    """--seed moves the phantom and the training seeds; the paired scores stay on the CycleGAN's
    held-out split (data.split_seed, 0), never on the seed's own split."""
    import eval.paired

    seen = []
    real = eval.paired.phantom_report

    def spy(*args, **kwargs):
        seen.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(eval.paired, "phantom_report", spy)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "48", "--n", "60", "--workers", "1", "--gan-steps", "2",
                 "--seeds", "1", "--clf-epochs", "1", "--seed", "1"]) == 0
    assert seen == [0]
    assert "split_seed: 0" in (out / "runs" / "cyclegan" / "config.yaml").read_text()
