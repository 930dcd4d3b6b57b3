"""`cxr datasets inspect` and `preview` on every layout, from the loaders' own fixture trees."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from builders import zip_tree
from cxr.cli.main import main


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
