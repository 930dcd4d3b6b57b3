"""VinDr-CXR loader: tiny DICOM and resized-PNG trees in the Kaggle layouts, read back."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from builders import write_dicom, write_png, zip_tree
from cxr.data.image import image_info
from cxr.data.layouts import detect_layout, load_tree
from cxr.data.problems import Problems
from cxr.data.record import VINDR
from cxr.data.sources.vindr import detect_vindr, load_vindr
from cxr.errors import DataError

HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"


def image_id(name: str) -> str:
    """A 32-hex id like the real ones."""
    return hashlib.md5(name.encode()).hexdigest()


A, B, C = image_id("a"), image_id("b"), image_id("c")
ROWS = [  # as in the real train.csv: one row per reader finding, empty box for "No finding"
    (A, "Cardiomegaly", 3, "R10", 691.0, 1375.0, 1653.0, 1831.0),
    (B, "No finding", 14, "R11", "", "", "", ""),
    (A, "Cardiomegaly", 3, "R9", 692.0, 1375.0, 1657.0, 1799.0),
    (C, "Aortic enlargement", 0, "R8", 1264.0, 743.0, 1611.0, 1019.0),
    (A, "No finding", 14, "R8", "", "", "", ""),
    (B, "No finding", 14, "R2", "", "", "", ""),
    (C, "Pleural effusion", 10, "R8", 1789.0, 1729.0, 1875.0, 1992.0),
    (C, "Nodule/Mass", 8, "R16", 500.5, 600.25, 540.0, 655.75),
    (B, "No finding", 14, "R3", "", "", "", ""),
    (C, "No finding", 14, "R17", "", "", "", ""),
]
# Original (rows, columns) of each image, as train_meta.csv gives them (dim0, dim1).
DIMS = {A: (2880, 2304), B: (3072, 2540), C: (2048, 2500)}


def write_csv(path: Path, rows: list[tuple], header: str = HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + [",".join(str(v) for v in r) for r in rows]) + "\n")


def dicom_tree(root: Path, rows: list[tuple] = ROWS, suffix: str = ".dicom") -> Path:
    write_csv(root / "train.csv", rows)
    for i, name in enumerate((A, B, C)):
        write_dicom(root / "train" / f"{name}{suffix}", h=24, w=20, seed=i)
    return root


def png_tree(root: Path, rows: list[tuple] = ROWS, meta: bool = True) -> Path:
    """The resized-PNG variant: small PNGs plus train_meta.csv with the original sizes."""
    write_csv(root / "train.csv", rows)
    for i, name in enumerate((A, B, C)):
        write_png(root / "train" / f"{name}.png", h=32, w=24, seed=i)
    if meta:
        write_csv(root / "train_meta.csv", [(k, *v) for k, v in DIMS.items()], "image_id,dim0,dim1")
    return root


def by_id(ds) -> dict:
    return {r.patient_id: r for r in ds.records}


def onehot(*names: str) -> np.ndarray:
    v = np.zeros(len(VINDR), np.float32)
    v[[VINDR.index(n) for n in names]] = 1
    return v


def test_dicom_tree_labels_boxes_readers(tmp_path):
    ds = load_tree(dicom_tree(tmp_path))
    assert ds.layout == "vindr" and ds.label_names == VINDR and len(ds) == 3 and ds.problems == []
    assert [r.patient_id for r in ds.records] == [A, B, C]  # first-appearance order
    recs = by_id(ds)
    # Positive when any reader marked it: R8 said "No finding" for A, R9 and R10 Cardiomegaly.
    np.testing.assert_array_equal(recs[A].labels, onehot("Cardiomegaly"))
    # "No finding" from all three readers: the all-zero vector, never NaN.
    np.testing.assert_array_equal(recs[B].labels, np.zeros(14, np.float32))
    np.testing.assert_array_equal(recs[C].labels, onehot("Aortic enlargement", "Pleural effusion", "Nodule/Mass"))
    assert not np.isnan(ds.label_matrix()).any()
    # Every reader's box is kept, in original pixels (DICOM originals, no train_meta.csv).
    assert [(b.label, b.x0, b.y0, b.x1, b.y1, b.reader) for b in recs[A].boxes] == [
        ("Cardiomegaly", 691.0, 1375.0, 1653.0, 1831.0, "R10"),
        ("Cardiomegaly", 692.0, 1375.0, 1657.0, 1799.0, "R9")]
    assert recs[B].boxes == [] and len(recs[C].boxes) == 3
    assert recs[A].extra["readers"] == ("R8", "R9", "R10")
    # The DICOM header's Rows/Columns: the original is the file itself (20 wide, 24 high).
    assert recs[A].original_size == (20, 24) and recs[A].split == "train" and recs[A].site == "vindr"
    assert Path(recs[A].image) == tmp_path / "train" / f"{A}.dicom"
    assert image_info(recs[A].image).mode == "DICOM:MONOCHROME2"


def test_dcm_suffix_and_dicom_preferred_over_png(tmp_path):
    dicom_tree(tmp_path, suffix=".dcm")
    write_png(tmp_path / "train" / f"{A}.png")
    recs = by_id(load_vindr(tmp_path))
    assert Path(recs[A].image).name == f"{A}.dcm" and recs[A].boxes[0].x0 == 691.0


def test_resized_png_boxes_rescaled_exactly(tmp_path):
    ds = load_tree(png_tree(tmp_path))
    recs = by_id(ds)
    rows, cols = DIMS[A]
    assert recs[A].original_size == (cols, rows) == (2304, 2880)
    (b, _) = recs[A].boxes
    assert b.x0 == pytest.approx(691.0 * 24 / 2304, rel=1e-12)
    assert b.y0 == pytest.approx(1375.0 * 32 / 2880, rel=1e-12)
    assert b.x1 == pytest.approx(1653.0 * 24 / 2304, rel=1e-12)
    assert b.y1 == pytest.approx(1831.0 * 32 / 2880, rel=1e-12)
    assert b.reader == "R10" and b.label == "Cardiomegaly"
    nodule = [x for x in recs[C].boxes if x.label == "Nodule/Mass"][0]
    assert (nodule.x0, nodule.y0) == pytest.approx((500.5 * 24 / 2500, 600.25 * 32 / 2048), rel=1e-12)
    assert all(0 <= x.x1 <= 24 and 0 <= x.y1 <= 32 for r in ds.records for x in r.boxes)
    assert recs[B].original_size == (2540, 3072)


def test_png_without_meta_keeps_boxes(tmp_path):
    recs = by_id(load_vindr(png_tree(tmp_path, meta=False)))
    assert recs[A].boxes[0].x0 == 691.0 and recs[A].original_size is None


def test_png_missing_from_meta(tmp_path):
    png_tree(tmp_path)
    write_csv(tmp_path / "train_meta.csv", [(B, *DIMS[B])], "image_id,dim0,dim1")
    with pytest.raises(DataError, match=rf"train.csv:2: image '{A}' has no row in train_meta.csv"):
        load_vindr(tmp_path)
    ds = load_vindr(tmp_path, Problems(skip_bad=True))
    assert [r.patient_id for r in ds.records] == [B] and len(ds.problems) == 2  # A and C have boxes


def test_zip_archive(tmp_path):
    archive = zip_tree(dicom_tree(tmp_path / "vindr"), tmp_path / "vindr.zip")
    assert detect_vindr(archive) and detect_layout(archive) == "vindr"
    ds = load_tree(archive)
    assert len(ds) == 3 and ds.records[0].image == f"{archive}!/train/{A}.dicom"
    assert image_info(ds.records[0].image).width == 20


def test_zip_archive_of_pngs_rescales(tmp_path):
    archive = zip_tree(png_tree(tmp_path / "vindr"), tmp_path / "vindr.zip")
    recs = by_id(load_tree(archive))
    assert recs[A].boxes[0].x0 == pytest.approx(691.0 * 24 / 2304, rel=1e-12)


def test_detection(tmp_path):
    assert not detect_vindr(tmp_path)
    write_csv(tmp_path / "train.csv", [("x", 1)], "image_id,label")
    (tmp_path / "train").mkdir()
    assert not detect_vindr(tmp_path)  # wrong columns
    dicom_tree(tmp_path)
    assert detect_vindr(tmp_path) and detect_layout(tmp_path) == "vindr"
    (tmp_path / "only").mkdir()
    write_csv(tmp_path / "only" / "train.csv", ROWS)
    assert not detect_vindr(tmp_path / "only")  # no train/ folder


def test_metadata_only(tmp_path):
    write_csv(tmp_path / "train.csv", ROWS)
    ds = load_vindr(tmp_path, require_images=False)
    assert len(ds) == 3 and ds.problems == []
    assert Path(ds.records[0].image) == tmp_path / "train" / f"{A}.dicom"
    with pytest.raises(DataError, match=r"no train/ image folder"):
        load_vindr(tmp_path)


# Bad input ------------------------------------------------------------------------------------

def replace_row(index: int, **changes) -> list[tuple]:
    fields = HEADER.split(",")
    rows = list(ROWS)
    r = list(rows[index])
    for k, v in changes.items():
        r[fields.index(k)] = v
    rows[index] = tuple(r)
    return rows


BAD_ROWS = {  # each spoils image C (row 6 of ROWS = line 8 of train.csv)
    "unknown finding": (dict(class_name="Pneumonitis"), r"unknown finding 'Pneumonitis' in 'class_name'"),
    "id mismatch": (dict(class_id=3),
                    r"'class_name' 'Pleural effusion' does not match 'class_id' 3 \('Cardiomegaly'\)"),
    "class id": (dict(class_id="x"), r"'class_id' 'x' is not a class id 0..14"),
    "x_max < x_min": (dict(x_max=1700.0), r"box with x_max < x_min \(x_max=1700, x_min=1789\)"),
    "y_max < y_min": (dict(y_max=1.0), r"box with y_max < y_min"),
    "not a number": (dict(y_min="abc"), r"'y_min' 'abc' is not a number"),
    "no box": (dict(x_min=""), r"'x_min' '' is not a number \(a finding needs a box\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_strict_and_skip(tmp_path, case):
    changes, message = BAD_ROWS[case]
    dicom_tree(tmp_path, replace_row(6, **changes))
    with pytest.raises(DataError) as err:
        load_vindr(tmp_path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{tmp_path / 'train.csv'}:8: ")
    assert re.search(message, text), text
    ds = load_tree(tmp_path, skip_bad=True)
    # The whole image is skipped: its labels would be incomplete without that row.
    assert [r.patient_id for r in ds.records] == [A, B] and len(ds.problems) == 1


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "/etc/passwd", "C:\\Windows\\x"])
def test_image_id_outside_root(tmp_path, bad_id):
    dicom_tree(tmp_path, ROWS + [(bad_id, "No finding", 14, "R1", "", "", "", "")])
    message = f"train.csv:12: 'image_id' {bad_id!r} points outside the dataset root"
    with pytest.raises(DataError, match=re.escape(message)):
        load_vindr(tmp_path)
    ds = load_vindr(tmp_path, Problems(skip_bad=True))
    assert len(ds) == 3 and len(ds.problems) == 1


def test_missing_column(tmp_path):
    dicom_tree(tmp_path)
    text = (tmp_path / "train.csv").read_text().replace(",rad_id,", ",reader,", 1)
    (tmp_path / "train.csv").write_text(text)
    with pytest.raises(DataError, match=r"train.csv: missing required column 'rad_id' \(found: 'image_id'"):
        load_vindr(tmp_path)
    ds = load_vindr(tmp_path, Problems(skip_bad=True))
    assert len(ds) == 0 and len(ds.problems) == 1


def test_listed_image_missing(tmp_path):
    dicom_tree(tmp_path)
    (tmp_path / "train" / f"{B}.dicom").unlink()
    message = rf"train.csv:3: image '{B}' is listed but train/{B}.dicom/.dcm/.png is not found"
    with pytest.raises(DataError, match=message):
        load_vindr(tmp_path)
    assert [r.patient_id for r in load_vindr(tmp_path, Problems(skip_bad=True)).records] == [A, C]


def test_empty_train_folder(tmp_path):
    write_csv(tmp_path / "train.csv", ROWS)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "readme.txt").write_text("images go here")
    message = r"train: image folder holds no DICOM \(.dicom/.dcm\) or PNG images"
    with pytest.raises(DataError, match=message):
        load_vindr(tmp_path)
    sink = Problems(skip_bad=True)
    assert len(load_vindr(tmp_path, sink)) == 0 and len(sink) == 1


def test_bad_meta_row(tmp_path):
    png_tree(tmp_path)
    write_csv(tmp_path / "train_meta.csv", [(A, 0, 2304), (B, *DIMS[B]), (C, *DIMS[C])], "image_id,dim0,dim1")
    message = r"train_meta.csv:2: 'dim0'/'dim1' '0'/'2304' are not positive whole numbers"
    with pytest.raises(DataError, match=message):
        load_vindr(tmp_path)
