"""Class activation maps of a trained classifier, and how well they localize findings.

    explain_tree(ExplainOptions(checkpoint=RUN, src=TREE, out=DIR, truth=PHANTOM_ROOT))

For every image of a tree (and each class asked for), a map from pytorch-grad-cam (Grad-CAM,
Grad-CAM++ or Score-CAM) at the layer :data:`TARGET_LAYERS` names for the architecture, taken on
the network's square input and mapped back to the image's own size (the padding cut off, or a
crop's outside left at zero; a checkpoint trained on lung crops is shown each image's lung crop,
as ``cxr predict`` does, and its map is 0 outside it). A fusion model (:class:`classifiers.models.FusionClassifier`) is
explained through its image branch: the logit is the fused head's, with each image's own
metadata held fixed. A metadata-only checkpoint has no image to explain and is refused.

Truth, when given, is scored by :mod:`cxr.metrics.localization` (pointing game, box IoU hit
rates, the fixed null maps): boxes from an NIH ``BBox_List_2017.csv`` (in the release's 1024²
frame, scaled to each image's stored size, as the NIH loader reads them) and the lesion masks
of a phantom's ``phantom_truth/manifest.csv`` (any preset; each lesion's tight box for IoU).

``DIR`` (written into a temporary folder and renamed into place at the end, so a failure leaves
nothing behind):

- ``maps/<image path in the tree>.npz``: one float32 ``(H, W)`` array per explained class
  (key = class name), in [0, 1] (each map min-max scaled by pytorch-grad-cam);
- ``overlays/<image path>__<class>.png``: the image with the map in the jet colours, the truth
  in green and the map's thresholded box in red;
- ``scores.csv`` (one row per scored image, class and truth kind), ``scores.json`` (per class
  and truth kind: the method's scores and the null maps'), ``explain.json`` (settings, notes).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from classifiers.metadata import metadata_matrix
from classifiers.predict import Classifier, load_classifier
from classifiers.trainer import probabilities
from cxr.data.csvutil import line_of, read_table
from cxr.data.image import image_info, load_image
from cxr.data.io import atomic_write, atomic_write_text, split_ref, staged_tree
from cxr.data.layouts import load_tree
from cxr.data.lungcrop import boxes_or_none
from cxr.data.preprocess import apply, fit_geometry
from cxr.data.problems import Problems
from cxr.data.record import NIH14, Sample
from cxr.data.rewrite import check_out
from cxr.data.sources.nih import BOX_ALIASES, BOX_COLUMNS, BOX_FRAME
from cxr.errors import ConfigError, CxrError, DataError
from cxr.metrics import localization as loc

METHODS: dict[str, type] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}

# Where the map is taken, per image architecture: the last convolutional stage, whose cells
# still see a local part of the image (1/16 of the input side for the small CNN, 1/32 for the
# torchvision backbones). A fusion model's layer is its image branch's, under ``image.``.
TARGET_LAYERS: dict[str, str] = {
    "small_cnn": "net.features.3",  # the fourth stride-2 stage (8² at 128²)
    "densenet121": "net.features",  # dense block 4 + norm5 (7² at 224²)
    "resnet18": "net.layer4",  # last residual stage (7² at 224²)
    "resnet50": "net.layer4",
}
# Downsampling by "same"-padded odd kernels of stride 2 (every convolution and max pool of the
# small CNN and the ResNets) centres output cell i on input pixel 2i, so a cell of the stride-S
# map sits on input pixel S·i; pytorch-grad-cam's bilinear upsampling puts it at S·i + (S - 1)/2.
# DenseNet's 2x2 average-pool transitions centre cell i on 2i + 0.5, which leaves 1.5 px at
# net.features (cell m on pixel 32m + 14). Maps are shifted back by this much, up and left.
ALIGNED_STRIDES = ("small_cnn", "resnet18", "resnet50")
TRUTH_KINDS = ("boxes", "masks")
OVERLAY_ALPHA = 0.6  # weight of the image under the colour map


# ----------------------------------------------------------------------------------------------
# The network


class ImageLogits(nn.Module):
    """``x -> logits`` of a classifier; a fusion model sees ``meta`` (set per batch) held fixed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.meta: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "uses_metadata", False):
            meta = self.meta
            if meta is not None and meta.shape[0] == 1 and x.shape[0] > 1:  # Score-CAM's masked copies
                meta = meta.expand(x.shape[0], -1)
            return self.model(x, meta)
        return self.model(x)


