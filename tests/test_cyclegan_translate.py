"""Translating whole dataset trees: same layout, same records, images in their own format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from torch import nn

from builders import write_dicom, write_png, zip_tree
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.preprocess import resize_square
from cxr.data.rewrite import file_sha256
from cxr.engine.checkpoint import CheckpointError, CheckpointManager
from cxr.errors import ConfigError, DataError
from cyclegan_helpers import chest_like, nlm_site, tiny_config
from gan.cyclegan.trainer import CycleGANSteps, build_networks, checkpoint_args
from gan.cyclegan.translate import (
    MANIFEST,
    add_change,
    encode_like,
    from_square,
    load_translator,
    translate_images,
    translate_squares,
    translate_tree,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A checkpoint of fresh (untrained) networks: translation mechanics need no training."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(root / "a", root / "b", root / "cache")
    torch.manual_seed(0)
    g, d = build_networks(cfg)
    modules = {"G_ab": g.g_ab, "G_ba": g.g_ba, "D_a": d.d_a, "D_b": d.d_b}
    CheckpointManager(root / "run").save(1, modules, model_args=checkpoint_args(g, d, cfg))
    return root / "run"


def _roundtrip(path: Path, image: np.ndarray) -> np.ndarray:
    """Encode ``image`` like the file at ``path``, write it beside as ``out_<name>``, decode it."""
    out = path.parent / f"out_{path.name}"
    out.write_bytes(encode_like(path.read_bytes(), str(path), image))
    return load_image(out)


@pytest.mark.parametrize("mode, tol", [("L", 0.5 / 255 + 1e-6), ("I;16", 0.5 / 65535 + 1e-6), ("P", 0.02),
                                       ("RGB", 0.5 / 255 + 1e-6), ("LA", 0.5 / 255 + 1e-6),
                                       ("RGBA", 0.5 / 255 + 1e-6)])
def test_png_written_in_its_source_mode(tmp_path, mode, tol):
    src = write_png(tmp_path / f"src_{mode.replace(';', '')}.png", h=24, w=20, mode=mode)
    target = chest_like(24, 20, seed=1).astype(np.float32)
    out = _roundtrip(src, target)
    assert np.abs(out - target).max() <= tol if mode != "P" else np.abs(out - target).mean() <= tol
    with Image.open(src) as a, Image.open(tmp_path / f"out_{src.name}") as b:
        assert (b.mode, b.size, b.format) == (a.mode, a.size, a.format)
        if mode in ("LA", "RGBA"):
            assert np.array_equal(np.asarray(a)[..., -1], np.asarray(b)[..., -1])  # alpha kept
        if mode == "P":
            assert a.getpalette() == b.getpalette()


def test_jpeg_and_dicom_round_trip(tmp_path):
    target = chest_like(24, 20, seed=2).astype(np.float32)
    jpg = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((24, 20), np.uint8)).save(jpg, quality=90)
    assert np.abs(_roundtrip(jpg, target) - target).mean() < 0.02
    for kw in ({"photometric": "MONOCHROME1", "window": (1500, 2000)},
               {"photometric": "MONOCHROME2", "slope": 2.0, "intercept": -100.0},
               {"photometric": "MONOCHROME2", "bits_stored": 12}):
        dcm = write_dicom(tmp_path / f"x_{len(list(tmp_path.iterdir()))}.dcm", **kw)
        out = _roundtrip(dcm, target)
        assert np.abs(out - target).max() < 2e-3, kw
        ds = pydicom.dcmread(tmp_path / f"out_{dcm.name}")
        assert ds.PhotometricInterpretation == kw["photometric"] and (ds.Rows, ds.Columns) == (24, 20)


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_from_square_undoes_the_preprocessing(fit):
    original = chest_like(40, 28, seed=3).astype(np.float32)
    back = from_square(resize_square(original, 32, fit), original, fit)
    assert back.shape == original.shape
    assert np.abs(back - original).mean() < 0.02


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_add_change_keeps_the_originals_detail(fit):
    """A change computed on the small square lands on the full-size original: its fine detail
    survives (unlike resizing the small translation up), and a constant change is exact."""
    rng = np.random.default_rng(0)
    original = np.clip(chest_like(120, 96, seed=4) + rng.normal(0, 0.05, (120, 96)), 0, 1).astype(np.float32)
    square = resize_square(original, 32, fit)
    darker = np.full_like(square, -0.1)
    out = add_change(darker, original, fit)
    assert out.shape == original.shape
    inside = slice(20, -20)  # away from a crop square's untouched edges
    assert np.allclose(out[inside, inside], np.clip(original[inside, inside] - 0.1, 0, 1), atol=1e-6)
    assert np.array_equal(add_change(np.zeros_like(square), original, fit), original)
    # the old route, the small image resized up, loses the detail
    blown_up = from_square(np.clip(square - 0.1, 0, 1), original, fit)
    truth = np.clip(original - 0.1, 0, 1)
    assert np.abs(out - truth)[inside, inside].mean() < 0.2 * np.abs(blown_up - truth)[inside, inside].mean()


def test_detail_modes_agree_at_the_training_size_and_differ_above_it():
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Tanh())
    same = chest_like(32, 32, seed=5).astype(np.float32)
    keep, none = (translate_images(gen, [same], 32, "pad", d)[0] for d in ("keep", "none"))
    assert np.abs(keep - none).max() < 1e-5
    big = chest_like(96, 80, seed=5).astype(np.float32)
    keep, none = (translate_images(gen, [big], 32, "pad", d)[0] for d in ("keep", "none"))
    assert keep.shape == none.shape == big.shape and np.abs(keep - none).mean() > 1e-3
    with pytest.raises(ConfigError, match="detail must be one of"):
        translate_images(gen, [big], 32, "pad", "sharp")


def test_translate_tree_keeps_layout_records_and_formats(run, tmp_path):
    src = nlm_site(tmp_path / "in", "montgomery", 6, sizes=[(40, 34), (30, 44)])
    translator = load_translator(run, "a2b")
    report = translate_tree(src, tmp_path / "out", translator, batch_size=4)
    assert (report.layout, report.images, report.copied) == ("montgomery", 6, 6 + 12)
    before, after = load_tree(src), load_tree(tmp_path / "out")
    assert after.layout == "montgomery" and len(after) == len(before)
    assert np.array_equal(before.label_matrix(), after.label_matrix())
    for r0, r1 in zip(before.records, after.records):
        assert (r1.patient_id, r1.sex, r1.age, r1.report) == (r0.patient_id, r0.sex, r0.age, r0.report)
        assert Path(r1.masks["lung_image_left"]).read_bytes() == Path(r0.masks["lung_image_left"]).read_bytes()
        with Image.open(r0.image) as a, Image.open(r1.image) as b:
            assert (a.mode, a.size) == (b.mode, b.size)
        assert not np.array_equal(load_image(r0.image), load_image(r1.image))  # really translated
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["direction"] == "a2b" and manifest["images"] == 6 and len(manifest["weights_sha256"]) == 64
    assert manifest["detail"] == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary folder left


def test_translate_zip_and_folder_layouts(run, tmp_path):
    site = nlm_site(tmp_path / "nlm", "shenzhen", 4)
    archive = zip_tree(site.parent, tmp_path / "nlm.zip")
    out = translate_tree(archive, tmp_path / "from_zip", load_translator(run, "b2a"))
    assert load_tree(out.out).layout == "nlm" and len(load_tree(out.out)) == 4
    folders = tmp_path / "classes"
    write_png(folders / "NORMAL" / "p1.png", 30, 26)
    write_png(folders / "TB" / "p2.png", 26, 30, mode="I;16")
    write_dicom(folders / "TB" / "p3.dcm", 28, 28)
    res = translate_tree(folders, tmp_path / "classes_out", load_translator(run, "a2b"))
    a, b = load_tree(folders), load_tree(res.out)
    assert (a.layout, len(a), a.label_names) == (b.layout, len(b), b.label_names)
    assert np.array_equal(a.label_matrix(), b.label_matrix())


def test_bad_outputs_and_failures_leave_nothing(run, tmp_path):
    src = nlm_site(tmp_path / "in", "montgomery", 3)
    translator = load_translator(run, "a2b")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        translate_tree(src, busy, translator)
    with pytest.raises(DataError, match="outside the input tree"):
        translate_tree(src, src / "out", translator)
    # A corrupt image (the Shenzhen loader lists it without decoding) is found only while
    # translating, after other files were written: no output and no temporary folder remain.
    sz = nlm_site(tmp_path / "in", "shenzhen", 5)
    (sz / "CXR_png" / "CHNCXR_0004_1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DataError, match="CHNCXR_0004_1.png: not an image file"):
        translate_tree(sz, tmp_path / "out", translator, batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "in"]


def test_checkpoint_of_another_model_is_a_clear_error(run, tmp_path):
    other = tmp_path / "other"
    CheckpointManager(other).save(1, {"classifier": nn.Linear(3, 2)}, model_args={"classifier": {"name": "linear"}})
    with pytest.raises(CheckpointError, match="no weights for module 'G_ab'.*holds: classifier"):
        load_translator(other, "a2b")
    with pytest.raises(ConfigError, match="direction"):
        load_translator(run, "b2c")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_translator(tmp_path / "missing", "a2b")


def test_weight_average_is_applied_when_the_run_kept_one(run, tmp_path):
    cfg = tiny_config(tmp_path / "a", tmp_path / "b", tmp_path / "cache", "train.ema=0.9")
    steps = CycleGANSteps(cfg)
    torch.manual_seed(1)
    for i in range(3):
        steps.step(torch.rand(1, 1, 32, 32) * 2 - 1, torch.rand(1, 1, 32, 32) * 2 - 1, i)
    ema_run = tmp_path / "ema_run"
    CheckpointManager(ema_run).save(3, steps.modules(), model_args=steps.model_args())
    x = torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32)
    auto, raw = load_translator(ema_run, "a2b"), load_translator(ema_run, "a2b", weights="raw")
    assert (auto.module, raw.module) == ("G_ab_ema", "G_ab")
    assert auto.model_args["ema_decay"] == 0.9
    with torch.no_grad():
        assert torch.allclose(auto.squares(x), translate_squares(steps.ema["G_ab"].module.eval(), x))
        assert torch.allclose(raw.squares(x), translate_squares(steps.g.g_ab.eval(), x))
    assert not torch.allclose(auto.squares(x), raw.squares(x), atol=1e-4)
    assert load_translator(ema_run, "b2a", weights="ema").module == "G_ba_ema"
    # A run without an average: auto falls back to the trained weights; ema is a clear error.
    assert load_translator(run, "a2b").module == "G_ab"
    with pytest.raises(CheckpointError, match="no weight average 'G_ab_ema'"):
        load_translator(run, "a2b", weights="ema")
    with pytest.raises(ConfigError, match="--weights"):
        load_translator(run, "a2b", weights="best")
    # The tree's manifest names the module applied and hashes its weights.
    src = nlm_site(tmp_path / "in", "montgomery", 2)
    translate_tree(src, tmp_path / "out", auto)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["module"] == "G_ab_ema"
    assert manifest["weights_sha256"] == file_sha256(auto.checkpoint / "G_ab_ema.safetensors")
