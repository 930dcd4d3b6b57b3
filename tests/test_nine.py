"""The 9-class set: building it from four source trees and reading it back (layout "nine")."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pytest

from builders import write_png, zip_tree
from cxr.data.layouts import detect_layout, load_tree
from cxr.data.nine import CONFOUNDING_CAVEAT, build_nine
from cxr.data.record import NINE
from cxr.errors import CxrError, DataError

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_ROWS = [  # (image, findings, patient)
    ("00000001_000.png", "Cardiomegaly", 1),
    ("00000001_001.png", "Cardiomegaly|Effusion", 1),  # two findings: not taken
    ("00000002_000.png", "No Finding", 2),
    ("00000002_001.png", "No Finding", 2),
    ("00000003_000.png", "Pneumonia", 3),  # NIH Pneumonia: not taken
    ("00000004_000.png", "Edema", 4),
    ("00000005_000.png", "Emphysema", 5),
    ("00000006_000.png", "Effusion", 6),
    ("00000007_000.png", "Atelectasis", 7),
    ("00000008_000.png", "Hernia", 8),  # not one of the nine
    ("00000009_000.png", "Infiltration|Atelectasis", 9),  # two findings: not taken
]


def make_nih(root: Path) -> Path:
    lines = [NIH_HEADER]
    for i, (image, findings, patient) in enumerate(NIH_ROWS):
        lines.append(f"{image},{findings},{i},{patient},45,M,PA,2048,2500,0.143,0.143")
        write_png(root / "images" / image, seed=i)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    return root


def make_sources(tmp: Path) -> dict[str, Path]:
    nih = make_nih(tmp / "nih")
    pct = tmp / "pct"  # Covid source: the kaggle_pct layout (its other classes are not taken)
    for cls in ("COVID19", "NORMAL", "PNEUMONIA", "TURBERCULOSIS"):
        write_png(pct / "train" / cls / f"{cls}(1).png")
    write_png(pct / "test" / "COVID19" / "COVID19(2).png")
    write_png(pct / "val" / "COVID19" / "COVID19(1).png")  # same name as in train/
    pneu = tmp / "pneu" / "chest_xray"
    write_png(pneu / "train" / "PNEUMONIA" / "person1_bacteria_1.png")
    write_png(pneu / "train" / "PNEUMONIA" / "person1_virus_3.png")
    write_png(pneu / "test" / "PNEUMONIA" / "person2_bacteria_5.png")
    write_png(pneu / "train" / "NORMAL" / "IM-0001-0001.png")
    tb = tmp / "tb" / "TB_Chest_Radiography_Database"
    write_png(tb / "Tuberculosis" / "Tuberculosis-1.png")
    write_png(tb / "Tuberculosis" / "Tuberculosis-2.png")
    write_png(tb / "Normal" / "Normal-1.png")
    tb_zip = zip_tree(tmp / "tb", tmp / "tb.zip")
    return {"nih": nih, "covid": pct, "pneumonia": tmp / "pneu", "tb": tb_zip}


EXPECTED = {"Edema": 1, "No Finding": 2, "Pneumonia": 3, "Tuberculosis": 2, "Cardiomegaly": 1,
            "Emphysema": 1, "Covid": 3, "Effusion": 1, "Atelectasis": 1}


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "nine.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_build_nine_counts_files_links_and_csv(tmp_path):
    src = make_sources(tmp_path)
    out = tmp_path / "nine"
    counts = build_nine(**src, out=out)
    assert counts == EXPECTED and list(counts) == list(NINE)
    rows = read_rows(out)
    assert list(rows[0]) == ["image", "label", "source", "patient_id", "original"]
    assert Counter(r["label"] for r in rows) == Counter(EXPECTED)
    # every row's image exists in its class folder, and nothing else is there
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and p.name != "nine.csv")
    assert on_disk == sorted(r["image"] for r in rows)
    assert all(r["image"].split("/")[0] == r["label"] for r in rows)
    by_label = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    # single-label NIH only; NIH Pneumonia is not taken
    assert {r["source"] for r in by_label["Pneumonia"]} == {"kaggle_pneumonia"}
    assert sorted(r["patient_id"] for r in by_label["Pneumonia"]) == ["person1", "person1", "person2"]
    normals = {Path(r["original"]).name for r in by_label["No Finding"]}
    assert normals == {"00000002_000.png", "00000002_001.png"}
    assert {r["source"] for r in by_label["No Finding"]} == {"nih"}
    assert by_label["Cardiomegaly"][0]["patient_id"] == "00000001"
    assert {r["source"] for r in by_label["Covid"]} == {"kaggle_pct"}
    assert {r["source"] for r in by_label["Tuberculosis"]} == {"tb_database"}
    # the two COVID19(1).png files got distinct names
    covid = sorted(Path(r["image"]).name for r in by_label["Covid"])
    assert covid == ["COVID19(1).png", "COVID19(1)_2.png", "COVID19(2).png"]
    # plain files are linked (same inode or a symlink); zip members are extracted copies
    nih_file = out / by_label["Edema"][0]["image"]
    original = Path(by_label["Edema"][0]["original"])
    assert nih_file.is_symlink() or os.path.samefile(nih_file, original)
    tb_row = by_label["Tuberculosis"][0]
    assert "!/" in tb_row["original"]
    extracted = out / tb_row["image"]
    assert not extracted.is_symlink() and extracted.read_bytes()[:4] == b"\x89PNG"
    # no temporary folder left beside the output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_build_nine_copies_when_not_linking(tmp_path):
    src = make_sources(tmp_path)
    out = tmp_path / "nine"
    build_nine(**src, out=out, link=False)
    row = next(r for r in read_rows(out) if r["label"] == "Edema")
    copy, original = out / row["image"], Path(row["original"])
    assert not copy.is_symlink() and not os.path.samefile(copy, original)
    assert copy.read_bytes() == original.read_bytes()


def test_nine_layout_reads_the_built_set_back(tmp_path):
    src = make_sources(tmp_path)
    out = tmp_path / "nine"
    build_nine(**src, out=out)
    assert detect_layout(out) == "nine"
    ds = load_tree(out)
    assert ds.layout == "nine" and ds.label_names == NINE and len(ds) == sum(EXPECTED.values())
    assert Counter(s.findings[0] for s in ds.records) == Counter(EXPECTED)
    s = next(r for r in ds.records if r.image.endswith("person2_bacteria_5.png"))
    assert s.findings == ("Pneumonia",)
    assert s.patient_id == "person2" and s.source == "kaggle_pneumonia" and s.site == "kaggle_pneumonia"
    assert s.extra["original"].endswith("chest_xray/test/PNEUMONIA/person2_bacteria_5.png")
    # and from a zip of the set
    z = zip_tree(out, tmp_path / "nine.zip")
    assert detect_layout(z) == "nine" and len(load_tree(z)) == len(ds)


def test_refuses_non_empty_out_and_leaves_it_alone(tmp_path):
    src = make_sources(tmp_path)
    out = tmp_path / "nine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CxrError, match="not empty"):
        build_nine(**src, out=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty_out"
    empty.mkdir()
    assert build_nine(**src, out=empty) == EXPECTED  # an empty folder is fine


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import cxr.data.nine as nine

    src = make_sources(tmp_path)
    placed = []

    def place_then_fail(ref, dst, link):
        if len(placed) == 5:
            raise CxrError(f"{ref}: disk full")
        placed.append(dst)
        real_place(ref, dst, link)

    real_place = nine._place
    monkeypatch.setattr(nine, "_place", place_then_fail)
    out = tmp_path / "nine"
    with pytest.raises(CxrError, match="disk full"):
        build_nine(**src, out=out)
    assert len(placed) == 5 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nine.")]


def test_source_without_its_class_is_one_line(tmp_path):
    src = make_sources(tmp_path)
    covid = tmp_path / "no_covid"
    write_png(covid / "Normal" / "a.png")
    with pytest.raises(CxrError, match=r"no_covid: no Covid images in the covid source") as err:
        build_nine(**{**src, "covid": covid}, out=tmp_path / "nine")
    assert "\n" not in str(err.value)
    with pytest.raises(CxrError, match=r"not an NIH ChestX-ray14 tree"):
        build_nine(**{**src, "nih": src["covid"]}, out=tmp_path / "nine")
    with pytest.raises(CxrError, match="path does not exist"):
        build_nine(**{**src, "tb": tmp_path / "missing"}, out=tmp_path / "nine")


def test_confounding_caveat_names_the_problem():
    text = CONFOUNDING_CAVEAT.lower()
    assert "confounded" in text and "source" in text and "class" in text
    assert "\n" not in CONFOUNDING_CAVEAT


# Reading a nine.csv that is wrong --------------------------------------------------------------

def make_nine(root: Path, header: str, rows: list[str]) -> Path:
    write_png(root / "Covid" / "a.png")
    write_png(root / "Edema" / "b.png")
    (root / "nine.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


HEADER = "image,label,source,patient_id,original"


def test_nine_csv_missing_column(tmp_path):
    root = make_nine(tmp_path / "n", "image,label,source", ["Covid/a.png,Covid,x"])
    with pytest.raises(DataError, match=r"nine\.csv: missing required column 'patient_id'"):
        load_tree(root)


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "Covid/../../x.png", "C:/x.png"])
def test_nine_csv_path_outside_root(tmp_path, path):
    write_png(tmp_path / "outside.png")
    rows = [f"{path},Covid,kaggle_pct,p1,", "Edema/b.png,Edema,nih,2,"]
    root = make_nine(tmp_path / "n", HEADER, rows)
    with pytest.raises(DataError, match=r"nine\.csv:2: image path .* points outside"):
        load_tree(root)
    ds = load_tree(root, skip_bad=True)
    assert len(ds) == 1 and ds.records[0].findings == ("Edema",) and len(ds.problems) == 1


def test_nine_csv_bad_rows(tmp_path):
    rows = ["Covid/a.png,Covid,kaggle_pct,,", "Edema/b.png,Hernia,nih,2,", "Edema/zz.png,Edema,nih,3,",
            "Covid/a.png,Covid,kaggle_pct,p1,"]
    root = make_nine(tmp_path / "n", HEADER, rows)
    with pytest.raises(DataError, match=r"nine\.csv:3: unknown label 'Hernia'"):
        load_tree(root)
    ds = load_tree(root, skip_bad=True)
    assert [p.where.rsplit(":", 1)[-1] for p in ds.problems] == ["3", "4", "5"]
    assert len(ds) == 1 and ds.records[0].patient_id == "a"  # empty patient id: the file stem