def target_layer_name(clf: Classifier) -> str:
    """The module path of the layer the map is taken at (:data:`TARGET_LAYERS`)."""
    spec = clf.args.get("model", {})
    name = spec.get("name")
    if not getattr(clf.model, "uses_image", True):
        raise CxrError(f"{clf.checkpoint}: model {name!r} has no image input (metadata only): nothing to explain")
    if name == "fusion":
        backbone = spec.get("backbone", "small_cnn")
        if backbone not in TARGET_LAYERS:
            raise CxrError(f"{clf.checkpoint}: fusion backbone {backbone!r} has no target layer (known: "
                           f"{', '.join(TARGET_LAYERS)})")
        return f"image.{TARGET_LAYERS[backbone]}"
    if name not in TARGET_LAYERS:
        raise CxrError(f"{clf.checkpoint}: model {name!r} has no target layer (known: {', '.join(TARGET_LAYERS)})")
    return TARGET_LAYERS[name]


def cell_offset(clf: Classifier, layer: str, stride: float) -> float | None:
    """Pixels by which the upsampled map lies below and right of where the network centres its
    cells (see :data:`ALIGNED_STRIDES`); None when not known for this model and layer."""
    spec = clf.args.get("model", {})
    name, prefix = spec.get("name"), ""
    if name == "fusion":
        name, prefix = spec.get("backbone", "small_cnn"), "image."
    if name in ALIGNED_STRIDES:
        return (stride - 1) / 2
    if name == "densenet121" and layer == f"{prefix}net.features":
        return 1.5
    return None


def align_map(square: np.ndarray, offset: float) -> np.ndarray:
    """The map moved ``offset`` pixels up and left (bilinear; edges repeat)."""
    return ndimage.shift(np.asarray(square, dtype=np.float32), (-offset, -offset), order=1, mode="nearest")


def class_index(clf: Classifier, name: str) -> int:
    """Output index of class ``name``; a class the task lacks is one line naming the task's."""
    labels = clf.task.label_names
    if name not in labels:
        raise ConfigError(f"--class {name}: {clf.checkpoint} was trained for task {clf.task.name!r}, whose "
                          f"classes are {', '.join(labels)}")
    return 0 if clf.task.kind == "binary" else labels.index(name)


# ----------------------------------------------------------------------------------------------
# Truth


@dataclass
class Truth:
    """One image's truth for one finding."""

    boxes: list[loc.Box] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)  # lesion mask files (0/255 PNG)


def _key(ref: str | Path) -> str:
    return os.path.normpath(os.path.abspath(str(ref)))


def read_box_csv(path: str | Path, records: Sequence[Sample], frame: int | None = BOX_FRAME,
                 notes: list[str] | None = None) -> dict[str, dict[str, Truth]]:
    """Image key -> finding -> boxes, from an NIH ``BBox_List_2017.csv``, in each image's pixels.

    ``frame``: the square the CSV's coordinates are in (NIH's 1024), scaled to each image's
    stored size; ``None``: already in the stored pixels. A row with a non-number, a negative
    width or height (x_max < x_min), an unknown finding or a box wholly outside its image is
    refused with one line naming the row; a box partly outside is clipped (said in ``notes``).
    Rows naming images that are not in ``records`` are skipped (counted in ``notes``).
    """
    path = Path(path)
    notes = notes if notes is not None else []
    if not path.is_file():
        raise DataError(path, "no such box file (--boxes)")
    raw = read_table(path.read_bytes(), str(path), BOX_COLUMNS, tuple(BOX_COLUMNS))
    by_name: dict[str, Sample] = {}
    for r in records:
        by_name.setdefault(os.path.basename(split_ref(r.image)[1] or r.image), r)
    out: dict[str, dict[str, Truth]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    missing, clipped, first_clip = 0, 0, ""
    for i, row in enumerate(raw.itertuples(index=False)):
        at = f"{path}:{line_of(i)}"
        label = BOX_ALIASES.get(row.finding, row.finding)
        if label not in NIH14:
            raise DataError(at, f"unknown finding {row.finding!r} in 'Finding Label'")
        try:
            x, y, w, h = (float(v) for v in (row.x, row.y, row.w, row.h))
        except ValueError:
            raise DataError(at, f"'Bbox [x,y,w,h]' {[row.x, row.y, row.w, row.h]} has a non-number") from None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise DataError(at, "'Bbox [x,y,w,h]' has a missing or infinite value")
        if w <= 0 or h <= 0:
            raise DataError(at, f"box with no area (w={w:g}, h={h:g}): x_max <= x_min or y_max <= y_min")
        rec = by_name.get(row.image)
        if rec is None:
            missing += 1
            continue
        if rec.image not in sizes:
            info = image_info(rec.image)
            sizes[rec.image] = (info.width, info.height)
        iw, ih = sizes[rec.image]
        sx, sy = (iw / frame, ih / frame) if frame else (1.0, 1.0)
        box = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
        inside = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(iw)), min(box[3], float(ih)))
        if inside[2] <= inside[0] or inside[3] <= inside[1]:
            frame_text = f"the {frame}² frame scaled to " if frame else ""
            raise DataError(at, f"box {[x, y, w, h]} lies wholly outside its image ({frame_text}{iw}x{ih} pixels)")
        if inside != box:
            clipped += 1
            first_clip = first_clip or at
        out.setdefault(_key(rec.image), {}).setdefault(label, Truth()).boxes.append(inside)
    if clipped:
        notes.append(f"{path}: {clipped} box(es) reach outside their image and were clipped to it "
                     f"(first: {first_clip})")
    if missing:
        notes.append(f"{path}: {missing} row(s) name images that are not in the tree; skipped")
    return out


