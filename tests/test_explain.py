"""``cxr explain``: localization scores by hand, a CAM on a planted square, the CLI end to end, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from builders import one_error_line
from classifier_helpers import FAST, montgomery_tree, nih_tree, shenzhen_tree, tiny_config
from classifiers.models import build_classifier
from classifiers.predict import Classifier
from classifiers.trainer import MODULE, checkpoint_args, train
from cxr.cli.main import main
from cxr.configs import shipped_config
from cxr.data.layouts import load_tree
from cxr.data.preprocess import Preprocess, apply
from cxr.data.tasks import get_task
from cxr.engine.checkpoint import CheckpointManager
from cxr.metrics import localization as loc
from eval.localization import (
    METHODS,
    ImageLogits,
    align_map,
    cell_offset,
    crop_slice,
    phantom_pointing_game,
    read_box_csv,
    to_image,
    to_image_grid,
)

TINY = shipped_config("classifier_tiny")
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


# ----------------------------------------------------------------------------------------------
# The scores, by hand


def test_pointing_game_by_hand():
    cam = np.zeros((10, 10))
    cam[2, 3] = 1.0
    assert loc.pointing_score(cam, loc.box_mask(cam.shape, (3, 2, 4, 3))) == 1.0
    assert loc.pointing_score(cam, loc.box_mask(cam.shape, (4, 2, 6, 4))) == 0.0
    cam[7, 7] = 1.0  # a tie: half credit when one of the two peaks is inside
    assert loc.pointing_score(cam, loc.box_mask(cam.shape, (3, 2, 4, 3))) == 0.5
    # a flat map: the share of the image the region covers
    assert loc.pointing_score(np.zeros((4, 5)), loc.box_mask((4, 5), (0, 0, 5, 2))) == pytest.approx(0.5)
    # masks and boxes together are one region
    mask = np.zeros((10, 10), bool)
    mask[7, 7] = True
    assert loc.pointing_score(cam, loc.region_of(cam.shape, [(3, 2, 4, 3)], [mask])) == 1.0


def test_box_mask_takes_pixel_centres():
    m = loc.box_mask((1, 3), (0.4, 0.0, 1.6, 1.0))
    assert m.tolist() == [[True, True, False]]
    assert loc.box_mask((4, 4), (1, 1, 3, 2)).sum() == 2


def test_cam_box_and_iou_by_hand():
    cam = np.full((10, 12), 0.4)
    cam[2:5, 3:7] = 1.0  # the peak's component: x 3..6, y 2..4
    cam[8, 10] = 0.8  # above half the maximum, but not connected to the peak
    assert loc.cam_box(cam, 0.5) == (3.0, 2.0, 7.0, 5.0)
    assert loc.box_iou((3, 2, 7, 5), (3, 2, 7, 5)) == 1.0
    assert loc.box_iou((3, 2, 7, 5), (5, 2, 9, 5)) == pytest.approx(6 / 18)
    assert loc.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert loc.best_iou(cam, [(5, 2, 9, 5), (3, 2, 7, 5)]) == 1.0
    # a lower threshold joins the background: the whole image
    assert loc.cam_box(cam, 0.3) == (0.0, 0.0, 12.0, 10.0)
    # no positive evidence: no box, IoU 0
    assert loc.cam_box(np.zeros((5, 5))) is None and loc.best_iou(np.zeros((5, 5)), [(0, 0, 5, 5)]) == 0.0
    assert loc.mask_box(np.zeros((3, 3), bool)) is None
    assert loc.mask_box(cam == 1.0) == (3.0, 2.0, 7.0, 5.0)


def test_hit_rates_and_summary_by_hand():
    assert loc.hit_rates([0.05, 0.1, 0.3, 0.6]) == {"iou>=0.1": 0.75, "iou>=0.25": 0.5, "iou>=0.5": 0.25}
    s = loc.summarize([1, 0, 0.5, 1], [0.05, 0.1, 0.3, 0.6])
    assert s["n"] == 4 and s["pointing"] == pytest.approx(0.625) and s["mean_iou"] == pytest.approx(0.2625)
    assert s["pointing_lo"] < 0.625 < s["pointing_hi"]
    lo, hi = loc.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)  # the textbook Wilson bound for 0/10
    with pytest.raises(ValueError):
        loc.summarize([1, 0], [0.5])


def test_null_maps_are_fixed_and_fair():
    lungs = loc.null_map((100, 120), "lungs")
    assert lungs.shape == (100, 120) and lungs.max() == pytest.approx(1.0)
    left = loc.box_mask(lungs.shape, (0, 0, 60, 100))
    assert loc.pointing_score(lungs, left) == pytest.approx(0.5)  # one peak per lung, neither favoured
    centre = loc.null_map((100, 120), "centre")
    assert np.unravel_index(np.argmax(centre), centre.shape) in {(49, 59), (49, 60), (50, 59), (50, 60)}
    with pytest.raises(ValueError):
        loc.null_map((4, 4), "nowhere")


# ----------------------------------------------------------------------------------------------
# A CAM on a toy network whose evidence is a bright square


class BrightSquare(nn.Module):
    """Counts bright pixels: ReLU(x - 0.8) after a 3x3 mean, pooled, times 10: the evidence is
    where the image is brighter than 0.8, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 9)
            self.conv.bias.fill_(-0.8)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.head.weight.fill_(10.0)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", list(METHODS))
