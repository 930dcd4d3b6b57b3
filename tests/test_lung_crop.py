"""The lung crop (``data.lung_crop``): the box is the mask's box plus its margin, clipped at the
borders; the cache keeps crops apart; trainers read cropped images from the phantom's truth, a
Montgomery ManualMask folder or a segmenter run (boxes predicted once, then cached); images
without a mask keep their whole field, said in one notice; bad sources are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import one_error_line, write_lung_masks
from classifier_helpers import montgomery_tree, shenzhen_tree, tiny_config
from classifiers.data import assemble, load_images
from classifiers.predict import predict_tree
from classifiers.segmenter import LungPredictor, SegmenterConfig
from classifiers.segmenter import train as train_segmenter
from cxr.cli.main import main
from cxr.data import lungcrop
from cxr.data.cache import ImageCache
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.lungcrop import expand_box, lung_boxes, mask_box
from cxr.data.masks import TRUTH_DIR, LungLabels, read_label_mask
from cxr.data.preprocess import Preprocess, apply
from cxr.data.tasks import get_task
from cxr.engine.config import DataConfig, load_config
from cxr.errors import ConfigError
from cxr.phantom import writers
from gan.cyclegan.data import load_domain


def test_box_is_the_masks_box_plus_margin():
    mask = np.zeros((40, 40), bool)
    mask[10:20, 5:25] = True  # rows 10..19, columns 5..24
    assert mask_box(mask) == (10, 5, 10, 20)
    # 10 % of 10 rows = 1 above and below; 10 % of 20 columns = 2 left and right
    assert expand_box(mask_box(mask), 0.1, mask.shape) == (9, 3, 12, 24)
    assert expand_box(mask_box(mask), 0.0, mask.shape) == (10, 5, 10, 20)
    assert expand_box((10, 5, 10, 20), 0.15, (40, 40)) == (8, 2, 14, 26)  # rounded outwards: 1.5 -> 2, 3 -> 3
    assert mask_box(np.zeros((5, 5), bool)) is None


def test_box_is_clipped_at_the_borders():
    mask = np.zeros((40, 30), bool)
    mask[0:10, 20:30] = True  # the top-right corner
    assert expand_box(mask_box(mask), 0.5, mask.shape) == (0, 15, 15, 15)
    assert expand_box((0, 0, 40, 30), 0.2, (40, 30)) == (0, 0, 40, 30)


def test_preprocess_cuts_to_the_box_first():
    rng = np.random.default_rng(0)
    img = rng.random((48, 40)).astype(np.float32)
    pre = Preprocess(size=16)
    box = (5, 7, 30, 20)
    np.testing.assert_array_equal(apply(img, pre, box), apply(img[5:35, 7:27], pre))
    assert not np.array_equal(apply(img, pre, box), apply(img, pre))


def test_cache_keeps_crops_apart(tmp_path):
    montgomery_tree(tmp_path, n=3)
    refs = [r.image for r in load_tree(tmp_path / "MontgomerySet").records]
    cache = ImageCache(tmp_path / "cache", Preprocess(size=16))
    boxes = {refs[0]: (4, 4, 20, 10), refs[1]: None}
    cache.build(refs, workers=1, boxes=boxes)
    cache.build(refs, workers=1)  # the whole images beside them
    cropped, whole = cache.stack(refs, boxes), cache.stack(refs)
    np.testing.assert_allclose(cropped[0], apply(load_image(refs[0]), Preprocess(size=16), (4, 4, 20, 10)), atol=1e-4)
    assert not np.allclose(cropped[0], whole[0])
    np.testing.assert_array_equal(cropped[1:], whole[1:])  # no box: the whole image's entry
    assert len(list(cache.dir.glob("*/*.npy"))) == 4
    assert cache.entry_path(refs[0], (4, 4, 20, 10)).name.endswith("-c4_4_20_10.npy")


def test_montgomery_masks_and_one_notice_for_missing(tmp_path, capsys):
    tree = montgomery_tree(tmp_path, n=6)
    records = load_tree(tree).records
    boxes = lung_boxes(records, "masks", 0.1)
    # builders.write_mask on 32x32: rows 2..29; left lung columns 1..14, right 17..30
    assert boxes[records[0].image] == (0, 0, 32, 32)  # 10 %: 3 rows, 3 columns -> clipped
    assert lung_boxes(records, "masks", 0.0)[records[0].image] == (2, 1, 28, 30)
    assert capsys.readouterr().err == ""
    # A Shenzhen tree has no masks: a ManualMask folder (as `cxr segment` writes) covering 4 of 6.
    sz = shenzhen_tree(tmp_path, n=6)
    sz_records = load_tree(sz).records
    masks = tmp_path / "sz_masks"
    for r in sz_records[2:]:
        write_lung_masks(masks, Path(r.image).stem, 32, 32)
    boxes = lung_boxes(sz_records, str(masks), 0.0)
    assert [boxes[r.image] for r in sz_records] == [None, None] + [(2, 1, 28, 30)] * 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one notice, not one per image
    assert err[0] == (f"cxr: note: data.lung_crop={masks}: no lung mask for 2 of 6 images "
                      f"(first: {sz_records[0].image}); they keep the full image")
    assert lung_boxes(sz_records, "masks", 0.0) == {r.image: None for r in sz_records}
    assert "no lung mask for 6 of 6 images" in capsys.readouterr().err


def test_mask_folder_source_and_bad_sources(tmp_path, capsys):
    tree = montgomery_tree(tmp_path, n=4)
    records = load_tree(tree).records
    assert lung_boxes(records, str(tree), 0.0) == lung_boxes(records, "masks", 0.0)  # a ManualMask folder
    with pytest.raises(ConfigError, match="no such folder"):
        lung_boxes(records, str(tmp_path / "nowhere"), 0.1)
    with pytest.raises(ConfigError, match="neither a ManualMask"):
        lung_boxes(records, str(tree / "CXR_png"), 0.1)
    with pytest.raises(ConfigError, match="must be >= 0"):
        lung_boxes(records, "masks", -0.1)
    with pytest.raises(ConfigError, match="lung_crop_margin must be >= 0"):
        load_config(DataConfig, None, ["lung_crop_margin=-1"])
    with pytest.raises(ConfigError, match="does not apply to the segmenter"):
        load_config(SegmenterConfig, None, ["data.lung_crop=masks"])
    assert main(["train-classifier", "--task", "tb", "--config", "classifier_tiny", "device=cpu",
                 f"data.train={tree}", f"data.lung_crop={tmp_path / 'nowhere'}",
                 "--run-dir", str(tmp_path / "run")]) != 0
    assert "data.lung_crop" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_truth_folder_name_is_the_phantoms():
    assert TRUTH_DIR == writers.TRUTH_DIR


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lungcrop") / "phantom"
    assert main(["phantom", "--preset", "nlm", "--out", str(out), "--size", "64", "--n", "40",
                 "--workers", "0", "--seed", "3"]) == 0
    return out


def test_classifier_trains_on_the_phantoms_truth_crops(phantom, tmp_path, capsys):
    """A trainer run with data.lung_crop=masks on a phantom tree: the Shenzhen-like images have
    no masks of their own, so the truth's lungs crop them; each test image is its crop."""
    tree = phantom / "ChinaSet_AllFiles"
    cfg = tiny_config("tb", tree, tmp_path / "cache", "data.lung_crop=masks", "data.lung_crop_margin=0.05",
                      "train.epochs=1", "train.batch_size=4")
    asm = assemble(cfg.data, get_task("tb"))
    sets, _ = load_images(asm, cfg.data, tmp_path / "cache", torch.device("cpu"))
    assert "no lung mask" not in capsys.readouterr().err  # every image has its truth lungs
    truth = LungLabels()
    r = sets["test"].records[0]
    labels = read_label_mask(truth.truth_file(r.image))
    box = expand_box(mask_box(labels != 0), 0.05, labels.shape)
    assert box != (0, 0, *labels.shape)
    expected = apply(load_image(r.image), Preprocess(size=32), box)
    np.testing.assert_allclose(sets["test"].images[0, 0].float().numpy(), expected, atol=2e-3)
    rc = main(["train-classifier", "--task", "tb", "--config", "classifier_tiny", "device=cpu", "data.size=32",
               f"data.train={tree}", "data.lung_crop=masks", "train.epochs=1", "eval.n_boot=10",
               f"data.cache_dir={tmp_path / 'cache2'}", "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    cached = list((tmp_path / "cache2").glob("*/*/*.npy"))
    assert cached and all("-c" in p.name for p in cached)
    # cxr predict repeats the crop the checkpoint declares
    report = predict_tree(tmp_path / "run", tree, tmp_path / "preds.csv", cache_dir=tmp_path / "cache3")
    assert report.n == 33
    predicted = list((tmp_path / "cache3").glob("*/*/*.npy"))
    assert len(predicted) == 33 and all("-c" in p.name for p in predicted)


def test_gan_domain_reads_crops_and_says_missing_once(phantom, tmp_path, capsys):
    """The GANs' loader (CycleGAN, StyleGAN2): a phantom copy whose truth lost two lung files."""
    copy = tmp_path / "phantom"
    shutil.copytree(phantom, copy)
    manifest = copy / TRUTH_DIR / "manifest.csv"
    lines = manifest.read_text().splitlines()
    kept = [ln for ln in lines if ",shenzhen," not in ln]
    dropped = [ln for ln in lines if ",shenzhen," in ln]
    manifest.write_text("\n".join(kept + dropped[2:]) + "\n")
    cfg = load_config(DataConfig, None, ["size=32", "lung_crop=masks", "split=all", "decode_workers=1"])
    capsys.readouterr()
    dom = load_domain("a", copy / "ChinaSet_AllFiles", None, cfg, tmp_path / "cache", torch.device("cpu"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no lung mask for 2 of {len(dom)} images" in err[0]
    whole = load_domain("a", copy / "ChinaSet_AllFiles", None, load_config(DataConfig, None, ["size=32", "split=all"]),
                        tmp_path / "cache", torch.device("cpu"))
    same = [bool(torch.equal(a, b)) for a, b in zip(dom.images, whole.images)]
    assert sum(same) == 2  # exactly the two without a mask are whole


def test_segmenter_run_as_source_predicts_once(phantom, tmp_path):
    cfg = load_config(SegmenterConfig, None, [f"data.train={phantom / 'MontgomerySet'}", "data.size=32", "device=cpu",
                                              "model.depth=2", "model.width=4", "train.epochs=2", "train.batch_size=4",
                                              "augment.enabled=false"])
    run = train_segmenter(cfg, tmp_path / "seg").run_dir
    records = load_tree(phantom / "ChinaSet_AllFiles").records[:6]
    cache = ImageCache(tmp_path / "cache", Preprocess(size=32))
    boxes = lung_boxes(records, str(run), 0.1, tmp_path / "cache", cache.content_hash)
    stores = list((tmp_path / "cache" / "lung_boxes").glob("*.json"))
    assert len(stores) == 1 and len(json.loads(stores[0].read_text())) == 6
    for r in records:  # a box inside the image, or None where nothing was found
        b = boxes[r.image]
        h, w = load_image(r.image).shape
        assert b is None or (b[0] >= 0 and b[1] >= 0 and b[0] + b[2] <= h and b[1] + b[3] <= w)
    saved = list(lungcrop._PREDICTORS)
    lungcrop._PREDICTORS[:] = [(d, _NoPrediction) for d, _ in saved]  # a second call must not predict
    try:
        assert lung_boxes(records, str(run), 0.1, tmp_path / "cache", cache.content_hash) == boxes
    finally:
        lungcrop._PREDICTORS[:] = saved


class _NoPrediction:
    """The run's predictor with its key, refusing to predict."""

    def __init__(self, run: Path):
        self.key = LungPredictor(run).key

    def __call__(self, img: np.ndarray) -> np.ndarray:
        raise AssertionError("predicted again instead of reading the cached boxes")
