"""torchxrayvision's own dataset readers on the phantom's trees (CT renderer): a peer reader
accepts our layouts as it accepts the real downloads, with the images, labels and pathology
masks where the phantom's truth puts them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr.cli.main import main
from cxr.data.sources.nih import load_nih
from cxr.phantom import writers as W

xrv = pytest.importorskip("torchxrayvision")
# torchxrayvision's DICOM path calls pydicom's old module names; their notice is not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:The 'pydicom.pixel_data_handlers' module:DeprecationWarning")

# Findings with boxes in each region (lung field, heart, pleura); seed 3 draws all three.
NIH_FINDINGS = "Atelectasis,Infiltration,Mass,Nodule,Cardiomegaly,Effusion,Pneumothorax"


def manifest(root: Path) -> dict[str, dict[str, str]]:
    """Truth manifest rows by tree file name."""
    with open(root / W.TRUTH_DIR / "manifest.csv", newline="") as f:
        return {Path(r["image"]).name: r for r in csv.DictReader(f)}


def phantom(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "tree"
    assert main(["phantom", "--out", str(out), "--workers", "1", *args]) == 0
    return out


def test_nih_reader_builds_masks_of_the_image_shape_inside_the_lungs(tmp_path, capsys):
    # --size 1024 is the real size: torchxrayvision scales boxes by (image side / 1024)
    out = phantom(tmp_path, "--preset", "nih", "--size", "1024", "--n", "8", "--seed", "3",
                  "--findings", NIH_FINDINGS)
    capsys.readouterr()
    ds = xrv.datasets.NIH_Dataset(imgpath=str(out / "images"), csvpath=str(out / W.NIH_ENTRY_CSV),
                                  bbox_list_path=str(out / W.NIH_BOX_CSV), views=["PA", "AP"],
                                  unique_patients=False, pathology_masks=True)
    truth = manifest(out)
    assert len(ds) == 8
    regions, n_masks = set(), 0
    for i in range(len(ds)):
        sample = ds[i]
        row = truth[ds.csv["Image Index"].iloc[i]]
        assert sample["img"].shape == (1, 1024, 1024)
        findings = set(filter(None, row["findings"].split("|")))
        assert {p for p, v in zip(ds.pathologies, sample["lab"]) if v == 1} == findings
        lung = np.asarray(Image.open(out / row["lung_mask"])) > 0
        boxes = json.loads(row["boxes"])
        assert {ds.pathologies[k] for k in sample["pathology_masks"]} == {b["finding"] for b in boxes}
        for k, mask in sample["pathology_masks"].items():
            assert mask.shape == (1, 1024, 1024)
            m = mask[0] > 0
            # exactly one of the finding's true boxes (a reader keeps the last box of a label)
            mine = [b for b in boxes if b["finding"] == ds.pathologies[k]]
            rasters = []
            for b in mine:
                r = np.zeros_like(m)
                x0, y0, x1, y1 = b["box"]
                r[y0:y1, x0:x1] = True
                rasters.append(r)
            hit = [b for b, r in zip(mine, rasters) if np.array_equal(r, m)]
            assert hit, (row["image"], ds.pathologies[k])
            assert lung[m].any()  # every box touches the lung field
            if hit[0]["region"] == "lung":
                assert lung[m].mean() > 0.5  # a lung finding's box lies mostly in the lungs
            regions.add(hit[0]["region"])
            n_masks += 1
    assert regions == {"lung", "heart", "pleura"} and n_masks >= 6


def test_vindr_reader_reads_the_dicom_tree_in_both_photometrics(tmp_path, capsys):
    out = phantom(tmp_path, "--preset", "vindr", "--format", "dicom", "--size", "128", "--n", "12",
                  "--seed", "1")
    capsys.readouterr()
    ds = xrv.datasets.VinDr_Dataset(imgpath=str(out / "train"), csvpath=str(out / "train.csv"),
                                    pathology_masks=True)
    truth = {Path(name).stem: r for name, r in manifest(out).items()}
    assert len(ds) == 12
    photometrics, n_masks = set(), 0
    for i in range(len(ds)):
        sample = ds[i]
        row = truth[ds.csv["image_id"].iloc[i]]
        h, w = int(row["height"]), int(row["width"])
        assert sample["img"].shape == (1, h, w)
        # the reader's image (its [-1024, 1024]) is the site's render, MONOCHROME1 flipped back
        render = np.asarray(Image.open(out / row[f"render_{row['geometry']}"]), dtype=np.float64) / 255
        assert np.abs((sample["img"][0] / 1024 + 1) / 2 - render).max() < 0.5 / 255 + 2**-11
        photometrics.add(pydicom.dcmread(out / row["image"], stop_before_pixels=True).PhotometricInterpretation)
        lung = np.asarray(Image.open(out / row["lung_mask"])) > 0
        boxes = json.loads(row["boxes"])
        for k, mask in sample["pathology_masks"].items():
            assert mask.shape == (1, h, w)
            m = mask[0] > 0
            name = ds.pathologies[k]
            mine = [b for b in boxes if W.vindr_class(b["finding"]).lower() == name.lower()
                    or (name, W.vindr_class(b["finding"])) in (("Effusion", "Pleural effusion"),
                                                               ("Pleural_Thickening", "Pleural thickening"))]
            assert mine, (row["image"], name)
            for b in mine:  # the readers' boxes, in the DICOM's pixels, cover each true box
                x0, y0, x1, y1 = b["box"]
                assert m[y0:y1, x0:x1].mean() > 0.5
                if b["region"] == "lung":
                    assert lung[m].mean() > 0.5
            n_masks += 1
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"} and n_masks >= 4


def test_nlm_reader_reads_both_phantom_sets(tmp_path, capsys):
    out = phantom(tmp_path, "--preset", "nlm", "--size", "64", "--n", "12", "--seed", "0")
    capsys.readouterr()
    for folder, n in ((W.SHENZHEN_DIR, 10), (W.MONTGOMERY_DIR, 2)):
        ds = xrv.datasets.NLMTB_Dataset(imgpath=str(out / folder))
        assert len(ds) == n
        names = sorted(p.name for p in (out / folder / "CXR_png").iterdir())
        assert sorted(ds.labels[:, 0].tolist()) == sorted(float(p[-5]) for p in names)
        assert max(ds[0]["img"].shape[1:]) == 64


def test_nih_boxes_are_in_the_released_frame_and_load_at_the_stored_size(tmp_path, capsys):
    """BBox_List_2017.csv is in the 1024² frame at any --size (as the real file is for a resized
    copy); our loader scales it back to the 128² PNGs, where the truth manifest's boxes are."""
    out = phantom(tmp_path, "--preset", "nih", "--size", "128", "--n", "8", "--seed", "3", "--findings", NIH_FINDINGS)
    capsys.readouterr()
    truth = manifest(out)
    with open(out / W.NIH_BOX_CSV, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert rows and max(float(r[2]) + float(r[4]) for r in rows) > 128  # written in the 1024² frame
    n = 0
    for rec in load_nih(out).records:
        want = sorted((b["finding"], *b["box"]) for b in json.loads(truth[Path(rec.image).name]["boxes"]))
        got = sorted((b.label, b.x0, b.y0, b.x1, b.y1) for b in rec.boxes)
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1:] for g in got] == [pytest.approx(w[1:], abs=1e-3) for w in want]
        n += len(got)
    assert n == len(rows)
