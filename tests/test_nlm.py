"""NLM Shenzhen / Montgomery loaders on small trees in the real on-disk layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from builders import write_mask, write_png, zip_tree
from cxr.data.image import image_info
from cxr.data.layouts import detect_layout, layouts, load_tree
from cxr.data.masks import combine_lung_masks, load_lung_mask
from cxr.data.record import TB
from cxr.data.sources.nlm import parse_age, parse_montgomery_reading, parse_shenzhen_reading, patient_groups
from cxr.errors import DataError

H, W = 24, 20

# (stem, PNG mode, reading text, expected sex, expected age in years, expected report)
SHENZHEN = [
    ("CHNCXR_0001_0", "P", "male 45yrs\nnormal\n", "M", 45.0, "normal"),
    ("CHNCXR_0002_0", "RGB", "Female 38yrs\n\nnormal\n", "F", 38.0, "normal"),
    ("CHNCXR_0003_1", "P", "femal 32yrs\nbilateral PTB\n", "F", 32.0, "bilateral PTB"),
    ("CHNCXR_0004_1", "L", "female24yrs\r\nleft upper PTB\r\n", "F", 24.0, "left upper PTB"),
    ("CHNCXR_0005_1", "P", "male , 29yrs\nright PTB\n", "M", 29.0, "right PTB"),
    ("CHNCXR_0006_0", "RGB", "male 42\nnormal", "M", 42.0, "normal"),
    ("CHNCXR_0007_1", "P", "male 16month\n\nmiliary TB\nwith effusion\n", "M", 16 / 12,
     "miliary TB\nwith effusion"),
    ("CHNCXR_0008_0", "P", "female 64days\nnormal\n", "F", 64 / 365.25, "normal"),
]

# MCUCXR_0005 -> 0004 -> 0002 is a chain of repeat scans; 0003 names a *later* image (0006).
SEX_AGE = "Patient's Sex: {} \nPatient's Age: {}\n"
MONTGOMERY = [
    ("MCUCXR_0001_0", SEX_AGE.format("M", "045Y") + "normal \n", "M", 45.0),
    ("MCUCXR_0002_1", SEX_AGE.format("F", "027Y") + "right upper lobe cavity\n", "F", 27.0),
    ("MCUCXR_0003_0", SEX_AGE.format("O", "060Y") + "NO REPORT (same pt as MCUCXR_0006_0)\n", "O", 60.0),
    ("MCUCXR_0004_1", SEX_AGE.format("F", "028Y") + "NO REPORT (same pt as MCUCXR_0002_1)\n", "F", 28.0),
    ("MCUCXR_0005_1", "NO REPORT (same pt as MCUCXR_0004_1)\n", None, None),
    ("MCUCXR_0006_0", SEX_AGE.format("O", "061Y") + "normal\n", "O", 61.0),
]
MC_PATIENTS = {"MCUCXR_0001_0": "MCUCXR_0001", "MCUCXR_0002_1": "MCUCXR_0002",
               "MCUCXR_0003_0": "MCUCXR_0003", "MCUCXR_0004_1": "MCUCXR_0002",
               "MCUCXR_0005_1": "MCUCXR_0002", "MCUCXR_0006_0": "MCUCXR_0003"}


def make_shenzhen(site: Path) -> Path:
    for i, (stem, mode, text, *_rest) in enumerate(SHENZHEN):
        write_png(site / "CXR_png" / f"{stem}.png", H, W, mode=mode, seed=i)
        (site / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (site / "ClinicalReadings" / f"{stem}.txt").write_text(text)
    (site / "CXR_png" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0junk")
    (site / "ClinicalReadings" / "Thumbs.db").write_bytes(b"junk")
    (site / "NLM-ChinaCXRSet-ReadMe.docx").write_bytes(b"PK")
    return site


def make_montgomery(site: Path) -> Path:
    for i, (stem, text, *_rest) in enumerate(MONTGOMERY):
        write_png(site / "CXR_png" / f"{stem}.png", H, W, mode="L", seed=i)
        write_mask(site / "ManualMask" / "leftMask" / f"{stem}.png", H, W, left=True)
        write_mask(site / "ManualMask" / "rightMask" / f"{stem}.png", H, W, left=False)
        (site / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (site / "ClinicalReadings" / f"{stem}.txt").write_text(text)
    (site / "CXR_png" / "Thumbs.db").write_bytes(b"junk")
    return site


def make_kaggle(top: Path) -> Path:
    make_shenzhen(top / "ChinaSet_AllFiles" / "ChinaSet_AllFiles")
    make_montgomery(top / "Montgomery" / "MontgomerySet")
    return top


def by_stem(ds) -> dict:
    return {Path(r.image.rsplit("/", 1)[-1]).stem: r for r in ds.records}


# Parsers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,years", [("45yrs", 45.0), ("42", 42.0), ("16month", 16 / 12),
                                        ("64days", 64 / 365.25), ("027Y", 27.0), ("6M", 0.5),
                                        ("2 wks", 14 / 365.25), ("1.5 years", 1.5)])
def test_parse_age(text, years):
    assert parse_age(text) == pytest.approx(years)


@pytest.mark.parametrize("text", ["abcyrs", "45 parsecs", "", "yrs"])
def test_parse_age_rejects(text):
    with pytest.raises(ValueError, match="age"):
        parse_age(text)


def test_parse_readings_direct():
    r = parse_shenzhen_reading("\nmale 45yrs\n\n  normal  \n")
    assert (r.sex, r.age, r.report, r.same_as) == ("M", 45.0, "normal", None)
    assert parse_shenzhen_reading("Male，29yrs.").age == 29.0
    with pytest.raises(ValueError, match="abcyrs"):
        parse_shenzhen_reading("male abcyrs\nnormal")
    with pytest.raises(ValueError, match="sex"):
        parse_shenzhen_reading("unknown 45yrs\nnormal")
    with pytest.raises(ValueError, match="empty"):
        parse_shenzhen_reading("\n \n")
    m = parse_montgomery_reading("Patient's Sex: F \nPatient's Age: 027Y\nnormal \n")
    assert (m.sex, m.age, m.report) == ("F", 27.0, "normal")
    m = parse_montgomery_reading("NO REPORT (same pt as MCUCXR_0162_1)")
    assert (m.sex, m.age, m.same_as) == (None, None, "MCUCXR_0162_1")
    with pytest.raises(ValueError, match="Sex"):
        parse_montgomery_reading("Patient's Age: 027Y\nnormal")
    with pytest.raises(ValueError, match="not M, F or O"):
        parse_montgomery_reading("Patient's Sex: X\nPatient's Age: 027Y\nnormal")


def test_patient_groups_chains_and_cycles():
    links = {"a3": "a2", "a2": "a1", "b1": "b2", "b2": "b1"}
    g = patient_groups(["a3", "a1", "a2", "b1", "b2", "c"], links)
    assert g == {"a1": "a1", "a2": "a1", "a3": "a1", "b1": "b1", "b2": "b1", "c": "c"}


# Shenzhen --------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["ChinaSet_AllFiles", "Shenzhen-Hospital-CXR-Set"])
def test_shenzhen_native(tmp_path, folder):
    root = make_shenzhen(tmp_path / folder)
    assert detect_layout(root) == "shenzhen"
    ds = load_tree(root)
    assert ds.layout == "shenzhen" and ds.label_names == TB and ds.problems == []
    assert len(ds) == len(SHENZHEN) == 8
    recs = by_stem(ds)
    assert sorted(recs) == [s[0] for s in SHENZHEN]
    for stem, _mode, _text, sex, age, report in SHENZHEN:
        r = recs[stem]
        assert r.labels.tolist() == [float(stem[-1])]
        assert r.sex == sex and r.age == pytest.approx(age) and r.report == report
        assert r.patient_id == stem[:-2] and r.site == r.source == "shenzhen" and r.view == "PA"
        assert r.masks == {}
        assert Path(r.image).is_file() and Path(r.extra["reading_file"]).is_file()
    assert ds.label_matrix()[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 1, 0]
    assert image_info(recs["CHNCXR_0001_0"].image).mode == "P"
    assert image_info(recs["CHNCXR_0002_0"].image).mode == "RGB"


# Montgomery ------------------------------------------------------------------------------------

def test_montgomery_native_links_and_masks(tmp_path):
    root = make_montgomery(tmp_path / "MontgomerySet")
    assert detect_layout(root) == "montgomery"
    ds = load_tree(root)
    assert ds.layout == "montgomery" and ds.problems == [] and len(ds) == 6
    recs = by_stem(ds)
    for stem, _text, sex, age in MONTGOMERY:
        r = recs[stem]
        assert r.sex == sex and r.age == age and r.site == r.source == "montgomery"
        assert r.patient_id == MC_PATIENTS[stem]
        assert r.labels.tolist() == [float(stem[-1])]
        assert r.masks["lung_image_left"].endswith(f"ManualMask/leftMask/{stem}.png")
        assert r.masks["lung_image_right"].endswith(f"ManualMask/rightMask/{stem}.png")
    assert len({r.patient_id for r in ds.records}) == 3  # 6 images of 3 patients
    assert recs["MCUCXR_0005_1"].extra["same_patient_as"] == "MCUCXR_0004_1"
    assert recs["MCUCXR_0002_1"].report == "right upper lobe cavity"

    mask = load_lung_mask(recs["MCUCXR_0001_0"])
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    assert set(np.unique(mask).tolist()) == {0, 1, 2}
    # write_mask: image-left lung in columns 1..W/2-2, image-right in W/2+1..W-2, rows 2..H-3
    assert (mask[:, : W // 2] != 2).all() and (mask[:, W // 2:] != 1).all()
    assert np.count_nonzero(mask == 1) == (H - 4) * (W // 2 - 2)
    assert np.count_nonzero(mask == 2) == (H - 4) * (W // 2 - 2)
    assert mask[H // 2, 3] == 1 and mask[H // 2, W - 3] == 2 and mask[0, 0] == 0


def test_lung_mask_errors(tmp_path):
    root = make_montgomery(tmp_path / "MontgomerySet")
    r = by_stem(load_tree(root))["MCUCXR_0001_0"]
    r.masks["lung_image_right"] = r.masks["lung_image_left"]  # same lung twice: overlap
    with pytest.raises(DataError, match="overlap"):
        load_lung_mask(r)
    r.masks = {}
    with pytest.raises(DataError, match="no lung masks"):
        load_lung_mask(r)
    with pytest.raises(ValueError, match="shapes differ"):
        combine_lung_masks(np.zeros((2, 3)), np.zeros((3, 2)))


# Combined NLM layouts --------------------------------------------------------------------------

def test_native_download_parent(tmp_path):
    make_shenzhen(tmp_path / "dl" / "ChinaSet_AllFiles")
    make_montgomery(tmp_path / "dl" / "MontgomerySet")
    assert detect_layout(tmp_path / "dl") == "nlm"
    ds = load_tree(tmp_path / "dl")
    assert ds.layout == "nlm" and len(ds) == 14 and ds.problems == []
    assert [r.site for r in ds.records] == ["shenzhen"] * 8 + ["montgomery"] * 6


def test_kaggle_folder(tmp_path):
    top = make_kaggle(tmp_path / "kaggle")
    assert detect_layout(top) == "nlm"
    ds = load_tree(top)
    assert len(ds) == 14 and ds.problems == []
    recs = by_stem(ds)
    assert recs["MCUCXR_0005_1"].patient_id == "MCUCXR_0002"
    assert recs["CHNCXR_0007_1"].age == pytest.approx(16 / 12)
    # The Kaggle wrappers themselves: the outer ChinaSet_AllFiles is not the site folder,
    # but the site layouts still find the site inside when asked for it.
    assert detect_layout(top / "ChinaSet_AllFiles") == "nlm"
    assert len(load_tree(top / "ChinaSet_AllFiles", layout="shenzhen")) == 8
    assert len(load_tree(top / "Montgomery", layout="montgomery")) == 6


def test_kaggle_zip(tmp_path):
    top = make_kaggle(tmp_path / "kaggle")
    archive = zip_tree(top, tmp_path / "archive.zip", junk=True)
    shutil.rmtree(top)  # everything must come from the archive
    assert detect_layout(archive) == "nlm"
    ds = load_tree(archive)
    assert len(ds) == 14 and ds.problems == []
    assert {r.site for r in ds.records} == {"shenzhen", "montgomery"}
    recs = by_stem(ds)
    r = recs["CHNCXR_0004_1"]
    assert r.image == f"{archive}!/ChinaSet_AllFiles/ChinaSet_AllFiles/CXR_png/CHNCXR_0004_1.png"
    assert (r.sex, r.age, r.report) == ("F", 24.0, "left upper PTB")
    assert image_info(r.image).width == W and image_info(recs["CHNCXR_0001_0"].image).mode == "P"
    m = recs["MCUCXR_0004_1"]
    assert ".zip!/Montgomery/MontgomerySet/ManualMask/leftMask/" in m.masks["lung_image_left"]
    assert m.patient_id == "MCUCXR_0002"
    assert np.count_nonzero(load_lung_mask(m) == 2) == (H - 4) * (W // 2 - 2)


def test_zip_with_top_folder(tmp_path):
    make_kaggle(tmp_path / "src" / "pulmonary-chest-xray-abnormalities")
    archive = zip_tree(tmp_path / "src", tmp_path / "wrapped.zip")
    ds = load_tree(archive)
    assert detect_layout(archive) == "nlm" and len(ds) == 14


# Detection -------------------------------------------------------------------------------------

def test_priorities_make_sites_win():
    known = layouts()
    assert known["shenzhen"].priority > known["nlm"].priority
    assert known["montgomery"].priority > known["nlm"].priority


def test_detectors_do_not_claim_other_trees(tmp_path):
    (tmp_path / "classes" / "normal").mkdir(parents=True)
    write_png(tmp_path / "classes" / "normal" / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 not really a zip")
    mc_in_sz = tmp_path / "odd"  # CXR_png holding only Montgomery names is not Shenzhen
    write_png(mc_in_sz / "CXR_png" / "MCUCXR_0001_0.png")
    nlm = layouts()
    for p in (tmp_path / "classes", tmp_path / "notes.txt", tmp_path / "fake.zip",
              tmp_path / "missing"):
        for name in ("shenzhen", "montgomery", "nlm"):
            assert nlm[name].detect(p) is False, (name, p)
    assert nlm["shenzhen"].detect(mc_in_sz) is False
    assert nlm["montgomery"].detect(mc_in_sz) is True


# Bad input -------------------------------------------------------------------------------------

def _sz(tmp_path: Path) -> Path:
    return make_shenzhen(tmp_path / "ChinaSet_AllFiles")


def _mc(tmp_path: Path) -> Path:
    return make_montgomery(tmp_path / "MontgomerySet")


def bad_name(tmp_path):
    root = _sz(tmp_path)
    write_png(root / "CXR_png" / "CHNCXR_12_x.png")
    return root, 9, "CHNCXR_12_x.png", "does not match", None


def bad_label_digit(tmp_path):
    root = _sz(tmp_path)
    write_png(root / "CXR_png" / "CHNCXR_0009_2.png")
    (root / "ClinicalReadings" / "CHNCXR_0009_2.txt").write_text("male 30yrs\nnormal")
    return root, 9, "CHNCXR_0009_2.png", "label digit '2'", "CHNCXR_0009_2"


def duplicate_number(tmp_path):
    root = _sz(tmp_path)
    write_png(root / "CXR_png" / "CHNCXR_0001_1.png")
    return root, 9, "CHNCXR_0001_1.png", "also used by CHNCXR_0001_0.png", "CHNCXR_0001_1"


def bad_age(tmp_path):
    root = _sz(tmp_path)
    (root / "ClinicalReadings" / "CHNCXR_0003_1.txt").write_text("male abcyrs\nPTB\n")
    return root, 8, "CHNCXR_0003_1.txt", "'abcyrs' is not a number", "CHNCXR_0003_1"


def bad_sex_line(tmp_path):
    root = _sz(tmp_path)
    (root / "ClinicalReadings" / "CHNCXR_0003_1.txt").write_text("45yrs male\nPTB\n")
    return root, 8, "CHNCXR_0003_1.txt", "does not start with the sex", "CHNCXR_0003_1"


def missing_reading(tmp_path):
    root = _sz(tmp_path)
    (root / "ClinicalReadings" / "CHNCXR_0002_0.txt").unlink()
    return root, 8, "CHNCXR_0002_0.txt", "missing clinical reading", "CHNCXR_0002_0"


def mc_bad_age(tmp_path):
    root = _mc(tmp_path)
    (root / "ClinicalReadings" / "MCUCXR_0001_0.txt").write_text(SEX_AGE.format("M", "abcY") + "normal")
    return root, 6, "MCUCXR_0001_0.txt", "'abcY'", "MCUCXR_0001_0"


def mc_bad_sex(tmp_path):
    root = _mc(tmp_path)
    (root / "ClinicalReadings" / "MCUCXR_0001_0.txt").write_text(SEX_AGE.format("Q", "040Y") + "normal")
    return root, 6, "MCUCXR_0001_0.txt", "not M, F or O", "MCUCXR_0001_0"


def mask_size(tmp_path):
    root = _mc(tmp_path)
    write_mask(root / "ManualMask" / "rightMask" / "MCUCXR_0002_1.png", H, W + 4, left=False)
    problem = f"mask size {W + 4}x{H} differs from image size {W}x{H}"
    return root, 6, "rightMask/MCUCXR_0002_1.png", problem, "MCUCXR_0002_1"


def missing_mask(tmp_path):
    root = _mc(tmp_path)
    (root / "ManualMask" / "leftMask" / "MCUCXR_0006_0.png").unlink()
    return root, 6, "leftMask/MCUCXR_0006_0.png", "missing lung mask", "MCUCXR_0006_0"


def dangling_link(tmp_path):
    root = _mc(tmp_path)
    (root / "ClinicalReadings" / "MCUCXR_0001_0.txt").write_text(
        "Patient's Sex: M \nPatient's Age: 045Y\nNO REPORT (same pt as MCUCXR_0099_1)\n")
    return root, 6, "MCUCXR_0001_0.txt", "same pt as MCUCXR_0099_1", "MCUCXR_0001_0"


@pytest.mark.parametrize("case", [bad_name, bad_label_digit, duplicate_number, bad_age,
                                  bad_sex_line, missing_reading, mc_bad_age, mc_bad_sex, mask_size,
                                  missing_mask, dangling_link])
def test_bad_item_strict_and_skip(tmp_path, case):
    root, total, file_part, problem, skipped = case(tmp_path)
    with pytest.raises(DataError) as err:
        load_tree(root)
    assert file_part in err.value.where and problem in str(err.value)
    assert "\n" not in str(err.value)
    ds = load_tree(root, skip_bad=True)
    assert len(ds) == total - 1
    assert len(ds.problems) == 1
    assert file_part in ds.problems[0].where and problem in ds.problems[0].problem
    kept = by_stem(ds)
    if skipped is not None:
        assert skipped not in kept
    assert len(kept) == len(ds)  # the good images are all there, each once


def test_dangling_link_keeps_linked_group_intact(tmp_path):
    root = _mc(tmp_path)
    (root / "ClinicalReadings" / "MCUCXR_0005_1.txt").write_text("NO REPORT (same pt as MCUCXR_0099_1)")
    recs = by_stem(load_tree(root, skip_bad=True))
    assert "MCUCXR_0005_1" not in recs and recs["MCUCXR_0004_1"].patient_id == "MCUCXR_0002"


def test_empty_cxr_png(tmp_path):
    root = tmp_path / "ChinaSet_AllFiles"
    (root / "CXR_png").mkdir(parents=True)
    (root / "CXR_png" / "Thumbs.db").write_bytes(b"junk")  # junk does not count as an image
    (root / "ClinicalReadings").mkdir()
    assert detect_layout(root) == "shenzhen"
    with pytest.raises(DataError, match="empty CXR_png folder") as err:
        load_tree(root)
    assert err.value.where.endswith("CXR_png")
    ds = load_tree(root, skip_bad=True)
    assert len(ds) == 0 and len(ds.problems) == 1


def test_no_cxr_png_says_what_is_expected(tmp_path):
    root = tmp_path / "MontgomerySet"
    (root / "ClinicalReadings").mkdir(parents=True)
    assert detect_layout(root) == "montgomery"
    with pytest.raises(DataError) as err:
        load_tree(root)
    expected = "no CXR_png folder (expected MontgomerySet/CXR_png/MCUCXR_0001_0.png)"
    assert str(err.value) == f"{root}: {expected}"
    with pytest.raises(DataError, match="no NLM set found"):
        load_tree(tmp_path / "MontgomerySet" / "ClinicalReadings", layout="nlm")


def test_missing_folders_reported_once(tmp_path):
    sz = _sz(tmp_path / "a")
    shutil.rmtree(sz / "ClinicalReadings")
    with pytest.raises(DataError, match="no ClinicalReadings folder"):
        load_tree(sz)
    ds = load_tree(sz, skip_bad=True)
    assert len(ds) == 8 and len(ds.problems) == 1
    assert all(r.age is None and r.sex is None and r.report is None for r in ds.records)
    mc = _mc(tmp_path / "b")
    shutil.rmtree(mc / "ManualMask")
    with pytest.raises(DataError, match="no ManualMask folder"):
        load_tree(mc)
    ds = load_tree(mc, skip_bad=True)
    assert len(ds) == 6 and len(ds.problems) == 1 and all(r.masks == {} for r in ds.records)
