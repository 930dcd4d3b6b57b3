"""NIH ChestX-ray14 loader: tiny trees in each real on-disk layout, read back."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from builders import write_png, zip_tree
from cxr.data.image import image_info
from cxr.data.io import read_bytes
from cxr.data.layouts import detect_layout, load_tree
from cxr.data.problems import Problems
from cxr.data.record import NIH14
from cxr.data.sources.nih import detect_nih, load_nih, read_nih_metadata, shipped_nih_metadata_path
from cxr.errors import CxrError, DataError

# Exact headers of the real files (the 2017 ones end with empty columns).
ENTRY_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
ENTRY_2020 = ENTRY_2017.rstrip(",")
SAMPLE_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                 "View Position,OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,"
                 "OriginalImagePixelSpacing_y")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"

ROWS = [  # image, findings, follow-up, patient, age, sex, view, w, h, sx, sy
    ("00000001_000.png", "Cardiomegaly", 0, 1, 57, "M", "PA", 2682, 2749, 0.143, 0.143),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA", 2894, 2729, 0.143, 0.143),
    ("00000002_000.png", "No Finding", 0, 2, 80, "M", "AP", 2500, 2048, 0.171, 0.171),
    ("00000003_000.png", "Hernia|Infiltration", 0, 30805, 81, "F", "PA", 2048, 2500, 0.168, 0.139),
]


def csv_text(header: str, rows: list[tuple], trailing: str = "") -> str:
    lines = [header] + [",".join(str(v) for v in r) + trailing for r in rows]
    return "\n".join(lines) + "\n"


def full_tree(root: Path, rows: list[tuple] = ROWS, name: str = "Data_Entry_2017.csv") -> Path:
    """The official release: Data_Entry CSV at the root, images in images_NNN/images/."""
    trailing = "," if name == "Data_Entry_2017.csv" else ""
    header = ENTRY_2017 if trailing else ENTRY_2020
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(csv_text(header, rows, trailing))
    for i, r in enumerate(rows):
        folder = "images_001" if i < 2 else "images_002"
        write_png(root / folder / "images" / r[0], h=24, w=24, mode="LA" if i == 1 else "L", seed=i)
    return root


def by_name(ds) -> dict:
    return {Path(r.image.split("!/")[-1]).name: r for r in ds.records}


# Layouts --------------------------------------------------------------------------------------

def test_full_release_labels_and_metadata(tmp_path):
    ds = load_tree(full_tree(tmp_path))
    assert ds.layout == "nih" and ds.label_names == NIH14 and len(ds) == 4 and ds.problems == []
    recs = by_name(ds)
    r = recs["00000001_001.png"]
    assert r.findings == ("Cardiomegaly", "Emphysema")
    expected = np.zeros(14, np.float32)
    expected[[NIH14.index("Cardiomegaly"), NIH14.index("Emphysema")]] = 1
    np.testing.assert_array_equal(r.labels, expected)
    assert (r.patient_id, r.age, r.sex, r.view, r.follow_up) == ("00000001", 58.0, "M", "PA", 1)
    assert r.original_size == (2894, 2729) and r.pixel_spacing == (0.143, 0.143)
    assert r.site == "nih" and r.split is None and r.boxes == []
    # "No Finding" is the all-zero vector, never NaN.
    normal = recs["00000002_000.png"]
    assert normal.labels.dtype == np.float32 and not np.isnan(normal.labels).any()
    assert normal.labels.sum() == 0 and normal.view == "AP"
    last = recs["00000003_000.png"]
    assert last.patient_id == "00030805" and last.sex == "F" and last.pixel_spacing == (0.168, 0.139)
    assert set(last.findings) == {"Hernia", "Infiltration"}
    assert ds.label_matrix().shape == (4, 14) and ds.label_matrix().sum() == 5


def test_image_refs_point_at_the_files(tmp_path):
    recs = by_name(load_nih(full_tree(tmp_path)))
    assert Path(recs["00000001_000.png"].image) == tmp_path / "images_001/images/00000001_000.png"
    assert Path(recs["00000003_000.png"].image) == tmp_path / "images_002/images/00000003_000.png"
    assert image_info(recs["00000001_001.png"].image).mode == "LA"  # 2-channel kept for the decoder


def test_v2020_file_is_preferred_and_has_no_trailing_comma(tmp_path):
    full_tree(tmp_path)  # Data_Entry_2017.csv, ages as above
    newer = [ROWS[0][:4] + (60,) + ROWS[0][5:]] + ROWS[1:]
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(csv_text(ENTRY_2020, newer))
    recs = by_name(load_nih(tmp_path))
    assert recs["00000001_000.png"].age == 60.0


def test_flat_images_folder(tmp_path):
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(csv_text(ENTRY_2020, ROWS[:2]))
    for r in ROWS[:2]:
        write_png(tmp_path / "images" / r[0])
    ds = load_nih(tmp_path)
    assert len(ds) == 2 and all(Path(r.image).parent == tmp_path / "images" for r in ds.records)


def test_official_split_lists(tmp_path):
    full_tree(tmp_path)
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    recs = by_name(load_nih(tmp_path))
    assert [recs[n].split for n in sorted(recs)] == ["train", "train", "test", None]


def test_split_listed_twice_is_a_problem(tmp_path):
    full_tree(tmp_path)
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n00000001_000.png\n")
    message = r"test_list.txt:2: image '00000001_000.png' is also in train_val_list.txt"
    with pytest.raises(DataError, match=message):
        load_nih(tmp_path)


@pytest.mark.parametrize("trailing", [",,,", ",,,,"])
def test_bbox_list(tmp_path, trailing):
    full_tree(tmp_path)
    header = "Image Index,Finding Label,Bbox [x,y,w,h]" + trailing
    (tmp_path / "BBox_List_2017.csv").write_text(
        f"{header}\n"
        "00000001_000.png,Cardiomegaly,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661\n"
        "00000003_000.png,Infiltrate,10,20,30,40\n"
        "00000003_000.png,Hernia,1.5,2.5,3,4\n"
        "99999999_000.png,Mass,1,2,3,4\n"  # an image this tree does not hold: ignored
    )
    recs = by_name(load_nih(tmp_path))
    s = 24 / 1024  # the tree's PNGs are 24²: boxes are scaled from the released 1024² frame
    (b,) = recs["00000001_000.png"].boxes
    assert b.label == "Cardiomegaly"
    assert (b.x0, b.y0) == pytest.approx((225.084745762712 * s, 547.019216763771 * s))
    assert (b.x1, b.y1) == pytest.approx(((225.084745762712 + 86.7796610169491) * s,
                                          (547.019216763771 + 79.1864406779661) * s))
    boxes = recs["00000003_000.png"].boxes
    assert [x.label for x in boxes] == ["Infiltration", "Hernia"]
    assert [(x.x0, x.y0, x.x1, x.y1) for x in boxes] == [
        pytest.approx((10 * s, 20 * s, 40 * s, 60 * s)), pytest.approx((1.5 * s, 2.5 * s, 4.5 * s, 6.5 * s))]
    assert recs["00000002_000.png"].boxes == []


def test_bbox_list_at_the_released_size_and_anisotropic(tmp_path):
    """Boxes stay as written on a 1024² PNG and scale per axis on a resized, non-square copy."""
    full_tree(tmp_path)
    write_png(tmp_path / "images" / "00000001_000.png", h=1024, w=1024)
    write_png(tmp_path / "images" / "00000003_000.png", h=256, w=512)
    (tmp_path / "BBox_List_2017.csv").write_text(
        f"{BBOX_HEADER}\n00000001_000.png,Mass,100,200,300,400\n00000003_000.png,Mass,100,200,300,400\n")
    recs = by_name(load_nih(tmp_path))
    (b,) = recs["00000001_000.png"].boxes
    assert (b.x0, b.y0, b.x1, b.y1) == (100, 200, 400, 600)
    (b,) = recs["00000003_000.png"].boxes
    assert (b.x0, b.y0, b.x1, b.y1) == (50, 50, 200, 150)


def test_kaggle_sample_layout_and_age_units(tmp_path):
    rows = [
        ("00000013_005.png", "Emphysema|Infiltration|Pleural_Thickening|Pneumothorax", 5, 13,
         "060Y", "M", "AP", 3056, 2544, 0.139, 0.139),
        ("00000013_026.png", "Cardiomegaly|Emphysema", 26, 13, "006M", "M", "AP", 2500, 2048, 0.168, 0.168),
        ("00000017_001.png", "No Finding", 1, 17, "010D", "M", "AP", 2500, 2048, 0.168, 0.168),
    ]
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample/sample_labels.csv").write_text(csv_text(SAMPLE_HEADER, rows))
    for r in rows:
        write_png(tmp_path / "sample/images" / r[0], mode="LA")
    assert detect_layout(tmp_path) == "nih"
    recs = by_name(load_tree(tmp_path))
    assert len(recs) == 3
    assert recs["00000013_005.png"].age == 60.0
    assert recs["00000013_026.png"].age == pytest.approx(0.5)
    assert recs["00000017_001.png"].age == pytest.approx(10 / 365.25)
    assert recs["00000013_005.png"].original_size == (3056, 2544)
    assert recs["00000013_005.png"].patient_id == "00000013"
    assert len(recs["00000013_005.png"].findings) == 4


def test_zip_archive(tmp_path):
    archive = zip_tree(full_tree(tmp_path / "nih"), tmp_path / "nih.zip")
    assert detect_nih(archive) and detect_layout(archive) == "nih"
    ds = load_tree(archive)
    assert len(ds) == 4
    recs = by_name(ds)
    ref = recs["00000001_001.png"].image
    assert ref == f"{archive}!/images_001/images/00000001_001.png"
    assert read_bytes(ref)[:4] == b"\x89PNG"
    np.testing.assert_array_equal(ds.label_matrix(), load_tree(tmp_path / "nih").label_matrix())


def test_detection(tmp_path):
    assert not detect_nih(tmp_path)
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    assert not detect_nih(tmp_path)
    assert not detect_nih(tmp_path / "missing")
    full_tree(tmp_path)
    assert detect_nih(tmp_path)


def test_metadata_only_without_images(tmp_path):
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(csv_text(ENTRY_2020, ROWS))
    ds = load_nih(tmp_path, require_images=False)
    assert len(ds) == 4 and ds.problems == []
    assert Path(ds.records[0].image) == tmp_path / "images" / "00000001_000.png"
    with pytest.raises(DataError, match="no image folder"):
        load_nih(tmp_path)


# Bad input ------------------------------------------------------------------------------------

def with_row(rows: list[tuple], index: int, **changes) -> list[tuple]:
    fields = ("image", "findings", "follow_up", "patient", "age")
    out = list(rows)
    r = list(out[index])
    for k, v in changes.items():
        r[fields.index(k)] = v
    out[index] = tuple(r)
    return out


BAD_ROWS = {
    "unknown finding": (dict(findings="Cardiomegaly|Pneumonitis"),
                        r"unknown finding 'Pneumonitis' in 'Finding Labels'"),
    "age": (dict(age="abc"), r"'Patient Age' 'abc' is not an age"),
    "duplicate": (dict(image="00000001_000.png"),
                  r"image '00000001_000.png' listed twice \(first on line 2\)"),
    "parent dir": (dict(image="../../etc/passwd.png"),
                   r"'Image Index' '../../etc/passwd.png' points outside the dataset root"),
    "absolute": (dict(image="/etc/passwd.png"),
                 r"'Image Index' '/etc/passwd.png' points outside the dataset root"),
    "follow-up": (dict(follow_up="x1"), r"'Follow-up #' 'x1' is not a whole number"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_strict_and_skip(tmp_path, case):
    changes, message = BAD_ROWS[case]
    rows = with_row(ROWS, 2, **changes)  # line 4 of the CSV
    full_tree(tmp_path, ROWS)  # images of the good rows
    (tmp_path / "Data_Entry_2017.csv").write_text(csv_text(ENTRY_2017, rows, ","))
    with pytest.raises(DataError) as err:
        load_nih(tmp_path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{tmp_path / 'Data_Entry_2017.csv'}:4: ")
    assert re.search(message, text), text
    ds = load_tree(tmp_path, skip_bad=True)
    assert len(ds.problems) == 1 and ds.problems[0].where.endswith("Data_Entry_2017.csv:4")
    assert sorted(by_name(ds)) == ["00000001_000.png", "00000001_001.png", "00000003_000.png"]


def test_missing_column_names_column_and_file(tmp_path):
    full_tree(tmp_path)
    text = (tmp_path / "Data_Entry_2017.csv").read_text().replace("Patient Age,", "Age,", 1)
    (tmp_path / "Data_Entry_2017.csv").write_text(text)
    message = r"Data_Entry_2017.csv: missing required column 'Patient Age' \(found: "
    with pytest.raises(DataError, match=message):
        load_nih(tmp_path)
    ds = load_tree(tmp_path, skip_bad=True)
    assert len(ds) == 0 and "'Patient Age'" in ds.problems[0].problem


def test_listed_image_missing(tmp_path):
    full_tree(tmp_path)
    (tmp_path / "images_002/images/00000002_000.png").unlink()
    message = r"Data_Entry_2017.csv:4: image '00000002_000.png' is listed but not found"
    with pytest.raises(DataError, match=message):
        load_nih(tmp_path)
    ds = load_nih(tmp_path, Problems(skip_bad=True))
    assert len(ds) == 3 and "00000002_000.png" not in by_name(ds)


def test_empty_images_folder(tmp_path):
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(csv_text(ENTRY_2020, ROWS))
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"images: image folder holds no PNG images"):
        load_nih(tmp_path)
    sink = Problems(skip_bad=True)
    assert len(load_nih(tmp_path, sink)) == 0 and len(sink) == 1  # one line, not one per row


def test_bad_boxes(tmp_path):
    full_tree(tmp_path)
    (tmp_path / "BBox_List_2017.csv").write_text(
        f"{BBOX_HEADER}\n"
        "00000001_000.png,Cardiomegaly,10,10,-5,4\n"
        "00000001_000.png,Pneumonitis,1,1,2,2\n"
        "00000001_000.png,Mass,abc,1,2,2\n"
        "../x.png,Mass,1,1,2,2\n"
        "00000001_000.png,Mass,1,1,2,2\n"
    )
    message = r"BBox_List_2017.csv:2: box with negative size \(w=-5, h=4\): x_max < x_min"
    with pytest.raises(DataError, match=message):
        load_nih(tmp_path)
    ds = load_nih(tmp_path, Problems(skip_bad=True))
    assert [p.where.rsplit(":", 1)[-1] for p in ds.problems] == ["2", "3", "4", "5"]
    assert "unknown finding 'Pneumonitis'" in ds.problems[1].problem
    assert [(b.label, b.x1) for b in by_name(ds)["00000001_000.png"].boxes] == [("Mass", 3.0 * 24 / 1024)]


# Metadata without images ------------------------------------------------------------------------

def test_read_nih_metadata_on_a_sample_csv(tmp_path):
    path = tmp_path / "sample_labels.csv"
    path.write_text(csv_text(SAMPLE_HEADER, [
        ("00000013_005.png", "Mass|Nodule", 5, 13, "060Y", "F", "PA", 3056, 2544, 0.139, 0.139)]))
    df = read_nih_metadata(path)
    assert list(df.columns[:6]) == ["image", "patient_id", "age", "sex", "view", "follow_up"]
    assert list(df.columns[6:20]) == list(NIH14)
    row = df.iloc[0]
    assert (row.patient_id, row.age, row.sex, row.view, row.follow_up) == ("00000013", 60.0, "F", "PA", 5)
    assert (row.Mass, row.Nodule, row.Hernia) == (1.0, 1.0, 0.0)
    assert (row.original_width, row.original_height) == (3056, 2544)


def test_read_nih_metadata_skip_mode_drops_bad_rows(tmp_path):
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_text(csv_text(ENTRY_2020, with_row(ROWS, 0, age="abc")))
    sink = Problems(skip_bad=True)
    df = read_nih_metadata(path, sink)
    assert len(df) == 3 and len(sink) == 1 and sink.items[0].where == f"{path}:2"


def test_shipped_metadata_reads_fast_and_whole():
    path = shipped_nih_metadata_path()
    assert path.name == "Data_Entry_2017_v2020.csv.gz"
    start = time.perf_counter()
    df = read_nih_metadata(path)
    elapsed = time.perf_counter() - start
    assert len(df) == 112_120 and df["patient_id"].nunique() == 30_805
    assert elapsed < 15  # ~1 s on a laptop core; generous for a shared machine
    first = df.iloc[0]
    assert (first.image, first.patient_id, first.age, first.view) == (
        "00000001_000.png", "00000001", 57.0, "PA")
    assert first.Cardiomegaly == 1.0 and df.loc[0, list(NIH14)].sum() == 1
    labels = df[list(NIH14)].to_numpy()
    assert not np.isnan(labels).any() and set(np.unique(labels)) == {0.0, 1.0}
    assert int(labels[:, NIH14.index("Hernia")].sum()) == 227
    assert int((labels.sum(1) == 0).sum()) == 60_361  # "No Finding" images
    assert set(df["sex"]) == {"M", "F"} and set(df["view"]) == {"PA", "AP"}
    assert df["age"].between(0, 120).all() and not math.isnan(df["spacing_x"].iloc[0])


def test_shipped_metadata_path_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CxrError, match="torchxrayvision is not installed"):
        shipped_nih_metadata_path()


# The label CSV under any name, or given by path -----------------------------------------------

SAMPLE_ROWS = [  # Kaggle's 5 % sample writes ages as 060Y
    ("00000013_005.png", "Emphysema|Infiltration", 5, 13, "060Y", "M", "AP", 3056, 2544, 0.139, 0.139),
    ("00000013_026.png", "No Finding", 26, 13, "057Y", "M", "AP", 2500, 2048, 0.168, 0.168),
    ("00000032_001.png", "Effusion", 1, 32, "055Y", "F", "AP", 2500, 2048, 0.168, 0.168),
]


def _images(folder: Path, rows: list[tuple]) -> None:
    for i, r in enumerate(rows):
        write_png(folder / r[0], h=24, w=24, seed=i)


@pytest.mark.parametrize("header,trailing,name", [
    (SAMPLE_HEADER, "", "sample.csv"),  # the Kaggle sample as users keep it
    (ENTRY_2017, ",", "my labels.csv"),  # the official header, renamed
    (ENTRY_2020, "", "sample/whatever.csv"),
])
def test_a_data_entry_csv_under_any_name_is_found(tmp_path, header, trailing, name):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(csv_text(header, SAMPLE_ROWS, trailing))
    _images(tmp_path / "images", SAMPLE_ROWS)
    assert detect_layout(tmp_path) == "nih"
    ds = load_tree(tmp_path)
    assert ds.layout == "nih" and len(ds) == 3 and ds.problems == []
    r = by_name(ds)["00000013_005.png"]
    assert (r.patient_id, r.age, r.sex, r.view, r.follow_up) == ("00000013", 60.0, "M", "AP", 5)
    assert r.original_size == (3056, 2544) and r.pixel_spacing == (0.139, 0.139)
    assert r.findings == ("Infiltration", "Emphysema")
    assert by_name(ds)["00000032_001.png"].age == 55.0


def test_a_csv_with_another_header_is_not_nih(tmp_path):
    (tmp_path / "notes.csv").write_text("Image Index,Finding Labels,comment\na.png,No Finding,x\n")
    _images(tmp_path / "images", SAMPLE_ROWS)
    assert not detect_nih(tmp_path)
    looked = r"no NIH label file \(.*sample_labels.csv, or another CSV with the Data_Entry header\)"
    with pytest.raises(DataError, match=looked):
        load_tree(tmp_path, layout="nih")
    with pytest.raises(DataError, match="layout 'nih' found no images here: " + looked):
        load_tree(tmp_path, layout="nih", skip_bad=True)  # never a silent empty dataset


def test_labels_csv_given_by_path(tmp_path):
    labels = tmp_path / "downloads" / "sample.csv"
    labels.parent.mkdir()
    labels.write_text(csv_text(SAMPLE_HEADER, SAMPLE_ROWS))
    # The images folder itself (PNGs at its root), and a folder holding images/.
    _images(tmp_path / "flat", SAMPLE_ROWS)
    _images(tmp_path / "kept" / "images", SAMPLE_ROWS)
    for root in (tmp_path / "flat", tmp_path / "kept"):
        ds = load_tree(root, labels_csv=labels)
        assert ds.layout == "nih" and len(ds) == 3 and ds.problems == []
        assert {Path(r.image).name for r in ds.records} == {r[0] for r in SAMPLE_ROWS}
        assert by_name(ds)["00000013_026.png"].age == 57.0
    with pytest.raises(DataError, match=r"nope.csv: no such file \(given as the NIH label CSV\)"):
        load_tree(tmp_path / "flat", labels_csv=tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"sample.csv: layout 'vindr' takes no label file from outside the tree "
                                        r"\(layouts that do: nih\)"):
        load_tree(tmp_path / "flat", layout="vindr", labels_csv=labels)
