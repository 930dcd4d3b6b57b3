"""DICOM in and out: the loaders read the header, harmonize and translate write derived images.

Every DICOM here is written by the test (pydicom): MONOCHROME1 and MONOCHROME2, 12 to 16 bits
stored, with and without a VOI window and a modality rescale, uncompressed and in the
compressed transfer syntaxes the reader decodes (RLE, JPEG 2000, JPEG baseline, deflate) and
the big-endian and implicit-VR ones.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom import uid
from pydicom.encaps import encapsulate

from builders import write_dicom, write_png, zip_tree
from cxr.cli.main import main
from cxr.data.dicom import parse_age, read_header
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.rewrite import file_sha256
from cxr.data.splits import split_records
from cxr.engine.checkpoint import CheckpointManager
from cyclegan_helpers import tiny_config
from gan.cyclegan.trainer import build_networks, checkpoint_args
from gan.cyclegan.translate import MANIFEST as TRANSLATION_MANIFEST
from gan.cyclegan.translate import load_translator, translate_tree
from harmonize.trees import MANIFEST as HARMONIZATION_MANIFEST
from harmonize.trees import harmonize_tree

# (photometric, bits stored, VOI window as (centre, width) of stored values, rescale slope/intercept)
FILMS = [
    ("MONOCHROME1", 12, None, (1.0, 0.0)),
    ("MONOCHROME2", 12, (2048, 1024), (1.0, 0.0)),
    ("MONOCHROME1", 14, (8192, 12000), (2.0, -1000.0)),
    ("MONOCHROME2", 15, None, (1.0, -1024.0)),
    ("MONOCHROME1", 16, (32768, 65536), (1.0, 0.0)),
    ("MONOCHROME2", 16, None, (0.5, 10.0)),
]


def film(path: Path, photometric: str, bits: int, window, rescale, seed: int = 0, **header) -> Path:
    """One of :data:`FILMS` as a DICOM file; a window is given in rescaled units, as DICOM's is."""
    slope, intercept = rescale
    if window is not None:
        window = (window[0] * slope + intercept, window[1] * slope)
    return write_dicom(path, 24, 20, bits_stored=bits, photometric=photometric, slope=slope,
                       intercept=intercept, window=window, seed=seed, **header)


# ----------------------------------------------------------------------------------------------
# Headers in


@pytest.mark.parametrize("text, years", [("045Y", 45.0), ("006M", 0.5), ("010D", 10 / 365.25),
                                         ("002W", 14 / 365.25), ("45", 45.0), ("", None), ("old", None)])
def test_dicom_age_strings(text, years):
    assert parse_age(text) == (None if years is None else pytest.approx(years))


def test_header_gives_patient_sex_age_view_spacing_and_size(tmp_path):
    path = write_dicom(tmp_path / "RG1.dcm", 24, 20, PatientID="9RG1", PatientSex="F", PatientAge="006M",
                       ViewPosition="PA", PixelSpacing=[0.15, 0.14])
    h = read_header(path)
    assert (h.patient_id, h.sex, h.age, h.view, h.size) == ("9RG1", "F", 0.5, "PA", (20, 24))
    assert h.pixel_spacing == (0.14, 0.15)  # (x, y): DICOM writes row spacing first
    # No PixelSpacing: the detector's ImagerPixelSpacing; an empty PatientID is no id.
    path = write_dicom(tmp_path / "b.dcm", PatientID="", ImagerPixelSpacing=[0.2, 0.1], ViewPosition="RL")
    h = read_header(path)
    assert (h.patient_id, h.pixel_spacing, h.view, h.view_position, h.sex, h.age) == (
        None, (0.1, 0.2), None, "RL", None, None)