def test_cam_has_the_image_size_and_peaks_on_the_planted_square(method):
    rng = np.random.default_rng(0)
    image = (0.3 + 0.1 * rng.random((40, 56))).astype(np.float32)  # wider than tall: padded above and below
    image[10:18, 34:42] = 1.0
    model = BrightSquare().eval()
    wrapper = ImageLogits(model)
    x = torch.from_numpy(apply(image, _pre(32)))[None, None]
    cam = METHODS[method](model=wrapper, target_layers=[model.act])
    square = cam(input_tensor=x, targets=None)[0]
    grid = to_image_grid(square, image.shape, "pad")
    assert grid.shape == image.shape
    y, x0 = np.unravel_index(np.argmax(grid), grid.shape)
    assert 10 <= y < 18 and 34 <= x0 < 42
    assert loc.pointing_score(grid, loc.box_mask(grid.shape, (34, 10, 42, 18))) == 1.0
    assert loc.best_iou(grid, [(34, 10, 42, 18)]) >= 0.25


class Strided(nn.Module):
    """Four stride-2 3x3 means (padding 1), as the small CNN downsamples: cell i sits on pixel 16i."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(*[nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False) for _ in range(4)])
        self.act = nn.ReLU()
        self.head = nn.Linear(1, 1)
        with torch.no_grad():
            for conv in self.stages:
                conv.weight.fill_(1 / 9)
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.stages(x)).mean(dim=(2, 3)))


def test_alignment_puts_the_cells_where_the_network_centres_them():
    x = torch.zeros(1, 1, 64, 64)
    x[0, 0, 31:34, 31:34] = 1.0  # centred on pixel 32 = 16 x cell 2
    model = Strided().eval()
    square = METHODS["gradcam"](model=model, target_layers=[model.act])(input_tensor=x, targets=None)[0]
    raw = np.unravel_index(np.argmax(square), square.shape)
    assert all(38 <= v <= 41 for v in raw)  # pytorch-grad-cam's placement: 16 x 2 + 7.5

    def clf(spec: dict) -> Classifier:
        return Classifier(Path("run"), model, get_task("tb"), Preprocess(size=64), None, args={"model": spec})

    offset = cell_offset(clf({"name": "small_cnn"}), "net.features.3", 64 / 4)
    assert offset == 7.5
    aligned = align_map(square, offset)
    assert all(31 <= v <= 33 for v in np.unravel_index(np.argmax(aligned), aligned.shape))
    # the other architectures of the table
    dense = clf({"name": "densenet121"})
    assert cell_offset(dense, "net.features", 32) == 1.5 and cell_offset(dense, "net.features.denseblock3", 16) is None
    fused = clf({"name": "fusion", "backbone": "resnet18"})
    assert cell_offset(fused, "image.net.layer4", 32) == 15.5


def _pre(size: int) -> Preprocess:
    return Preprocess(size=size, fit="pad")


def test_a_lung_crop_is_undone_and_the_rest_stays_zero():
    grid = to_image(np.ones((16, 16), np.float32), (40, 50), "pad", box=(5, 10, 20, 30))
    assert grid.shape == (40, 50)
    assert grid[5:25, 10:40].min() > 0.9 and grid.sum() == pytest.approx(grid[5:25, 10:40].sum())
    assert crop_slice((40, 50), (-3, 45, 10, 20)) == (slice(0, 7), slice(45, 50))  # clipped as apply() cuts
    assert crop_slice((40, 50), None) is None


def test_crop_fit_leaves_the_unseen_edges_at_zero():
    grid = to_image_grid(np.ones((8, 8), np.float32), (8, 16), "crop")
    assert grid.shape == (8, 16)
    assert grid[:, 0].max() == 0.0 and grid[:, 8].min() > 0.9


# ----------------------------------------------------------------------------------------------
# The CLI, end to end, on a tiny tree with a tiny trained classifier

BLOB = (0.3, 0.3, 0.1)  # classifier_helpers.draw's TB mark: centre x, y and scale, as fractions


def _blob_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, s = BLOB
    return (((xx + 0.5) / w - cx) / s) ** 2 + (((yy + 0.5) / h - cy) / s) ** 2 <= 1.0


@pytest.fixture(scope="module")
def tb(tmp_path_factory) -> dict[str, Path]:
    """A Shenzhen-like tree with a phantom-style truth manifest, a box CSV and a trained TB run."""
    root = tmp_path_factory.mktemp("explain")
    tree = shenzhen_tree(root, n=24)
    rows, boxes = [], [BOX_HEADER]
    (root / "phantom_truth" / "lesions").mkdir(parents=True)
    for png in sorted((tree / "CXR_png").glob("*.png")):
        if not png.stem.endswith("_1"):
            rows.append({"image": f"ChinaSet_AllFiles/CXR_png/{png.name}", "lesion_masks": "[]", "boxes": "[]"})
            continue
        h, w = np.asarray(Image.open(png)).shape
        mask = _blob_mask(h, w)
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "phantom_truth" / "lesions" / f"{png.stem}_0.png")
        x0, y0, x1, y1 = (int(v) for v in loc.mask_box(mask))
        rows.append({"image": f"ChinaSet_AllFiles/CXR_png/{png.name}",
                     "lesion_masks": json.dumps([f"phantom_truth/lesions/{png.stem}_0.png"]),
                     "boxes": json.dumps([{"finding": "Tuberculosis", "kind": "nodule", "box": [x0, y0, x1, y1]}])})
        s = 1024 / w  # the NIH release's 1024² frame
        boxes.append(f"{png.name},Infiltrate,{x0 * s:g},{y0 * s:g},{(x1 - x0) * s:g},{(y1 - y0) * s:g},,,")
    with open(root / "phantom_truth" / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "lesion_masks", "boxes"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "boxes.csv").write_text("\n".join(boxes) + "\n")
    run = root / "run"
    assert main(["train-classifier", "--task", "tb", "--config", str(TINY), "--run-dir", str(run), *FAST,
                 f"data.train={tree}", f"data.cache_dir={root / 'cache'}", "train.epochs=3"]) == 0
    return {"root": root, "tree": tree, "run": run, "boxes": root / "boxes.csv"}


def test_explain_writes_maps_overlays_and_scores(tb, tmp_path, capsys):
    out = tmp_path / "cams"
    rc = main(["explain", "--checkpoint", str(tb["run"]), "--in", str(tb["tree"]), "--out", str(out),
               "--truth", str(tb["root"]), "--overlays", "5", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote 24 gradcam map(s) of 24 image(s) and 5 overlay(s)" in text and "null_lungs" in text
    maps = sorted((out / "maps" / "CXR_png").glob("*.npz"))
    assert len(maps) == 24
    with np.load(maps[0]) as z:
        assert list(z) == ["Tuberculosis"] and z["Tuberculosis"].shape == (32, 32)
        assert z["Tuberculosis"].dtype == np.float32
    assert len(list((out / "overlays").rglob("*__Tuberculosis.png"))) == 5
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["truth"] for r in rows} == {"masks"}  # the positives only
    assert all(0.0 <= float(r["pointing"]) <= 1.0 for r in rows)
    doc = json.loads((out / "scores.json").read_text())
    s = doc["summary"]["masks"]["Tuberculosis"]
    assert s["map"]["n"] == 12 and set(s) == {"map", "null_lungs", "null_centre"}
    assert s["map"]["pointing"] == pytest.approx(np.mean([float(r["pointing"]) for r in rows]))
    assert doc["settings"]["target_layer"] == "net.features.3"
    # the blob sits at (0.3, 0.3): in the image-left lung field, where the two-lung null map looks
    assert s["null_lungs"]["pointing"] == pytest.approx(0.5)


def test_explain_against_boxes_in_the_1024_frame_and_scored_only(tb, tmp_path, capsys):
    out = tmp_path / "cams"
    rc = main(["explain", "--checkpoint", str(tb["run"]), "--in", str(tb["tree"]), "--out", str(out),
               "--boxes", str(tb["boxes"]), "--truth", str(tb["root"]), "--scored-only", "--method", "gradcam++"])
    assert rc == 0
    capsys.readouterr()
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(list((out / "maps").rglob("*.npz"))) == 12
    # the CSV's boxes say Infiltration, not in task tb: only the masks are scored (and it is said)
    assert {r["truth"] for r in rows} == {"masks"}
    settings = json.loads((out / "explain.json").read_text())
    assert any("Infiltration" in n for n in settings["notes"])


def test_explain_refuses_a_non_empty_out_without_overwrite(tb, tmp_path, capsys):
    out = tmp_path / "cams"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["explain", "--checkpoint", str(tb["run"]), "--in", str(tb["tree"]), "--out", str(out), "--overlays", "0"]
    assert main(argv) == 2
    assert "not empty" in one_error_line(capsys)
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "maps").is_dir()
    assert not list(tmp_path.glob(".cams*"))  # no temporary folder or claim left behind


def test_another_target_layer_is_taken_and_a_wrong_one_is_one_line(tb, tmp_path, capsys):
    argv = ["explain", "--checkpoint", str(tb["run"]), "--in", str(tb["tree"]), "--overlays", "0"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--target-layer", "net.features.2"]) == 0
    assert "(layer net.features.2)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "explain.json").read_text())["target_layer"] == "net.features.2"
    assert main([*argv, "--out", str(tmp_path / "b"), "--target-layer", "net.nowhere"]) == 2
    err = one_error_line(capsys)
    assert "--target-layer net.nowhere: no such module" in err and "net.features.3" in err


def test_explain_a_class_the_task_lacks_is_one_line(tb, tmp_path, capsys):
    rc = main(["explain", "--checkpoint", str(tb["run"]), "--in", str(tb["tree"]), "--out", str(tmp_path / "o"),
               "--class", "Cardiomegaly"])
    assert rc == 2
    err = one_error_line(capsys)
    assert "--class Cardiomegaly" in err and "'tb'" in err and "Tuberculosis" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("row, expected", [
    ("{name},Nodule,500,500,-10,20,,,", ":2: box with no area"),
    ("{name},Nodule,2000,100,50,50,,,", ":2: box [2000.0, 100.0, 50.0, 50.0] lies wholly outside"),
    ("{name},Nodule,abc,100,50,50,,,", ":2: 'Bbox [x,y,w,h]'"),
    ("{name},Sunburn,100,100,50,50,,,", ":2: unknown finding 'Sunburn'"),
])
def test_bad_boxes_are_one_line_naming_the_row(tb, tmp_path, capsys, row, expected):
    name = sorted((tb["tree"] / "CXR_png").glob("*.png"))[0].name
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{BOX_HEADER}\n{row.format(name=name)}\n")
    rc = main(["explain", "--checkpoint", str(tb["run"]), "--in", str(tb["tree"]), "--out", str(tmp_path / "o"),
               "--boxes", str(bad)])
    assert rc == 2
    err = one_error_line(capsys)
    assert str(bad) in err and expected in err


def test_boxes_reaching_outside_are_clipped_and_said(tb, tmp_path):
    png = sorted((tb["tree"] / "CXR_png").glob("*_1.png"))[0]
    edge = tmp_path / "edge.csv"
    edge.write_text(f"{BOX_HEADER}\n{png.name},Nodule,900,-100,300,400,,,\nnot_here.png,Nodule,1,1,5,5,,,\n")
    notes: list[str] = []
    truth = read_box_csv(edge, load_tree(tb["tree"]).records, notes=notes)
    (boxes,) = [t["Nodule"].boxes for t in truth.values()]
    assert boxes == [(900 * 32 / 1024, 0.0, 32.0, 300 * 32 / 1024)]
    assert any("clipped" in n and f"{edge}:2" in n for n in notes)
    assert any("1 row(s) name images that are not in the tree" in n for n in notes)


def test_truth_that_names_no_image_is_one_line(tb, tmp_path, capsys):
    rc = main(["explain", "--checkpoint", str(tb["run"]), "--in", str(tb["tree"]), "--out", str(tmp_path / "o"),
               "--truth", str(tmp_path)])
    assert rc == 2
    assert "no phantom truth manifest" in one_error_line(capsys)


def test_the_demo_function_returns_the_pointing_rates(tb, tmp_path):
    result = phantom_pointing_game(tb["run"], tb["root"], tmp_path / "demo", n_overlays=3, tree="ChinaSet_AllFiles")
    assert result["n"] == 12 and 0.0 <= result["pointing"] <= 1.0
    assert result["null_pointing"] == pytest.approx(0.5)
    assert len(result["overlays"]) == 3 and all(Path(p).is_file() for p in result["overlays"])


def test_the_demo_function_with_no_lesion_writes_nothing(tb, tmp_path):
    root = tmp_path / "normals"
    tree = shenzhen_tree(root, n=4, positives=False)
    (root / "phantom_truth").mkdir()
    (root / "phantom_truth" / "manifest.csv").write_text(
        "image,lesion_masks,boxes\n" + "".join(f"ChinaSet_AllFiles/CXR_png/{p.name},[],[]\n"
                                               for p in sorted((tree / "CXR_png").glob("*.png"))))
    result = phantom_pointing_game(tb["run"], root, tmp_path / "demo", tree="ChinaSet_AllFiles")
    assert result["n"] == 0 and np.isnan(result["pointing"]) and not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------------------------
# Other checkpoints: fusion through its image branch; metadata only refused


@pytest.fixture(scope="module")
def nih_runs(tmp_path_factory) -> dict[str, Path]:
    """A fusion run trained one epoch, and a metadata-only checkpoint (untrained: it is refused)."""
    root = tmp_path_factory.mktemp("nihruns")
    tree = nih_tree(root / "nih", n=16)
    cfg = tiny_config("nih14", tree, root / "cache", "model.name=fusion",
                      "model.options={backbone: small_cnn, backbone_args: {width: 4}}", "train.epochs=1",
                      "eval.n_boot=5")
    train(cfg, root / "fusion")
    task = get_task("nih14")
    mlp = build_classifier("metadata_mlp", task.num_outputs)
    ckpt = CheckpointManager(root / "mlp").save(1, {MODULE: mlp}, model_args={MODULE: checkpoint_args(mlp, cfg, task)})
    return {"tree": tree, "fusion": root / "fusion", "metadata_mlp": ckpt}


def test_fusion_is_explained_through_its_image_branch(nih_runs, tmp_path, capsys):
    out = tmp_path / "cams"
    assert main(["explain", "--checkpoint", str(nih_runs["fusion"]), "--in", str(nih_runs["tree"]),
                 "--out", str(out), "--class", "Effusion", "--overlays", "1"]) == 0
    assert "layer image.net.features.3" in capsys.readouterr().out
    maps = list((out / "maps").rglob("*.npz"))
    assert len(maps) == 16
    with np.load(maps[0]) as z:
        assert list(z) == ["Effusion"] and z["Effusion"].shape == (32, 32)


def test_a_checkpoint_without_an_image_input_is_one_line(nih_runs, tmp_path, capsys):
    rc = main(["explain", "--checkpoint", str(nih_runs["metadata_mlp"]), "--in", str(nih_runs["tree"]),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "has no image input" in one_error_line(capsys)


def test_a_lung_cropped_run_is_explained_on_its_crops(tmp_path, capsys):
    tree = montgomery_tree(tmp_path / "mc", n=20)
    run = tmp_path / "run"
    assert main(["train-classifier", "--task", "tb", "--config", str(TINY), "--run-dir", str(run), *FAST,
                 f"data.train={tree}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
                 "data.lung_crop=masks"]) == 0
    capsys.readouterr()
    out = tmp_path / "cams"
    assert main(["explain", "--checkpoint", str(run), "--in", str(tree), "--out", str(out), "--overlays", "0"]) == 0
    assert json.loads((out / "explain.json").read_text())["input"]["lung_crop"] == "masks"
    with np.load(sorted((out / "maps").rglob("*.npz"))[0]) as z:
        assert z["Tuberculosis"].shape == (32, 32)
