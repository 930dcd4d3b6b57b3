"""Phantom writers and generation: exact real layouts read back by the real loaders, paired
truth, byte-identical output for a seed whatever the worker count, atomic refusal, the CLI.

Most tests use a toy renderer (hand-made projections) so they exercise the writers and the
orchestration in well under a second per tree; the CLI test at the end runs the CT renderer.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from builders import write_toy_ct
from cxr.cli.main import main
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.masks import load_lung_mask
from cxr.data.record import NINE, VINDR
from cxr.data.sources.nlm import parse_montgomery_reading, parse_shenzhen_reading
from cxr.errors import CxrError
from cxr.phantom import writers as W
from cxr.phantom.generate import PRESET_FINDINGS, PhantomConfig, generate, nih_patients, split_counts
from cxr.phantom.types import Subject
from test_phantom_chains import toy_projection


class ToyBackend:
    """Subjects drawn like the real sampler (per index, from the seed), toy projections."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at

    def load(self):
        return "toy anatomy"

    def subjects(self, requests, seed, difficulty, allowed):
        out = []
        for r in requests:
            rng = np.random.default_rng([seed, r.index])
            if r.mode == "normal":
                findings: tuple[str, ...] = ()
            elif r.mode == "tb":
                findings = ("Tuberculosis",)
            elif r.mode.startswith("nine:"):
                findings = (r.mode[5:],)
            else:
                pool = [f for f in PRESET_FINDINGS[r.mode] if allowed is None or f in allowed]
                k = int(rng.integers(0, 3))
                findings = tuple(sorted(rng.choice(pool, size=min(k, len(pool)), replace=False)))
            out.append(Subject(f"S{r.index:06d}", int(rng.integers(2**31)), float(rng.integers(18, 80)),
                               "M" if rng.random() < 0.5 else "F", "PA", findings, difficulty))
        return out

    def render(self, subject, anatomy, size):
        assert anatomy == "toy anatomy"
        if self.fail_at is not None and subject.subject_id == f"S{self.fail_at:06d}":
            raise RuntimeError("renderer crashed")
        return toy_projection(size, seed=subject.seed, findings=subject.findings, sid=subject.subject_id)


def run_toy(tmp_path: Path, preset: str, name: str = "out", **kw) -> tuple[Path, object]:
    cfg = PhantomConfig(preset=preset, out=tmp_path / name, size=kw.pop("size", 48),
                        n=kw.pop("n", 12), workers=kw.pop("workers", 1), **kw)
    return cfg.out, generate(cfg, backend=ToyBackend())