def test_folder_loader_reads_the_headers_and_falls_back_to_the_name_once(tmp_path, capsys):
    root = tmp_path / "cr"
    for i, (photometric, bits, window, rescale) in enumerate(FILMS):
        # One patient's two films, named differently: frontal and a repeat.
        film(root / ("Tuberculosis" if i % 2 else "Normal") / f"RG{i}.dcm", photometric, bits, window, rescale,
             seed=i, PatientID=f"9RG{i}", PatientSex="MF"[i % 2], PatientAge=f"0{40 + i}Y", ViewPosition="PA",
             PixelSpacing=[0.15, 0.15])
        film(root / ("Tuberculosis" if i % 2 else "Normal") / f"repeat_{i}.dcm", photometric, bits, window,
             rescale, seed=i + 10, PatientID=f"9RG{i}", ViewPosition="AP")
    write_dicom(root / "Normal" / "anon1.dcm", PatientID=None)
    write_dicom(root / "Normal" / "anon2.dcm", PatientID="  ")
    write_png(root / "Normal" / "plain.png")
    ds = load_tree(root)
    assert ds.layout == "folders" and len(ds) == 15
    by_name = {Path(r.image).name: r for r in ds.records}
    r = by_name["RG3.dcm"]
    assert (r.patient_id, r.sex, r.age, r.view, r.pixel_spacing, r.original_size) == (
        "9RG3", "F", 43.0, "PA", (0.15, 0.15), (20, 24))
    assert by_name["repeat_3.dcm"].patient_id == "9RG3" and by_name["repeat_3.dcm"].view == "AP"
    assert by_name["repeat_3.dcm"].sex is None and by_name["repeat_3.dcm"].age is None
    assert (by_name["anon1.dcm"].patient_id, by_name["anon2.dcm"].patient_id) == ("anon1", "anon2")
    assert by_name["plain.png"].patient_id == "plain" and by_name["plain.png"].original_size is None
    notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert notes == [f"cxr: note: {root}: 2 of 14 DICOM files have no PatientID; "
                     "their patient id is taken from the file name"]
    # Every film decodes as the header says (VOI window, rescale, MONOCHROME1 inverted).
    for i, (photometric, bits, window, rescale) in enumerate(FILMS):
        raw = pydicom.dcmread(by_name[f"RG{i}.dcm"].image).pixel_array.astype(np.float64)
        lo, hi = (0.0, 2.0**bits - 1) if window is None else (window[0] - window[1] / 2, window[0] + window[1] / 2)
        expect = np.clip((raw - lo) / (hi - lo), 0, 1)
        expect = 1 - expect if photometric == "MONOCHROME1" else expect
        np.testing.assert_allclose(load_image(by_name[f"RG{i}.dcm"].image), expect, atol=1e-5)


def test_one_patients_films_land_in_one_split(tmp_path):
    root = tmp_path / "tree"
    for i in range(12):
        for name in (f"film_{i:02d}a", f"other_name_{i:02d}"):
            write_dicom(root / ("Tuberculosis" if i % 3 == 0 else "Normal") / f"{name}.dcm",
                        PatientID=f"PAT{i:02d}", seed=i)
    records = load_tree(root).records
    assert len({r.patient_id for r in records}) == 12
    for seed in range(5):
        splits = split_records(records, seed=seed)
        where = {}
        for split, recs in splits.items():
            for r in recs:
                where.setdefault(r.patient_id, set()).add(split)
        assert all(len(s) == 1 for s in where.values()) and sum(map(len, splits.values())) == 24


def test_headers_are_read_from_a_zip_archive(tmp_path):
    write_dicom(tmp_path / "tree" / "Normal" / "a.dcm", PatientID="Z1", PatientSex="M", PatientAge="010D")
    write_dicom(tmp_path / "tree" / "Tuberculosis" / "b.dcm", PatientID="Z1", ViewPosition="LATERAL")
    records = load_tree(zip_tree(tmp_path / "tree", tmp_path / "tree.zip")).records
    assert [(r.patient_id, r.sex, r.view) for r in records] == [("Z1", "M", None), ("Z1", None, "LL")]
    assert records[0].age == pytest.approx(10 / 365.25) and "!/" in records[0].image


def test_vindr_reads_the_header_and_says_when_it_falls_back(tmp_path, capsys):
    from test_vindr import A, B, C, dicom_tree

    dicom_tree(tmp_path)
    for image_id, header in ((A, {"PatientID": "VN-7", "PatientSex": "M", "PatientAge": "061Y"}),
                             (B, {"PatientID": "VN-7"}), (C, {"PatientID": None})):
        path = tmp_path / "train" / f"{image_id}.dicom"
        ds = pydicom.dcmread(path)
        for key, value in header.items():
            setattr(ds, key, value) if value is not None else delattr(ds, key)
        ds.save_as(path)
    capsys.readouterr()
    recs = {Path(r.image).stem: r for r in load_tree(tmp_path).records}
    assert [recs[i].patient_id for i in (A, B, C)] == ["VN-7", "VN-7", C]
    assert (recs[A].sex, recs[A].age, recs[A].original_size) == ("M", 61.0, (20, 24))
    assert capsys.readouterr().err.splitlines() == [
        f"cxr: note: {tmp_path}: 1 of 3 DICOM files have no PatientID; their patient id is the image id "
        "(the file name)",
        f"cxr: note: {tmp_path}: all 2 DICOM files with a PatientID share 'VN-7' (one patient: they fall "
        "into one split)"]


