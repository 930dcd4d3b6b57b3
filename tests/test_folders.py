"""Class-folder layouts: the three Kaggle downloads and any folder-per-class tree."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from builders import gradient, write_dicom, write_png, zip_tree
from cxr.data.layouts import detect_layout, load_tree
from cxr.data.record import NINE
from cxr.data.sources.folders import canonical_class, patient_id_from_name
from cxr.errors import DataError


def write_jpeg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient(24, 20, 8, seed)).save(path, "JPEG")
    return path


def counts(ds) -> Counter:
    """(split, class) -> number of images."""
    return Counter((s.split, s.findings[0] if s.findings else None) for s in ds.records)


# Name rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder, name", [
    ("NORMAL", "No Finding"), ("Normal", "No Finding"), ("no_finding", "No Finding"),
    ("No Finding", "No Finding"), ("COVID19", "Covid"), ("COVID-19", "Covid"), ("covid", "Covid"),
    ("TURBERCULOSIS", "Tuberculosis"), ("Tuberculosis", "Tuberculosis"), ("TB", "Tuberculosis"),
    ("PNEUMONIA", "Pneumonia"), ("EDEMA", "Edema"), ("pleural effusion", None),
    ("Effusion", "Effusion"), ("atelectasis", "Atelectasis"), ("Lung_Opacity", None), ("FOO", None),
])
def test_canonical_class(folder, name):
    assert canonical_class(folder) == name


@pytest.mark.parametrize("stem, pid", [
    ("person1_bacteria_1", "person1"), ("person1000_virus_1681", "person1000"),
    ("IM-0115-0001", "IM-0115"), ("NORMAL2-IM-0927-0001", "IM-0927"),
    ("Tuberculosis-12", "Tuberculosis-12"), ("person1", "person1"),
])
def test_patient_id_from_name(stem, pid):
    assert patient_id_from_name(stem) == pid


# Kaggle "Chest X-Ray Images (Pneumonia)" -------------------------------------------------------

PNEUMONIA_FILES = {
    "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-0927-0001.jpeg"],
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person7_virus_13.jpeg"],
    "val/NORMAL": ["NORMAL2-IM-1427-0001.jpeg"],
    "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg"],
    "test/PNEUMONIA": ["person100_bacteria_475.jpeg", "person101_virus_187.jpeg"],
}


def make_pneumonia(top: Path) -> Path:
    """The download as unpacked: chest_xray/, its nested duplicate, macOS junk, a .DS_Store."""
    for folder, names in PNEUMONIA_FILES.items():
        for i, name in enumerate(names):
            write_jpeg(top / "chest_xray" / folder / name, seed=i)
            write_jpeg(top / "chest_xray" / "chest_xray" / folder / name, seed=i)
            junk = top / "__MACOSX" / "chest_xray" / folder / f"._{name}"
            junk.parent.mkdir(parents=True, exist_ok=True)
            junk.write_bytes(b"\0\x05\x16\x07")
    (top / "chest_xray" / ".DS_Store").write_bytes(b"\0")
    (top / "chest_xray" / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    return top


EXPECTED_PNEUMONIA = Counter({("train", "No Finding"): 3, ("train", "Pneumonia"): 3,
                              ("val", "No Finding"): 1, ("val", "Pneumonia"): 1,
                              ("test", "No Finding"): 1, ("test", "Pneumonia"): 2})


@pytest.mark.parametrize("as_zip", [False, True])
def test_kaggle_pneumonia_counts_splits_and_patients(tmp_path, as_zip):
    root = make_pneumonia(tmp_path / "download")
    if as_zip:
        root = zip_tree(root, tmp_path / "archive.zip")
    assert detect_layout(root) == "kaggle_pneumonia"
    ds = load_tree(root)
    assert ds.layout == "kaggle_pneumonia" and ds.label_names == NINE
    assert len(ds) == 11  # the nested chest_xray/chest_xray copy is not counted
    assert counts(ds) == EXPECTED_PNEUMONIA
    assert not any("chest_xray/chest_xray" in s.image or "__MACOSX" in s.image for s in ds.records)
    by_name = {Path(s.image.split("!/")[-1]).name: s for s in ds.records}
    assert by_name["person1_bacteria_2.jpeg"].patient_id == "person1"
    assert by_name["person7_virus_13.jpeg"].extra["pneumonia_type"] == "virus"
    assert by_name["NORMAL2-IM-0927-0001.jpeg"].patient_id == "IM-0927"
    assert by_name["IM-0115-0002.jpeg"].patient_id == "IM-0115"
    assert {s.site for s in ds.records} == {"kaggle_pneumonia"}
    normal = by_name["IM-0001-0001.jpeg"]
    assert normal.labels.tolist() == [1.0 if n == "No Finding" else 0.0 for n in NINE]
    if as_zip:
        assert normal.image == f"{root}!/chest_xray/test/NORMAL/IM-0001-0001.jpeg"
    else:
        assert Path(normal.image).is_file()


def test_kaggle_pneumonia_pointed_at_chest_xray_folder(tmp_path):
    root = make_pneumonia(tmp_path / "download") / "chest_xray"
    assert detect_layout(root) == "kaggle_pneumonia"
    assert counts(load_tree(root)) == EXPECTED_PNEUMONIA


def test_kaggle_pneumonia_unknown_class_folder(tmp_path):
    root = make_pneumonia(tmp_path / "download")
    write_jpeg(root / "chest_xray" / "train" / "FOO" / "x.jpeg")
    assert detect_layout(root) == "kaggle_pneumonia"
    message = r"train/FOO: unknown class folder 'FOO' \(expected NORMAL, PNEUMONIA\)"
    with pytest.raises(DataError, match=message):
        load_tree(root)
    ds = load_tree(root, skip_bad=True)
    assert len(ds) == 11 and len(ds.problems) == 1
    assert "FOO" in ds.problems[0].where


# Kaggle "Chest X-Ray (Pneumonia, Covid-19, Tuberculosis)" --------------------------------------

def make_pct(root: Path) -> Path:
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for cls in ("COVID19", "NORMAL", "PNEUMONIA", "TURBERCULOSIS"):
            for i in range(n):
                write_jpeg(root / split / cls / f"{cls}({i}).jpg", seed=i)
    return root


def test_kaggle_pct(tmp_path):
    root = make_pct(tmp_path / "pct")
    assert detect_layout(root) == "kaggle_pct"
    ds = load_tree(root)
    assert ds.label_names == NINE and len(ds) == 16
    c = counts(ds)
    assert c[("train", "Covid")] == 2 and c[("train", "Tuberculosis")] == 2
    assert c[("val", "No Finding")] == 1 and c[("test", "Pneumonia")] == 1
    assert {s.site for s in ds.records} == {"kaggle_pct"}
    assert ds.label_matrix().sum(1).tolist() == [1.0] * 16  # one-hot
    # in a zip, too
    z = zip_tree(root, tmp_path / "pct.zip")
    assert detect_layout(z) == "kaggle_pct" and counts(load_tree(z)) == c


def test_kaggle_pct_unknown_class(tmp_path):
    root = make_pct(tmp_path / "pct")
    write_jpeg(root / "test" / "Lung_Opacity" / "a.jpg")
    with pytest.raises(DataError, match="unknown class folder 'Lung_Opacity'"):
        load_tree(root, layout="kaggle_pct")


# "Tuberculosis (TB) Chest X-ray Database" ------------------------------------------------------

def make_tb(top: Path, metadata: bool = True) -> Path:
    base = top / "TB_Chest_Radiography_Database"
    for cls, n in (("Normal", 3), ("Tuberculosis", 2)):
        for i in range(1, n + 1):
            write_png(base / cls / f"{cls}-{i}.png", seed=i)
        if metadata:
            pd.DataFrame({
                "FILE NAME": [f"{cls.upper()}-{i}" for i in range(1, n + 1)],
                "FORMAT": ["PNG"] * n,
                "SIZE": ["512*512"] * n,
                "URL": [f"https://example.org/{cls.lower()}"] * n,
            }).to_excel(base / f"{cls}.metadata.xlsx", index=False)
    (base / "README.md.txt").write_text("readme")
    return top


@pytest.mark.parametrize("metadata", [True, False])
def test_tb_database(tmp_path, metadata):
    root = make_tb(tmp_path / "tb", metadata)
    assert detect_layout(root) == "tb_database"
    ds = load_tree(root)
    assert ds.label_names == NINE
    assert counts(ds) == Counter({(None, "No Finding"): 3, (None, "Tuberculosis"): 2})
    s = next(r for r in ds.records if r.image.endswith("Tuberculosis-2.png"))
    assert s.patient_id == "Tuberculosis-2" and s.site == "tb_database"
    if metadata:
        assert s.extra["source_url"] == "https://example.org/tuberculosis"
    else:
        assert "source_url" not in s.extra


def test_tb_database_in_zip_and_from_inner_folder(tmp_path):
    root = make_tb(tmp_path / "tb")
    z = zip_tree(root, tmp_path / "archive.zip")
    ds = load_tree(z)
    assert ds.layout == "tb_database" and len(ds) == 5
    assert all(s.extra["source_url"].startswith("https://example.org/") for s in ds.records)
    inner = root / "TB_Chest_Radiography_Database"
    assert detect_layout(inner) == "tb_database" and len(load_tree(inner)) == 5


def test_tb_metadata_missing_column(tmp_path):
    root = make_tb(tmp_path / "tb")
    sheet = root / "TB_Chest_Radiography_Database" / "Normal.metadata.xlsx"
    pd.DataFrame({"FILE NAME": ["Normal-1"], "FORMAT": ["PNG"]}).to_excel(sheet, index=False)
    with pytest.raises(DataError, match=r"Normal\.metadata\.xlsx: missing column\(s\) URL"):
        load_tree(root)
    ds = load_tree(root, skip_bad=True)
    assert len(ds) == 5 and len(ds.problems) == 1


# Any folder-per-class tree ---------------------------------------------------------------------

def test_generic_mixed_formats_and_unmapped_classes(tmp_path):
    root = tmp_path / "MyHospital"
    write_png(root / "Normal" / "a.png")
    write_jpeg(root / "Normal" / "b.jpg")
    write_dicom(root / "COVID-19" / "c.dcm")
    write_png(root / "Lung_Opacity" / "d.png")
    (root / "Lung_Opacity" / "readme.txt").write_text("ignored")
    (root / "Lung_Opacity" / "e.gif").write_bytes(b"GIF89a")  # not a supported extension
    assert detect_layout(root) == "folders"
    ds = load_tree(root)
    assert ds.label_names == ("Covid", "Lung_Opacity", "No Finding")
    assert counts(ds) == Counter({(None, "No Finding"): 2, (None, "Covid"): 1,
                                  (None, "Lung_Opacity"): 1})
    assert {s.site for s in ds.records} == {"MyHospital"}
    dcm = next(s for s in ds.records if s.image.endswith("c.dcm"))
    assert dcm.patient_id == "c" and dcm.labels.tolist() == [1.0, 0.0, 0.0]
    assert dcm.extra["class_folder"] == "COVID-19"


def test_generic_nine_classes_with_splits_in_wrapped_zip(tmp_path):
    root = tmp_path / "src" / "MySet"
    write_png(root / "train" / "Cardiomegaly" / "a.png")
    write_png(root / "train" / "no_finding" / "b.png")
    write_png(root / "validation" / "Edema" / "c.png")
    write_png(root / "test" / "TB" / "d.png")
    z = zip_tree(tmp_path / "src", tmp_path / "myset.zip")
    assert detect_layout(z) == "folders"
    ds = load_tree(z)
    assert ds.label_names == NINE and ds.layout == "folders"
    assert counts(ds) == Counter({("train", "Cardiomegaly"): 1, ("train", "No Finding"): 1,
                                  ("val", "Edema"): 1, ("test", "Tuberculosis"): 1})
    assert {s.site for s in ds.records} == {"MySet"}
    assert all(s.image.startswith(f"{z}!/MySet/") for s in ds.records)


def test_generic_images_subfolder_beside_masks(tmp_path):
    root = tmp_path / "COVID-19_Radiography_Dataset"
    write_png(root / "COVID" / "images" / "COVID-1.png")
    write_png(root / "COVID" / "masks" / "COVID-1.png")
    write_png(root / "Normal" / "images" / "Normal-1.png")
    ds = load_tree(root)
    assert ds.layout == "folders" and len(ds) == 2
    assert not any("masks" in s.image for s in ds.records)


@pytest.mark.parametrize("build", ["nih", "nlm", "vindr", "empty", "only_text"])
def test_generic_does_not_claim_other_roots(tmp_path, build):
    root = tmp_path / "root"
    root.mkdir()
    if build == "nih":
        (root / "Data_Entry_2017_v2020.csv").write_text("Image Index\n")
        write_png(root / "images" / "00000001_000.png")
    elif build == "nlm":
        write_png(root / "CXR_png" / "MCUCXR_0001_0.png")
        write_png(root / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png")
    elif build == "vindr":
        write_dicom(root / "train" / "000434271f63a053c4128a0ba6352c7f.dicom")
        write_dicom(root / "test" / "0005e8e3701dfb1dd93d53e2ff537b6e.dicom")
    elif build == "only_text":
        (root / "A").mkdir()
        (root / "A" / "notes.txt").write_text("x")
    from cxr.data.sources.folders import _detect_generic

    assert not _detect_generic(root)


def test_empty_tree_is_one_clear_error(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError, match="no known dataset layout"):
        load_tree(root)
    with pytest.raises(DataError, match="no class folders with PNG, JPEG or DICOM images found"):
        load_tree(root, layout="folders")
    # --skip-bad skips bad files, not a tree that is not the forced layout: still one error
    with pytest.raises(DataError, match=r"layout 'folders' found no images here: no class folders"):
        load_tree(root, layout="folders", skip_bad=True)


def test_empty_class_folder_is_reported(tmp_path):
    root = tmp_path / "set"
    write_png(root / "Normal" / "a.png")
    (root / "Edema").mkdir()
    (root / "Edema" / "list.txt").write_text("nothing here")
    with pytest.raises(DataError, match=r"Edema: class folder holds no PNG, JPEG or DICOM images"):
        load_tree(root)
    ds = load_tree(root, skip_bad=True)
    assert len(ds) == 1 and ds.records[0].findings == ("No Finding",)
    assert ds.label_names == NINE


def test_forced_named_layout_on_wrong_tree(tmp_path):
    root = tmp_path / "set"
    write_png(root / "Normal" / "a.png")
    with pytest.raises(DataError, match="not a chest_xray"):
        load_tree(root, layout="kaggle_pneumonia")
    assert np.isclose(load_tree(root).label_matrix().sum(), 1.0)