def tree_bytes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def read_manifest(root: Path) -> list[dict[str, str]]:
    with open(root / W.TRUTH_DIR / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- pixels and files -----------------------------------------------------------------------

def test_png_modes_round_trip_and_are_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    img = np.round(rng.random((20, 30)) * 4095) / 4095
    for mode in ("L", "P"):
        data = W.image_png(img, 12, 8, mode)
        assert data == W.image_png(img, 12, 8, mode)
        assert b"tIME" not in data
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == mode and im.size == (30, 20)
        path = tmp_path / f"x_{mode}.png"
        path.write_bytes(data)
        assert np.array_equal(np.round(load_image(str(path)) * 255), np.round(img * 255))
    data = W.image_png(img, 12, 16, "P")  # 16 bits: no palette, gray I;16
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "I;16"
        values = np.asarray(im, dtype=np.uint16)
    assert np.array_equal(values, (np.round(img * 4095).astype(np.int64) * 65535 + 2047) // 4095)
    assert len(np.unique(values)) <= 4096


@pytest.mark.parametrize("deflate", [W._deflate_isal, W._deflate_zlib], ids=["isal", "zlib"])
def test_both_deflates_decode_to_the_same_pixels(monkeypatch, deflate):
    # isal is the default; zlib is the fallback where no isal wheel exists. The bytes differ,
    # the pixels must not.
    rng = np.random.default_rng(1)
    px = np.round(rng.random((33, 47)) * 255).astype(np.uint8)
    px[10:20] = 0  # a run, as in masks and collimation borders
    px16 = np.round(rng.random((33, 47)) * 65535).astype(np.uint16)
    monkeypatch.setattr(W, "deflate", deflate)
    for pixels, mode in ((px, "L"), (px, "P"), (px16, "I;16")):
        with Image.open(io.BytesIO(W.png_bytes(pixels, mode))) as im:
            assert np.array_equal(np.asarray(im), pixels)


@pytest.mark.parametrize("seed", range(12))
def test_readings_parse_back(seed):
    rng = np.random.default_rng(seed)
    sex = "F" if seed % 2 else "M"
    age = float(rng.integers(5, 90))
    proj = toy_projection(48, tb=True)
    for tb in (False, True):
        r = parse_shenzhen_reading(W.shenzhen_reading(sex, age, proj.lesions, proj.lung_mask, tb, rng))
        assert (r.sex, r.age) == (sex, int(age))
        assert ("PTB" in r.report) if tb else (r.report == "normal")
        text = W.montgomery_reading(sex, age, proj.lesions, proj.lung_mask, tb, rng)
        assert text.startswith(f"Patient's Sex: {sex} \nPatient's Age: {int(age):03d}Y\n")
        m = parse_montgomery_reading(text)
        assert (m.sex, m.age) == (sex, int(age))
        assert (m.report == "normal") == (not tb)
    # the toy lesion sits in the image-left lung, i.e. the patient's right upper zone
    assert W.lesion_site(proj.lesions[0], proj.lung_mask) == ("right", "upper")


def test_split_counts_keep_ratio_and_every_class():
    assert split_counts(800, {"a": 336, "b": 326, "c": 58, "d": 80}) == {"a": 336, "b": 326, "c": 58, "d": 80}
    small = split_counts(8, {"a": 336, "b": 326, "c": 58, "d": 80})
    assert sum(small.values()) == 8 and min(small.values()) >= 1
    assert split_counts(9, {c: 1 for c in NINE}) == {c: 1 for c in NINE}


def test_nih_patients_keep_sex_and_rising_age():
    rng = np.random.default_rng(0)
    subjects = [Subject(f"S{i}", i, float(rng.integers(20, 80)), "MF"[i % 2], "PA", ()) for i in range(60)]
    pairs = nih_patients(subjects, np.random.default_rng(1))
    assert len(set(pairs)) == 60
    by_patient: dict[int, list[tuple[int, Subject]]] = {}
    for (pid, follow), s in zip(pairs, subjects):
        by_patient.setdefault(pid, []).append((follow, s))
    assert len(by_patient) < 60
    for items in by_patient.values():
        items.sort(key=lambda t: t[0])
        assert [f for f, _ in items] == list(range(len(items)))
        assert len({s.sex for _, s in items}) == 1
        ages = [s.age for _, s in items]
        assert ages == sorted(ages)


# --- NLM trees ------------------------------------------------------------------------------

def test_nlm_tree_reads_back_with_counts_labels_masks_and_truth(tmp_path):
    out, result = run_toy(tmp_path, "nlm", n=12)
    sz_dir, mg_dir = out / W.SHENZHEN_DIR, out / W.MONTGOMERY_DIR
    sz_names = sorted(p.name for p in (sz_dir / "CXR_png").iterdir())
    mg_names = sorted(p.name for p in (mg_dir / "CXR_png").iterdir())
    # 12 split like 336/326/58/80: 5 TB + 5 normal Shenzhen, 1 TB + 1 normal Montgomery
    assert sz_names == [f"CHNCXR_{i:04d}_{int(i > 5)}.png" for i in range(1, 11)]
    assert mg_names == ["MCUCXR_0001_0.png", "MCUCXR_0002_1.png"]
    assert result.counts == {"shenzhen": {"normal": 5, "Tuberculosis": 5},
                             "montgomery": {"normal": 1, "Tuberculosis": 1}}
    readings = sorted(p.name for p in (sz_dir / "ClinicalReadings").iterdir())
    assert readings == [n[:-4] + ".txt" for n in sz_names]
    for sub in ("leftMask", "rightMask"):
        assert sorted(p.name for p in (mg_dir / "ManualMask" / sub).iterdir()) == mg_names

    ds = load_tree(out)
    assert ds.layout == "nlm" and len(ds) == 12 and not ds.problems
    sites = {}
    for rec in ds.records:
        sites.setdefault(rec.site, []).append(rec)
        name = Path(rec.image).name
        assert rec.labels[0] == float(name[-5])
        assert rec.sex in ("M", "F") and rec.age is not None
    assert len(sites["shenzhen"]) == 10 and len(sites["montgomery"]) == 2
    with Image.open(sz_dir / "CXR_png" / sz_names[0]) as im:
        assert im.mode == "P" and max(im.size) == 48
    with Image.open(mg_dir / "CXR_png" / mg_names[0]) as im:
        assert im.mode == "L" and max(im.size) == 48
    mg = sites["montgomery"][1]
    lung = load_lung_mask(mg)
    assert set(np.unique(lung)) == {0, 1, 2}

    rows = read_manifest(out)
    assert [r["subject_id"] for r in rows] == [f"S{i:06d}" for i in range(12)]
    for r in rows:
        tree_png = (out / r["image"]).read_bytes()
        own = r[f"render_{r['geometry']}"]
        assert (out / own).read_bytes() == tree_png  # the tree image is its site's render
        other = r["render_montgomery" if r["geometry"] == "shenzhen" else "render_shenzhen"]
        with Image.open(out / other) as a, Image.open(out / own) as b:
            assert a.size == b.size  # paired: the same geometry through the other site
        boxes = json.loads(r["boxes"])
        masks = json.loads(r["lesion_masks"])
        assert len(boxes) == len(masks) == len(r["findings"].split("|")) * bool(r["findings"])
        lung = np.asarray(Image.open(out / r["lung_mask"]))
        for b, m in zip(boxes, masks):
            mask = np.asarray(Image.open(out / m)) > 0
            ys, xs = np.nonzero(mask)
            assert b["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert (lung[mask] > 0).mean() > 0.9  # lesions lie in the lung field


def test_same_seed_byte_identical_for_any_worker_count(tmp_path):
    a, _ = run_toy(tmp_path, "nlm", "a", n=10, workers=1)
    b, _ = run_toy(tmp_path, "nlm", "b", n=10, workers=2)
    c, _ = run_toy(tmp_path, "nlm", "c", n=10, workers=1, seed=1)
    files_a, files_b = tree_bytes(a), tree_bytes(b)
    assert files_a == files_b
    assert tree_bytes(c).keys() == files_a.keys() and tree_bytes(c) != files_a
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_sixteen_bit_keeps_acquisition_levels(tmp_path):
    out, _ = run_toy(tmp_path, "nlm", n=4, bit_depth=16)
    for path in (out / W.MONTGOMERY_DIR / "CXR_png").iterdir():
        with Image.open(path) as im:
            assert im.mode == "I;16"
            v = np.asarray(im, dtype=np.float64)
        twelve_bit = (np.arange(4096) * 65535 + 2047) // 4095  # Montgomery-like CR: 12-bit levels
        assert np.isin(v, twelve_bit).all()
        assert len(np.unique(v)) > 256  # more levels than 8 bits hold
    with Image.open(next((out / W.SHENZHEN_DIR / "CXR_png").iterdir())) as im:
        assert im.mode == "I;16"  # no 16-bit palette PNGs
    assert len(load_tree(out)) == 4


# --- other layouts --------------------------------------------------------------------------

def test_nih_tree(tmp_path):
    out, _ = run_toy(tmp_path, "nih", n=16)
    lines = (out / W.NIH_ENTRY_CSV).read_text().splitlines()
    assert lines[0] == W.NIH_ENTRY_HEADER and len(lines) == 17
    box_lines = (out / W.NIH_BOX_CSV).read_text().splitlines()
    assert box_lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    ds = load_tree(out)
    assert ds.layout == "nih" and len(ds) == 16 and not ds.problems
    truth = {Path(r["image"]).name: r for r in read_manifest(out)}
    n_boxes = 0
    for rec in ds.records:
        row = truth[Path(rec.image).name]
        assert set(rec.findings) == set(filter(None, row["findings"].split("|")))
        assert rec.split in ("train", "test")
        assert rec.original_size is not None and max(rec.original_size) >= 2900
        truth_boxes = sorted((b["finding"], tuple(b["box"])) for b in json.loads(row["boxes"]))
        got = sorted((b.label, (round(b.x0), round(b.y0), round(b.x1), round(b.y1))) for b in rec.boxes)
        assert got == truth_boxes
        n_boxes += len(got)
    assert n_boxes > 0
    if any("Infiltration" in r["findings"] for r in truth.values()):
        assert ",Infiltrate," in "\n".join(box_lines)
    train = set((out / "train_val_list.txt").read_text().split())
    test = set((out / "test_list.txt").read_text().split())
    assert len(train) + len(test) == 16 and not train & test
    # NIH's geometry: every PNG square at --size, whatever the site's frame aspect, and the
    # original-size and pixel-spacing columns describe the simulated plate
    settings = json.loads((out / W.TRUTH_DIR / "settings.json").read_text())
    with open(out / W.NIH_ENTRY_CSV, newline="") as f:
        entries = list(csv.reader(f))[1:]
    aspects = set()
    for name, *_, width, height, sx, sy in entries:
        with Image.open(out / "images" / name) as im:
            assert im.size == (48, 48)
        row = truth[name]
        assert (int(row["width"]), int(row["height"])) == (48, 48)
        frames = {(f["width"], f["height"]) for f in settings["chains"][row["geometry"]]["frames"]}
        assert (int(width), int(height)) in frames
        assert float(sx) == float(sy) == round(430 / max(int(width), int(height)), 3)
        aspects.add(int(width) / int(height))
    assert max(aspects) / min(aspects) > 1.1  # portrait and landscape plates, all stored square
    pid = {r.image: r.patient_id for r in ds.records}
    assert not {pid[r.image] for r in ds.records if r.split == "train"} & \
        {pid[r.image] for r in ds.records if r.split == "test"}


def test_vindr_tree(tmp_path):
    out, _ = run_toy(tmp_path, "vindr", n=12)
    header = (out / "train.csv").read_text().splitlines()[0]
    assert header == "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
    ds = load_tree(out)
    assert ds.layout == "vindr" and len(ds) == 12 and not ds.problems
    truth = {Path(r["image"]).stem: r for r in read_manifest(out)}
    for rec in ds.records:
        row = truth[rec.patient_id]
        expected = {W.vindr_class(f) for f in filter(None, row["findings"].split("|"))}
        assert set(rec.findings) == expected
        assert len(rec.extra["readers"]) == 3
        # every reader's box, rescaled to the stored PNG, lies near a true box of its class
        true_boxes = {(W.vindr_class(b["finding"]), tuple(b["box"])) for b in json.loads(row["boxes"])}
        for b in rec.boxes:
            near = [t for lbl, t in true_boxes if lbl == b.label
                    and max(abs(b.x0 - t[0]), abs(b.y0 - t[1]), abs(b.x1 - t[2]), abs(b.y1 - t[3])) < 4]
            assert near, (b, true_boxes)
    assert {r[1] for r in csv.reader(io.StringIO((out / "train.csv").read_text()))} <= set(VINDR) | {
        "No finding", "class_name"}


def test_vindr_dicom_tree_is_the_official_release_layout(tmp_path):
    out, _ = run_toy(tmp_path, "vindr", n=12, image_format="dicom")
    assert sorted(p.suffix for p in (out / "train").iterdir()) == [".dicom"] * 12
    assert not (out / "train_meta.csv").exists()  # the DICOM is the original: nothing to rescale
    ds = load_tree(out)
    assert ds.layout == "vindr" and len(ds) == 12 and not ds.problems
    truth = {Path(r["image"]).stem: r for r in read_manifest(out)}
    settings = json.loads((out / W.TRUTH_DIR / "settings.json").read_text())
    assert settings["format"] == "dicom"
    photometrics, uids = set(), []
    for rec in ds.records:
        row = truth[Path(rec.image).stem]
        assert set(rec.findings) == {W.vindr_class(f) for f in filter(None, row["findings"].split("|"))}
        # boxes in the DICOM's own pixels: each reader's lies near a true box of its class
        true_boxes = {(W.vindr_class(b["finding"]), tuple(b["box"])) for b in json.loads(row["boxes"])}
        for b in rec.boxes:
            assert [t for lbl, t in true_boxes if lbl == b.label
                    and max(abs(b.x0 - t[0]), abs(b.y0 - t[1]), abs(b.x1 - t[2]), abs(b.y1 - t[3])) < 4]
        # the decoded DICOM is the site's render (8-bit truth: within half an 8-bit level)
        image = load_image(rec.image)
        render = np.asarray(Image.open(out / row[f"render_{row['geometry']}"]), dtype=np.float32) / 255
        assert image.shape == render.shape == (int(row["height"]), int(row["width"]))
        assert np.abs(image - render).max() < 0.5 / 255 + 2**-12
        dcm = pydicom.dcmread(rec.image)
        chain = settings["chains"][row["geometry"]]
        assert (dcm.Rows, dcm.Columns) == image.shape and dcm.BitsAllocated == 16
        assert dcm.BitsStored == chain["acquisition_bits"] and dcm.HighBit == dcm.BitsStored - 1
        assert dcm.Modality == ("CR" if row["geometry"] == "montgomery" else "DX")
        assert dcm.PatientID == row["subject_id"] and dcm.PatientSex == row["sex"]
        assert dcm.PatientAge == f"{int(float(row['age'])):03d}Y" and dcm.ViewPosition == row["view"]
        # ... and the loader takes them from the header: the patient links to the truth
        assert (rec.patient_id, rec.sex, rec.age, rec.view) == (row["subject_id"], row["sex"],
                                                                 int(float(row["age"])), row["view"])
        assert rec.original_size == (dcm.Columns, dcm.Rows)
        # the plate's 43 cm long side over the stored pixels; near-square pixels
        row_mm, col_mm = map(float, dcm.PixelSpacing)
        assert max(row_mm * dcm.Rows, col_mm * dcm.Columns) == pytest.approx(430, rel=1e-3)
        assert row_mm == pytest.approx(col_mm, rel=0.03)
        assert dcm.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert dcm.SOPInstanceUID == dcm.file_meta.MediaStorageSOPInstanceUID
        uids += [dcm.SOPInstanceUID, dcm.StudyInstanceUID, dcm.SeriesInstanceUID]
        photometrics.add(dcm.PhotometricInterpretation)
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert len(set(uids)) == 36 and all(pydicom.uid.UID(u).is_valid for u in uids)
    again, _ = run_toy(tmp_path, "vindr", "again", n=12, image_format="dicom", workers=2)
    assert tree_bytes(again) == tree_bytes(out)  # no dates, no random UIDs: the same bytes


def test_nine_tree(tmp_path):
    out, result = run_toy(tmp_path, "nine", n=18)
    assert result.counts["nine"] == {c: 2 for c in NINE}
    ds = load_tree(out)
    assert ds.layout == "nine" and len(ds) == 18 and not ds.problems
    for rec in ds.records:
        folder = Path(rec.image).parent.name
        assert rec.findings == (folder,)
        assert rec.source in ("phantom_shenzhen", "phantom_montgomery")


def test_findings_restrict_what_is_drawn(tmp_path):
    out, result = run_toy(tmp_path, "nine", n=6, findings=("Covid", "Edema"))
    assert result.counts["nine"] == {"No Finding": 2, "Covid": 2, "Edema": 2}
    with pytest.raises(CxrError, match=r"unknown finding 'Covd' for preset nine \(did you mean 'Covid'\?\)"):
        run_toy(tmp_path, "nine", "x", findings=("Covd",))


# --- refusal and atomicity ------------------------------------------------------------------

def test_non_empty_out_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CxrError, match="output folder is not empty"):
        run_toy(tmp_path, "nlm", n=4)
    assert (out / "keep.txt").read_text() == "mine"
    run_toy(tmp_path, "nlm", n=4, overwrite=True)
    assert not (out / "keep.txt").exists() and len(load_tree(out)) == 4


def test_crash_leaves_nothing_half_written(tmp_path):
    cfg = PhantomConfig(preset="nlm", out=tmp_path / "out", size=48, n=6, workers=1)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        generate(cfg, backend=ToyBackend(fail_at=3))
    assert list(tmp_path.iterdir()) == []


def test_anatomy_that_fails_to_load_stops_before_anything_is_written(tmp_path):
    class Unreadable(ToyBackend):
        def load(self):
            raise CxrError("ct.nii.gz: not a NIfTI file")

    cfg = PhantomConfig(preset="nlm", out=tmp_path / "out", size=48, n=6, workers=2)
    with pytest.raises(CxrError, match="not a NIfTI file"):
        generate(cfg, backend=Unreadable())  # loaded on a thread while the plan is drawn
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, message", [
    ({"preset": "nln"}, "unknown preset 'nln' (did you mean 'nlm'?)"),
    ({"size": 0}, "--size must be a positive number of pixels, got 0"),
    ({"n": -3}, "--n must be a positive number of images, got -3"),
    ({"workers": -1}, "--workers must be >= 0 (0: in this process), got -1"),
    ({"difficulty": 1.5}, "--difficulty must be between 0 (easy) and 1 (hard), got 1.5"),
    ({"image_format": "dicom"}, "--format dicom is for the vindr preset (the real release's format); "
                                "preset nlm writes PNGs"),
    ({"image_format": "jpeg"}, "unknown --format 'jpeg'; choose one of png, dicom"),
])
def test_bad_config_is_one_line(tmp_path, kw, message):
    cfg = dict(preset="nlm", out=tmp_path / "o", size=48, n=4)
    cfg.update(kw)
    with pytest.raises(CxrError) as err:
        generate(PhantomConfig(**cfg), backend=ToyBackend())
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_bad_chain_file_names_the_key(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("name: third\nscatter_fractoin: 0.3\n")
    with pytest.raises(CxrError) as err:
        run_toy(tmp_path, "nlm", chain_files=(bad,))
    assert f"{bad}: unknown key 'scatter_fractoin' (did you mean 'scatter_fraction'?)" == str(err.value)


def test_third_site_joins_the_truth_and_mixed_trees(tmp_path):
    site = tmp_path / "bedside.yaml"
    site.write_text("base: montgomery\nname: bedside\ndose: 800\n")
    out, _ = run_toy(tmp_path, "nine", n=18, chain_files=(site,))
    rows = read_manifest(out)
    assert all((out / r["render_bedside"]).is_file() for r in rows)
    assert {r["geometry"] for r in rows} == {"shenzhen", "montgomery", "bedside"}


# --- the command ----------------------------------------------------------------------------

def test_cli_bad_input_exit_2_with_one_line(tmp_path, capsys):
    assert main(["phantom", "--preset", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cxr: error: unknown preset 'nope'") and "\n" not in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert main(["phantom", "--preset", "nlm", "--out", str(full)]) == 2
    assert "output folder is not empty" in capsys.readouterr().err
    assert main(["phantom", "--preset", "nlm", "--out", str(tmp_path / "o"), "--size", "-5"]) == 2
    assert "--size must be a positive" in capsys.readouterr().err


def test_cli_end_to_end_with_the_ct_renderer(tmp_path, capsys):
    pytest.importorskip("cxr.phantom.subjects")
    out = tmp_path / "nlm"
    args = ["phantom", "--preset", "nlm", "--out", str(out), "--size", "48", "--n", "8", "--seed", "3"]
    assert main(args + ["--workers", "1"]) == 0
    assert "wrote 8 images" in capsys.readouterr().out
    ds = load_tree(out)
    assert len(ds) == 8 and not ds.problems
    labels = sorted(float(r.labels[0]) for r in ds.records)
    assert labels.count(1.0) == 4 and labels.count(0.0) == 4
    again = tmp_path / "again"
    assert main(["phantom", "--preset", "nlm", "--out", str(again), "--size", "48", "--n", "8",
                 "--seed", "3", "--workers", "2"]) == 0
    assert tree_bytes(out) == tree_bytes(again)


def test_cli_renders_a_users_own_ct(tmp_path, capsys):
    """--ct/--labels put a user's CT through the same renderer; settings.json names it."""
    ct, lab = write_toy_ct(tmp_path)
    out = tmp_path / "mine"
    args = ["phantom", "--preset", "nlm", "--out", str(out), "--size", "32", "--n", "6",
            "--workers", "1", "--ct", str(ct), "--labels", str(lab)]
    assert main(args) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    ds = load_tree(out)
    assert len(ds) == 6 and not ds.problems
    settings = json.loads((out / W.TRUTH_DIR / "settings.json").read_text())
    assert settings["anatomy"] == str(ct) and settings["labels"] == str(lab)
    assert (settings["preset"], settings["size"], settings["images"]) == ("nlm", 32, 6)
    bundled = tmp_path / "bundled"
    assert main(args[:4] + [str(bundled)] + args[5:11]) == 0
    assert json.loads((bundled / W.TRUTH_DIR / "settings.json").read_text())["anatomy"] == "bundled:chest_ct.npz"
    # A different body: the user's renders are not the bundled CT's.
    first = sorted((out / W.TRUTH_DIR / "shenzhen").iterdir())[0]
    assert first.read_bytes() != (bundled / W.TRUTH_DIR / "shenzhen" / first.name).read_bytes()


def test_settings_record_the_chains_and_not_the_worker_count(tmp_path):
    site = tmp_path / "bedside.yaml"
    site.write_text("base: montgomery\nname: bedside\ndose: 800\n")
    out, _ = run_toy(tmp_path, "nlm", n=4, chain_files=(site,))
    settings = json.loads((out / W.TRUTH_DIR / "settings.json").read_text())
    assert set(settings["chains"]) == {"shenzhen", "montgomery", "bedside"}
    assert settings["chains"]["bedside"]["dose"] == 800
    assert "workers" not in settings and "out" not in settings


@pytest.mark.parametrize("extra, message", [
    (["--ct", "{ct}"], "--ct and --labels go together"),
    (["--structures", "{ct}"], "--structures numbers a user CT's label map"),
    (["--ct", "{missing}", "--labels", "{lab}"], "missing.nii.gz: --ct file not found"),
    (["--ct", "{junk}", "--labels", "{lab}"], "junk.nii.gz: cannot read CT volume as NIfTI"),
    (["--ct", "{ct}", "--labels", "{short}"], "label map shape (48, 40, 30) differs from the CT's"),
])
def test_cli_bad_user_ct_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    ct, lab = write_toy_ct(tmp_path)
    (tmp_path / "short").mkdir()
    _, short = write_toy_ct(tmp_path / "short", label_shape=(48, 40, 30))
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti at all")
    names = {"ct": ct, "lab": lab, "short": short, "junk": junk, "missing": tmp_path / "missing.nii.gz"}
    out = tmp_path / "o"
    args = ["phantom", "--preset", "nlm", "--out", str(out), "--size", "32", "--n", "4", "--workers", "1"]
    assert main(args + [a.format(**names) for a in extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_cli_user_ct_with_its_own_label_numbering(tmp_path):
    """--structures maps a label map numbered otherwise onto the TotalSegmentator names."""
    import nibabel as nib

    ct, lab = write_toy_ct(tmp_path)
    img = nib.load(str(lab))
    ids = np.asarray(img.dataobj)
    renumbered = np.zeros_like(ids)
    for old, new in ((12, 1), (10, 2), (51, 3), (36, 4)):
        renumbered[ids == old] = new
    custom = tmp_path / "custom.nii.gz"
    nib.save(nib.Nifti1Image(renumbered, img.affine), custom)
    table = tmp_path / "structures.csv"
    table.write_text("structure,id\nlung_upper_lobe_right,1\nlung_upper_lobe_left,2\nheart,3\nvertebrae_T8,4\n")
    base = ["phantom", "--preset", "nlm", "--size", "32", "--n", "4", "--workers", "1", "--ct", str(ct)]
    assert main(base + ["--out", str(tmp_path / "a"), "--labels", str(lab)]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--labels", str(custom), "--structures", str(table)]) == 0
    assert tree_bytes(tmp_path / "a", skip=("settings.json",)) == tree_bytes(tmp_path / "b", skip=("settings.json",))
    assert main(base + ["--out", str(tmp_path / "c"), "--labels", str(custom)]) == 2  # read as TotalSegmentator ids


def test_data_errors_cross_process_boundaries_whole():
    import pickle

    from cxr.errors import DataError

    err = pickle.loads(pickle.dumps(DataError("a/b.png", "truncated PNG")))
    assert isinstance(err, DataError) and str(err) == "a/b.png: truncated PNG" and err.where == "a/b.png"