def test_inspect_reports_patients_from_headers_and_pixelless_dicoms(tmp_path, capsys):
    root = tmp_path / "tree"
    for i in range(3):
        write_dicom(root / "Normal" / f"{i}_pa.dcm", PatientID=f"P{i}")
        write_dicom(root / "Normal" / f"{i}_repeat.dcm", PatientID=f"P{i}")
    assert main(["datasets", "inspect", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["patients"], summary["max_images_per_patient"]) == (6, 3, 2)
    # A DICOM without pixels (and one without even Rows/Columns): a problem line naming each.
    write_dicom(root / "Normal" / "nopix.dcm", pixels=False)
    write_dicom(root / "Normal" / "header_only.dcm", pixels=False, Rows=None, Columns=None)
    assert main(["datasets", "inspect", str(root)]) == 1
    out, err = capsys.readouterr()
    assert f"{root / 'Normal' / 'nopix.dcm'}: DICOM file has no pixel data" in out
    assert f"{root / 'Normal' / 'header_only.dcm'}: DICOM file has no pixel data" in out
    assert "AttributeError" not in out + err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# Derived images out


def _rle(ds: pydicom.Dataset) -> None:
    ds.compress(uid.RLELossless)


def _encapsulated(ds: pydicom.Dataset, frame: bytes, syntax: str) -> None:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax


def _j2k(ds: pydicom.Dataset) -> None:
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint16)).save(buf, format="JPEG2000", no_jp2=True)
    _encapsulated(ds, buf.getvalue(), uid.JPEG2000Lossless)


def _jpeg8(ds: pydicom.Dataset) -> None:
    arr = (ds.pixel_array >> (int(ds.BitsStored) - 8)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for key in ("WindowCenter", "WindowWidth"):
        if key in ds:
            delattr(ds, key)
    _encapsulated(ds, buf.getvalue(), uid.JPEGBaseline8Bit)


def _deflated(ds: pydicom.Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian


SYNTAXES = {"explicit": None, "rle": _rle, "j2k": _j2k, "jpeg8": _jpeg8, "deflated": _deflated,
            "implicit": uid.ImplicitVRLittleEndian, "bigendian": uid.ExplicitVRBigEndian}


def recode(path: Path, syntax: str) -> Path:
    """Re-encode the DICOM at ``path`` in one of :data:`SYNTAXES`."""
    how = SYNTAXES[syntax]
    ds = pydicom.dcmread(path)
    if how is None:
        return path
    if callable(how):
        how(ds)
        ds.save_as(path)
    elif how == uid.ExplicitVRBigEndian:
        ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = how
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.file_meta.TransferSyntaxUID = how
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, force_encoding=True)
    return path


def dicom_tree(root: Path) -> dict[str, Path]:
    """A folder tree of one film per transfer syntax, cycling through :data:`FILMS`."""
    paths = {}
    for i, syntax in enumerate(SYNTAXES):
        photometric, bits, window, rescale = FILMS[i % len(FILMS)]
        path = film(root / ("Normal", "Tuberculosis")[i % 2] / f"{syntax}.dcm", photometric, bits, window, rescale,
                    seed=i, PatientID=f"P{i}", SeriesInstanceUID=uid.generate_uid(),
                    ImageType=["ORIGINAL", "PRIMARY", "POST_PROCESSED", "RT"])
        paths[syntax] = recode(path, syntax)
    return paths


def check_derived(src: dict[str, Path], out: Path, description: str) -> str:
    """Every written DICOM is a derived image of its source; returns the run's series UID."""
    series = set()
    for syntax, path in src.items():
        before = pydicom.dcmread(path)
        written = out / path.parent.name / path.name
        after = pydicom.dcmread(written)  # a proper Part 10 file: preamble, DICM, file meta
        assert after.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian, syntax
        assert not after.file_meta.TransferSyntaxUID.is_compressed
        assert len(after.PixelData) == after.Rows * after.Columns * after.BitsAllocated // 8
        assert after.pixel_array.shape == (24, 20) and load_image(written).shape == (24, 20)
        assert after.SOPInstanceUID != before.SOPInstanceUID
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.file_meta.MediaStorageSOPClassUID == after.SOPClassUID == before.SOPClassUID
        assert after.SeriesInstanceUID != before.SeriesInstanceUID
        series.add(after.SeriesInstanceUID)
        assert list(after.ImageType) == ["DERIVED", "SECONDARY", "POST_PROCESSED", "RT"]
        assert after.DerivationDescription == description
        (source,) = after.SourceImageSequence
        assert source.ReferencedSOPClassUID == before.SOPClassUID
        assert source.ReferencedSOPInstanceUID == before.SOPInstanceUID
        assert (after.PatientID, after.BitsStored, after.PhotometricInterpretation) == (
            before.PatientID, before.BitsStored, before.PhotometricInterpretation)
        assert after.get("LossyImageCompression") == ("01" if syntax == "jpeg8" else None)
    assert len(series) == 1
    return series.pop()


def test_harmonized_dicoms_are_derived_images_of_one_new_series(tmp_path):
    src = dicom_tree(tmp_path / "cr")
    reference = tmp_path / "ref"
    for i in range(8):
        write_png(reference / ("Normal", "Tuberculosis")[i % 2] / f"r{i}.png", 24, 20, seed=i)
    harmonize_tree(tmp_path / "cr", tmp_path / "out", reference)
    series = check_derived(src, tmp_path / "out", f"cxr harmonize histogram, reference {reference}")
    assert json.loads((tmp_path / "out" / HARMONIZATION_MANIFEST).read_text())["dicom_series_uid"] == series
    # The harmonized pixels are what was written: the loader reads the matched images back.
    for path in src.values():
        assert np.abs(load_image(tmp_path / "out" / path.parent.name / path.name) - load_image(path)).max() > 0.01
    harmonize_tree(tmp_path / "cr", tmp_path / "again", reference)  # another run, another series
    assert check_derived(src, tmp_path / "again", f"cxr harmonize histogram, reference {reference}") != series


def test_translated_dicoms_name_the_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "a", tmp_path / "b", tmp_path / "cache")
    torch.manual_seed(0)
    g, d = build_networks(cfg)
    run = tmp_path / "run"
    CheckpointManager(run).save(1, {"G_ab": g.g_ab, "G_ba": g.g_ba, "D_a": d.d_a, "D_b": d.d_b},
                                model_args=checkpoint_args(g, d, cfg))
    src = {k: v for k, v in dicom_tree(tmp_path / "cr").items() if k in ("explicit", "rle", "jpeg8")}
    for path in set((tmp_path / "cr").rglob("*.dcm")) - set(src.values()):
        path.unlink()
    translator = load_translator(run, "a2b")
    translate_tree(tmp_path / "cr", tmp_path / "out", translator)
    sha = file_sha256(translator.checkpoint / f"{translator.module}.safetensors")
    manifest = json.loads((tmp_path / "out" / TRANSLATION_MANIFEST).read_text())
    assert manifest["weights_sha256"] == sha
    series = check_derived(src, tmp_path / "out",
                           f"cxr translate CycleGAN a2b, checkpoint {translator.checkpoint} sha256 {sha[:12]}")
    assert manifest["dicom_series_uid"] == series