def read_phantom_truth(root: str | Path) -> dict[str, dict[str, Truth]]:
    """Image key -> finding -> lesion masks (and their boxes), from ``phantom_truth/manifest.csv``."""
    root = Path(root)
    manifest = root / "phantom_truth" / "manifest.csv"
    if not manifest.is_file():
        raise DataError(manifest, "no phantom truth manifest (--truth takes a folder written by `cxr phantom`)")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[str, Truth]] = {}
    for n, row in enumerate(rows, start=2):
        try:
            masks, boxes = json.loads(row["lesion_masks"]), json.loads(row["boxes"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{manifest}:{n}", "unreadable lesion_masks or boxes column") from None
        if len(masks) != len(boxes):
            raise DataError(f"{manifest}:{n}", f"{len(masks)} lesion masks for {len(boxes)} boxes")
        for m, b in zip(masks, boxes):
            t = out.setdefault(_key(root / row["image"]), {}).setdefault(b["finding"], Truth())
            t.masks.append(str(root / m))
    return out


def _read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        m = np.asarray(im) > 0
    if m.shape != shape:
        raise DataError(path, f"lesion mask of shape {m.shape} for an image of shape {shape}")
    return m


# ----------------------------------------------------------------------------------------------
# Maps


def to_image_grid(square: np.ndarray, shape: tuple[int, int], fit: str) -> np.ndarray:
    """A map on the network's square back at the image's ``(H, W)`` (bilinear).

    ``pad``: the padding is cut off; ``crop``: the square is pasted into the centre of the
    resized image and the edges the network never saw stay 0.
    """
    h, w = shape
    size = square.shape[0]
    nh, nw, oy, ox = fit_geometry(h, w, size, fit)
    if fit == "pad":
        region = square[oy:oy + nh, ox:ox + nw]
    else:
        region = np.zeros((nh, nw), dtype=np.float32)
        region[-oy:-oy + size, -ox:-ox + size] = square
    t = torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def crop_slice(shape: tuple[int, int], box: tuple[int, int, int, int] | None) -> tuple[slice, slice] | None:
    """The part of an ``(H, W)`` image a lung-crop ``box`` (top, left, height, width) keeps, as
    :func:`cxr.data.preprocess.apply` cuts it; None for the whole image."""
    if box is None:
        return None
    top, left, h, w = box
    ys, xs = slice(max(0, top), min(shape[0], top + h)), slice(max(0, left), min(shape[1], left + w))
    return None if ys.stop <= ys.start or xs.stop <= xs.start else (ys, xs)


def to_image(square: np.ndarray, shape: tuple[int, int], fit: str,
             box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """:func:`to_image_grid`, through a lung crop when the network saw one: the map fills the
    crop and the rest of the image, which the network never saw, is 0."""
    cut = crop_slice(shape, box)
    if cut is None:
        return to_image_grid(square, shape, fit)
    out = np.zeros(shape, dtype=np.float32)
    out[cut] = to_image_grid(square, (cut[0].stop - cut[0].start, cut[1].stop - cut[1].start), fit)
    return out


def overlay(image: np.ndarray, cam: np.ndarray, truth_boxes: Sequence[loc.Box] = (),
            truth_mask: np.ndarray | None = None, cam_box: loc.Box | None = None) -> np.ndarray:
    """RGB uint8: the image under the map's jet colours; truth in green, the map's box in red."""
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    out = show_cam_on_image(rgb, np.clip(cam, 0, 1).astype(np.float32), use_rgb=True, image_weight=OVERLAY_ALPHA)
    if truth_mask is not None and truth_mask.any():
        edge = truth_mask & ~(np.roll(truth_mask, 1, 0) & np.roll(truth_mask, -1, 0)
                              & np.roll(truth_mask, 1, 1) & np.roll(truth_mask, -1, 1))
        out[edge] = (0, 255, 0)
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for b, colour in [(b, (0, 255, 0)) for b in truth_boxes] + ([(cam_box, (255, 0, 0))] if cam_box else []):
        draw.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=colour)
    return np.asarray(pil)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    def write(f) -> None:
        Image.fromarray(rgb).save(f, format="PNG")
    atomic_write(path, write)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(f) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        f.write(buf.getvalue())
    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# The whole tree


@dataclass
class ExplainOptions:
    """What ``cxr explain`` was asked (its options, one for one)."""

    checkpoint: Path
    src: Path
    out: Path
    method: str = "gradcam"
    class_name: str | None = None
    boxes: Path | None = None
    truth: Path | None = None
    box_frame: int | None = BOX_FRAME
    relative: float = loc.RELATIVE_THRESHOLD
    target_layer: str | None = None  # a module path of the classifier instead of TARGET_LAYERS' choice
    align: bool = True  # shift maps so cells sit where the network centres them (cell_offset)
    scored_only: bool = False  # explain only images with truth for one of the task's classes
    overlays: int | None = None  # overlay PNGs to write (None: one per map)
    layout: str | None = None
    labels_csv: Path | None = None
    device: str | torch.device = "cpu"
    batch_size: int = 16
    overwrite: bool = False
    skip_bad: bool = False


def _rel(ref: str, src: Path) -> str:
    """The image's path inside the tree, as a relative POSIX path (the names of its outputs)."""
    path, member = split_ref(ref)
    if member is not None:
        return member
    try:
        return Path(os.path.relpath(path, src)).as_posix() if src.is_dir() else Path(path).name
    except ValueError:
        return Path(path).name


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _jobs(records: Sequence[Sample], clf: Classifier, truth: dict[str, dict[str, dict[str, Truth]]],
          opts: ExplainOptions) -> list[tuple[int, str]]:
    """(record index, class) pairs to explain (see :func:`explain_tree`)."""
    labels = clf.task.label_names
    jobs = []
    for i, r in enumerate(records):
        have = {c for kind in truth.values() for c in kind.get(_key(r.image), {}) if c in labels}
        if opts.class_name is not None:
            classes = [opts.class_name] if not opts.scored_only or opts.class_name in have else []
        elif clf.task.kind == "binary":
            classes = [labels[0]] if not opts.scored_only or have else []
        elif have:
            classes = [c for c in labels if c in have]
        else:
            classes = [] if opts.scored_only else [""]  # "": the top-scoring class, chosen below
        jobs += [(i, c) for c in classes]
    return jobs


def explain_tree(opts: ExplainOptions, echo: Callable[[str], None] = lambda _m: None,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write maps, overlays and scores of ``opts.src`` into ``opts.out``; return the summary.

    Classes explained per image: ``class_name`` when given; else a binary task's class; else
    the classes the image has truth for; else its top-scoring class. With ``scored_only`` only
    images with truth for a class of the task are explained.
    """
    if opts.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {opts.method!r}")
    if not 0 < opts.relative <= 1:
        raise ConfigError(f"--threshold must be in (0, 1], got {opts.relative}")
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.overlays is not None and opts.overlays < 0:
        raise ConfigError(f"--overlays must be >= 0, got {opts.overlays}")
    src, out = Path(opts.src), Path(opts.out)
    if not src.exists():
        raise DataError(f"--in {src}", "no such folder or archive")
    check_out(src, out, opts.overwrite)
    device = torch.device(opts.device)
    clf = load_classifier(opts.checkpoint, device)
    layer_name = target_layer_name(clf)
    if opts.target_layer is not None:
        try:
            clf.model.get_submodule(opts.target_layer)
        except AttributeError:
            raise ConfigError(f"--target-layer {opts.target_layer}: no such module in {clf.checkpoint} "
                              f"(the default for this model: {layer_name})") from None
        layer_name = opts.target_layer
    if opts.class_name is not None:
        class_index(clf, opts.class_name)
    problems = Problems(skip_bad=opts.skip_bad)
    ds = load_tree(src, layout=opts.layout, problems=problems, labels_csv=opts.labels_csv)
    records = list(ds.records)
    if not records:
        raise DataError(f"--in {src}", f"no images found (layout {ds.layout})")
    notes: list[str] = []
    truth: dict[str, dict[str, dict[str, Truth]]] = {}
    if opts.boxes is not None:
        truth["boxes"] = read_box_csv(opts.boxes, records, opts.box_frame, notes)
    if opts.truth is not None:
        truth["masks"] = read_phantom_truth(opts.truth)
    for kind, found in truth.items():
        n = sum(_key(r.image) in found for r in records)
        if n == 0:
            raise DataError(opts.boxes if kind == "boxes" else opts.truth,
                            f"its {kind} name none of the {len(records)} images of {src}")
        others = {c for per in found.values() for c in per} - set(clf.task.label_names)
        if others:
            notes.append(f"{kind}: findings outside task {clf.task.name!r} not scored: {', '.join(sorted(others))}")
    jobs = _jobs(records, clf, truth, opts)
    if not jobs:
        raise DataError(f"--in {src}", "no image to explain (with --scored-only: none has truth for "
                                       f"{opts.class_name or 'a class of the task'})")
    echo(f"{opts.method} at {layer_name} of {clf.checkpoint} ({clf.task.name}), {len(jobs)} map(s) of "
         f"{len({i for i, _ in jobs})} image(s)")

    with staged_tree(out) as tmp:
        report = _explain(opts, clf, layer_name, records, jobs, truth, tmp, notes, problems, progress)
    report["out"] = str(out)
    return report


def _explain(opts: ExplainOptions, clf: Classifier, layer_name: str, records: Sequence[Sample],
             jobs: list[tuple[int, str]], truth: dict[str, dict[str, dict[str, Truth]]], tmp: Path,
             notes: list[str], problems: Problems, progress: Callable[[int], None] | None) -> dict[str, Any]:
    src = Path(opts.src)
    wrapper = ImageLogits(clf.model)
    device = next(clf.model.parameters()).device
    cam = METHODS[opts.method](model=wrapper, target_layers=[wrapper.model.get_submodule(layer_name)])
    meta_all = None
    if getattr(clf.model, "uses_metadata", False):
        meta_all, _ = metadata_matrix(records, clf.meta_stats)
        meta_all = torch.as_tensor(meta_all, dtype=torch.float32)
    labels = clf.task.label_names
    inp = clf.args.get("input", {})  # a model trained on lung crops is shown (and explained on) lung crops
    explained = list(dict.fromkeys(i for i, _ in jobs))
    crops = boxes_or_none([records[i] for i in explained], inp.get("lung_crop"),
                          float(inp.get("lung_crop_margin", 0.1)), echo=notes.append) or {}
    maps: dict[int, dict[str, np.ndarray]] = {}  # made, not yet written
    n_maps = n_images = 0
    rows: list[dict[str, Any]] = []
    overlays_left = math.inf if opts.overlays is None else opts.overlays
    n_overlays = 0
    offset: float | None = None if opts.align else 0.0
    skipped: list[str] = []
    # Score-CAM runs the network on masked copies of one image at a time: one image per batch
    # keeps a fusion model's metadata row lined up with them
    step = 1 if opts.method == "scorecam" and meta_all is not None else opts.batch_size
    for start in range(0, len(jobs), step):
        batch = jobs[start:start + step]
        images: dict[int, np.ndarray] = {}
        for i, _c in batch:
            if i in images:
                continue
            try:
                images[i] = load_image(records[i].image)
            except DataError as e:
                if not opts.skip_bad:
                    raise
                problems.report(records[i].image, str(e))
                skipped.append(records[i].image)
        batch = [(i, c) for i, c in batch if i in images]
        if not batch:
            continue
        x = torch.stack([torch.from_numpy(apply(images[i], clf.pre, crops.get(records[i].image)))[None]
                         for i, _ in batch]).to(device)
        if meta_all is not None:
            wrapper.meta = meta_all[[i for i, _ in batch]].to(device)
        with torch.no_grad():
            logits = wrapper(x)
        probs = probabilities(clf.task, logits.float())
        probs = probs.reshape(len(batch), -1)
        classes = [c or labels[int(np.argmax(probs[k]))] for k, (_i, c) in enumerate(batch)]
        targets = [ClassifierOutputTarget(0 if clf.task.kind == "binary" else labels.index(c)) for c in classes]
        squares = cam(input_tensor=x, targets=targets)
        if opts.align and offset is None:
            cells = cam.activations_and_grads.activations[0].shape[-1]
            offset = cell_offset(clf, layer_name, x.shape[-1] / cells)
            if offset is None:
                notes.append(f"no cell alignment known for layer {layer_name}: maps as pytorch-grad-cam places them")
                offset = 0.0
        if offset:
            squares = np.stack([align_map(sq, offset) for sq in squares])
        for k, ((i, _c), c) in enumerate(zip(batch, classes)):
            img = images[i]
            grid = to_image(squares[k], img.shape, clf.pre.fit, crops.get(records[i].image))
            maps.setdefault(i, {})[c] = grid.astype(np.float32)
            p = float(probs[k, 0 if clf.task.kind == "binary" else labels.index(c)])
            found = [(kind, t[_key(records[i].image)][c]) for kind, t in truth.items()
                     if c in t.get(_key(records[i].image), {})]
            all_boxes: list[loc.Box] = []
            all_masks: list[np.ndarray] = []
            for kind, tr in found:
                masks = [_read_mask(m, img.shape) for m in tr.masks]
                boxes = list(tr.boxes) + [b for b in (loc.mask_box(m) for m in masks) if b is not None]
                region = loc.region_of(img.shape, tr.boxes, masks)
                all_boxes += list(tr.boxes) if kind == "boxes" else []
                all_masks += masks
                row = {"image": _rel(records[i].image, src), "class": c, "truth": kind, "probability": p,
                       "pointing": loc.pointing_score(grid, region),
                       "iou": loc.best_iou(grid, boxes, opts.relative),
                       "cam_box": loc.cam_box(grid, opts.relative)}
                for null in loc.NULL_MAPS:
                    nm = loc.null_map(img.shape, null)
                    row[f"null_{null}_pointing"] = loc.pointing_score(nm, region)
                    row[f"null_{null}_iou"] = loc.best_iou(nm, boxes, opts.relative)
                rows.append(row)
            if n_overlays < overlays_left:
                mask = np.logical_or.reduce(all_masks) if all_masks else None
                rgb = overlay(img, grid, all_boxes, mask, loc.cam_box(grid, opts.relative))
                _write_png(tmp / "overlays" / f"{_rel(records[i].image, src).rsplit('.', 1)[0]}__{_safe(c)}.png", rgb)
                n_overlays += 1
        if progress is not None:
            progress(len(batch))
        # an image's jobs are consecutive: write every image whose maps are all made (a whole
        # NIH release at 1024² would not fit in memory)
        following = jobs[start + step][0] if start + step < len(jobs) else None
        for i in [i for i in maps if i != following]:
            arrays = maps.pop(i)
            _write_npz(tmp / "maps" / f"{_rel(records[i].image, src).rsplit('.', 1)[0]}.npz", arrays)
            n_maps += len(arrays)
            n_images += 1
    summary = summarize_rows(rows)
    _write_scores_csv(tmp / "scores.csv", rows)
    settings = {"checkpoint": str(clf.checkpoint), "task": clf.task.name,
                "model": clf.args.get("model", {}).get("name"),
                "method": opts.method, "target_layer": layer_name, "tree": str(src),
                "input": {"size": clf.pre.size, "fit": clf.pre.fit, "lung_crop": inp.get("lung_crop")},
                "align_px": offset,
                "threshold": f"relative {opts.relative:g} of the map's maximum; the peak's 8-connected component",
                "iou_thresholds": list(loc.IOU_THRESHOLDS), "boxes": str(opts.boxes) if opts.boxes else None,
                "box_frame": opts.box_frame, "truth": str(opts.truth) if opts.truth else None,
                "maps": n_maps, "images": n_images, "overlays": n_overlays,
                "skipped": skipped, "notes": notes}
    atomic_write_text(tmp / "scores.json", json.dumps({"settings": settings, "summary": summary}, indent=2) + "\n")
    atomic_write_text(tmp / "explain.json", json.dumps(settings, indent=2) + "\n")
    return {"settings": settings, "summary": summary, "rows": rows, "notes": notes}


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """truth kind -> class (and ``all``) -> scorer (``map``, ``null_lungs``, ``null_centre``) -> scores."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for kind in TRUTH_KINDS:
        mine = [r for r in rows if r["truth"] == kind]
        if not mine:
            continue
        groups = {c: [r for r in mine if r["class"] == c] for c in dict.fromkeys(r["class"] for r in mine)}
        if len(groups) > 1:
            groups["all"] = mine
        out[kind] = {c: {"map": loc.summarize([r["pointing"] for r in g], [r["iou"] for r in g]),
                         **{f"null_{n}": loc.summarize([r[f"null_{n}_pointing"] for r in g],
                                                       [r[f"null_{n}_iou"] for r in g]) for n in loc.NULL_MAPS}}
                     for c, g in groups.items()}
    return out


def _write_scores_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    cols = ["image", "class", "truth", "probability", "pointing", "iou", "cam_box"] + \
        [f"null_{n}_{s}" for n in loc.NULL_MAPS for s in ("pointing", "iou")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        box = r["cam_box"]
        w.writerow([r["image"], r["class"], r["truth"], f"{r['probability']:.6g}", f"{r['pointing']:.6g}",
                    f"{r['iou']:.6g}", "" if box is None else " ".join(f"{v:g}" for v in box)]
                   + [f"{r[c]:.6g}" for c in cols[7:]])
    atomic_write_text(path, buf.getvalue())


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: per truth kind and class, the map's scores beside the null maps'."""
    lines = []
    head = (f"{'truth':6} {'class':20} {'n':>4}  {'scorer':12} {'pointing':>8} {'95% CI':>13} {'mean IoU':>8} "
            + " ".join(f"{'IoU>=' + format(t, 'g'):>9}" for t in loc.IOU_THRESHOLDS))
    lines.append(head)
    for kind, classes in summary.items():
        for c, scorers in classes.items():
            for name, s in scorers.items():
                lines.append(f"{kind:6} {c:20} {s['n']:>4}  {name:12} {s['pointing']:8.3f} "
                             f"{s['pointing_lo']:6.3f}-{s['pointing_hi']:.3f} {s['mean_iou']:8.3f} "
                             + " ".join(f"{s['iou>=' + format(t, 'g')]:9.3f}" for t in loc.IOU_THRESHOLDS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# For the demo


def phantom_pointing_game(run: str | Path, phantom: str | Path, out: str | Path, n_overlays: int = 8,
                          tree: str = "MontgomerySet", method: str = "gradcam", device: str = "cpu",
                          overwrite: bool = True) -> dict[str, Any]:
    """Pointing-game rate of a TB classifier run's Grad-CAM against a phantom's lesion masks.

    ``phantom``: a ``cxr phantom --preset nlm`` folder; ``tree``: its site folder to explain
    (default the Montgomery-like one, which a classifier trained on the Shenzhen-like tree
    never saw). Only images with lesions are explained. Writes ``out`` as :func:`explain_tree`
    does, with ``n_overlays`` overlay PNGs. Returns ``n``, ``pointing``, ``null_pointing`` (the
    two-lung null map's), ``out`` and ``overlays`` (their paths); with no lesion in the tree,
    ``n`` is 0, the rates NaN, and nothing is written.
    """
    phantom = Path(phantom)
    truth = read_phantom_truth(phantom)
    records = load_tree(phantom / tree).records
    if not any(_key(r.image) in truth for r in records):
        return {"n": 0, "pointing": math.nan, "null_pointing": math.nan, "out": None, "overlays": []}
    report = explain_tree(ExplainOptions(checkpoint=Path(run), src=phantom / tree, out=Path(out), method=method,
                                         truth=phantom, scored_only=True, overlays=n_overlays, device=device,
                                         overwrite=overwrite))
    classes = report["summary"]["masks"]
    s = classes.get("all") or next(iter(classes.values()))
    return {"n": s["map"]["n"], "pointing": s["map"]["pointing"], "null_pointing": s["null_lungs"]["pointing"],
            "out": report["out"], "overlays": sorted(str(p) for p in (Path(out) / "overlays").rglob("*.png"))}
