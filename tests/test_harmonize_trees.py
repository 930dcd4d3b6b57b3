"""`cxr harmonize`: a histogram-matched tree keeps its layout and moves towards the reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxr.cli.main import main
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.splits import split_records
from cyclegan_helpers import nlm_site
from harmonize.histogram import fit_reference, match_histogram
from harmonize.trees import MANIFEST, harmonize_tree


def _mean(tree) -> float:
    return float(np.mean([load_image(r.image).mean() for r in load_tree(tree).records]))


def test_histogram_tree_matches_reference_training_split(tmp_path):
    src = nlm_site(tmp_path / "m", "montgomery", 6, sizes=[(40, 34), (30, 44)])
    ref = nlm_site(tmp_path / "s", "shenzhen", 12)
    # Make the source much darker than the reference so the shift is unmistakable.
    for r in load_tree(src).records:
        from PIL import Image
        img = np.asarray(Image.open(r.image), dtype=np.float32)
        Image.fromarray((img * 0.3).astype(np.uint8)).save(r.image)
    report = harmonize_tree(src, tmp_path / "out", ref)
    assert (report.layout, report.images) == ("montgomery", 6)
    before, after = load_tree(src), load_tree(tmp_path / "out")
    assert np.array_equal(before.label_matrix(), after.label_matrix())
    assert abs(_mean(tmp_path / "out") - _mean(ref)) < abs(_mean(src) - _mean(ref)) / 3
    # Exactly the matching fitted on the reference's patient-level training split.
    train = split_records(load_tree(ref).records, seed=0)["train"]
    expect = match_histogram(load_image(before.records[0].image), fit_reference(load_image(r.image) for r in train))
    assert np.abs(load_image(after.records[0].image) - expect).max() <= 1 / 255 + 1e-6
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["reference_images"] == len(train) and manifest["reference_split"] == "train"


def test_cli_harmonize_and_bad_input(tmp_path, capsys):
    src = nlm_site(tmp_path / "m", "montgomery", 4)
    ref = nlm_site(tmp_path / "s", "shenzhen", 10)
    assert main(["harmonize", "--reference", str(ref), "--in", str(src), "--out", str(tmp_path / "o")]) == 0
    assert "harmonized 4 images" in capsys.readouterr().out
    assert main(["harmonize", "--reference", str(tmp_path / "nope"), "--in", str(src),
                 "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxr: error:") and "nope" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    # --field: the central field's histograms, recorded in the manifest; out of range: one line.
    assert main(["harmonize", "--reference", str(ref), "--in", str(src), "--out", str(tmp_path / "o3"),
                 "--field", "0.8"]) == 0
    assert "harmonized 4 images (montgomery, histogram, central 0.8)" in capsys.readouterr().out
    assert json.loads((tmp_path / "o3" / MANIFEST).read_text())["field"] == 0.8
    train = split_records(load_tree(ref).records, seed=0)["train"]
    rec = load_tree(src).records[0]
    expect = match_histogram(load_image(rec.image), fit_reference((load_image(r.image) for r in train), field=0.8))
    assert np.abs(load_image(tmp_path / "o3" / Path(rec.image).relative_to(src)) - expect).max() <= 1 / 255 + 1e-6
    assert main(["harmonize", "--reference", str(ref), "--in", str(src), "--out", str(tmp_path / "o4"),
                 "--field", "0"]) == 2
    err = capsys.readouterr().err
    assert "--field must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o4").exists()