# ----------------------------------------------------------------------------------------------
# The preview of a full-range film


def test_preview_of_a_full_range_cr_is_windowed_and_says_so(tmp_path, capsys):
    """A MONOCHROME1 CR, 15 bits, its VOI window the whole range: it decodes to 0.24-0.93."""
    path = write_dicom(tmp_path / "cr" / "Normal" / "RG1.dcm", 48, 40, bits_stored=15, photometric="MONOCHROME1",
                       window=(2**14, 2**15), PatientID="9RG1")
    ds = pydicom.dcmread(path)
    ramp = ds.pixel_array.astype(np.float64) / (2**15 - 1)
    ds.PixelData = np.round((0.07 + 0.69 * ramp) * (2**15 - 1)).astype(np.uint16).tobytes()
    ds.save_as(path)
    decoded = load_image(path)
    assert 0.23 < decoded.min() < 0.26 and 0.92 < decoded.max() < 0.94
    sheet = tmp_path / "sheet.png"
    args = ["datasets", "preview", str(tmp_path / "cr"), "--out", str(sheet), "--size", "64", "--fit", "crop"]
    assert main(args) == 0
    assert "window: percentiles 0.5-99.5 of each image stretched to black..white" in capsys.readouterr().out
    with Image.open(sheet) as im:
        assert im.size == (64, 64 + 14)  # one image: a sheet of one tile
        tile = np.asarray(im)[:64]
    assert tile.min() <= 3 and tile.max() >= 252
    assert main(args + ["--no-window"]) == 0
    assert "window: none" in capsys.readouterr().out
    with Image.open(sheet) as im:
        tile = np.asarray(im)[:64]
    assert 0.22 * 255 < tile.min() and tile.max() < 0.95 * 255  # the decoded range, as the trainers see it
    assert main(args + ["--window", "2", "98"]) == 0
    assert "window: percentiles 2-98" in capsys.readouterr().out
    assert main(args + ["--window", "60", "40"]) == 2
    assert "0 <= low < high <= 100" in capsys.readouterr().err
