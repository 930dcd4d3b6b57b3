"""`cxr datasets inspect` and `preview` on every layout, from the loaders' own fixture trees."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from builders import one_error_line, zip_tree
from cxr.cli.main import main
from cxr.data.layouts import layouts


def _shenzhen(tmp):
    from test_nlm import make_shenzhen
    return make_shenzhen(tmp / "ChinaSet_AllFiles")


def _montgomery(tmp):
    from test_nlm import make_montgomery
    return make_montgomery(tmp / "MontgomerySet")


def _kaggle_zip(tmp):
    from test_nlm import make_kaggle
    return zip_tree(make_kaggle(tmp / "kaggle"), tmp / "archive.zip")


def _nih(tmp):
    from test_nih import full_tree
    return full_tree(tmp / "nih")


def _vindr_dicom(tmp):
    from test_vindr import dicom_tree
    return dicom_tree(tmp / "vindr")


def _vindr_png(tmp):
    from test_vindr import png_tree
    return png_tree(tmp / "vindr256")


def _pneumonia(tmp):
    from test_folders import make_pneumonia
    return make_pneumonia(tmp / "pneu")


def _pct(tmp):
    from test_folders import make_pct
    return make_pct(tmp / "pct")


def _tb(tmp):
    from test_folders import make_tb
    return make_tb(tmp / "tbdb")


def _nine(tmp):
    from cxr.data.nine import build_nine
    from test_nine import make_sources
    src = make_sources(tmp)
    build_nine(src["nih"], src["covid"], src["pneumonia"], src["tb"], tmp / "nine")
    return tmp / "nine"


CASES = {
    "shenzhen": _shenzhen, "montgomery": _montgomery, "nlm": _kaggle_zip, "nih": _nih,
    "vindr": _vindr_dicom, "vindr-png": _vindr_png, "kaggle_pneumonia": _pneumonia,
    "kaggle_pct": _pct, "tb_database": _tb, "nine": _nine,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inspect_and_preview_every_layout(tmp_path, capsys, name):
    root = CASES[name](tmp_path)
    main(["datasets", "inspect", str(root), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == name.split("-")[0]
    assert summary["images"] > 0 and summary["checked_images"] == summary["images"]
    assert summary["unreadable_images"] == 0 and summary["problems"] == []
    sheet = tmp_path / "sheet.png"
    assert main(["datasets", "preview", str(root), "--out", str(sheet), "--n", "4", "--size", "32"]) == 0
    with Image.open(sheet) as im:
        assert im.width == 4 * 32 or summary["images"] < 4


@pytest.mark.parametrize("layout", sorted(layouts()))
def test_a_forced_layout_that_finds_nothing_is_an_error(tmp_path, capsys, layout):
    # A tree of another layout (Shenzhen's), or an empty folder: exit 2 and one line naming
    # what the layout looked for, never "0 images" (inspect collects every problem, and still).
    for root in (_shenzhen(tmp_path), tmp_path / "empty"):
        root.mkdir(exist_ok=True)
        if layout in ("shenzhen", "nlm", "folders") and root.name != "empty":
            continue  # those layouts do read a Shenzhen tree
        assert main(["datasets", "inspect", str(root), "--layout", layout]) == 2
        err = one_error_line(capsys)
        assert err.startswith(f"cxr: error: {root}: layout '{layout}' found no images here: ")
        assert len(err) > len(f"cxr: error: {root}: layout '{layout}' found no images here: ") + 10


def test_a_corrupt_zip_is_named_as_such(tmp_path, capsys):
    bad = tmp_path / "archive.zip"
    bad.write_bytes(b"PK\x03\x04 truncated download")
    for args in (["inspect", str(bad)], ["inspect", str(bad), "--layout", "nlm"],
                 ["preview", str(bad), "--out", str(tmp_path / "s.png")]):
        assert main(["datasets", *args]) == 2
        assert one_error_line(capsys) == f"cxr: error: {bad}: not a readable zip archive (truncated or corrupt?)"
    assert not (tmp_path / "s.png").exists()


def test_the_nih_sample_as_users_keep_it(tmp_path, capsys):
    from test_nih import SAMPLE_HEADER, SAMPLE_ROWS, _images, csv_text
    root = tmp_path / "nih-sample"
    root.mkdir()
    (root / "sample.csv").write_text(csv_text(SAMPLE_HEADER, SAMPLE_ROWS))
    _images(root / "images", SAMPLE_ROWS)
    for extra in ([], ["--layout", "nih"]):
        assert main(["datasets", "inspect", str(root), "--json", *extra]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["layout"], summary["images"], summary["patients"], summary["problems"]) == ("nih", 3, 2, [])
    # The CSV kept elsewhere, given by path; the images folder given itself.
    (root / "sample.csv").rename(tmp_path / "labels.csv")
    assert main(["datasets", "inspect", str(root / "images"), "--json", "--labels-csv", str(tmp_path / "labels.csv")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["layout"], summary["images"], summary["origin"]) == ("nih", 3, "real")
    assert main(["datasets", "inspect", str(root), "--labels-csv", str(tmp_path / "nope.csv")]) == 2
    assert one_error_line(capsys).endswith("nope.csv: no such file (given as the NIH label CSV)")
