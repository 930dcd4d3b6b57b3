"""VinDr-CXR boxes for the detector: readers fused by weighted boxes fusion, images on the network grid.

Each VinDr training image was boxed by three radiologists (``Box.reader``). Their boxes are fused
per image with weighted boxes fusion (Solovyev et al., 2021; the ``ensemble_boxes`` package):
each reader is one "model" whose boxes all score 1, coordinates normalised to [0, 1] by the
stored image's size; boxes of one class that overlap at IoU > ``fusion.iou_thr`` become one box
whose corners are the score-weighted mean of theirs. A box only one reader drew is kept (its
fused score is 1/3, kept because ``fusion.skip_box_thr`` is 0 by default), matching the loader's
rule that any reader's finding counts. An image with no box (every reader said "No finding") is a
negative example: an empty target.

Boxes reach us in stored-image pixels (the loader rescales a resized PNG tree's ``train.csv``
boxes by ``train_meta.csv``). A box reaching past the image edge is clipped to it; a box with no
area inside the image is refused with the ``train.csv`` line that holds it. Images are resized
keeping their aspect and padded to ``size × size`` (:func:`cxr.data.preprocess.fit_geometry`), so
grid boxes map back to stored pixels, and from there to the original pixels, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Sequence

import numpy as np
import torch

from cxr.data.csvutil import line_of, read_table
from cxr.data.image import load_image
from cxr.data.io import split_ref
from cxr.data.layouts import load_tree
from cxr.data.preprocess import fit_geometry, resize_square
from cxr.data.problems import Problems
from cxr.data.record import VINDR, Box, Sample
from cxr.data.sources.vindr import META_CSV, TRAIN_COLUMNS, TRAIN_CSV
from cxr.data.tree import Tree
from cxr.errors import DataError

FusionMethod = Literal["wbf", "none"]


@dataclass(frozen=True)
class FusionConfig:
    """How the readers' boxes become one training target per image."""

    method: FusionMethod = "wbf"  # "none": every reader's box is a target as drawn
    iou_thr: float = 0.55  # boxes of one class overlapping more than this are fused
    skip_box_thr: float = 0.0  # fused boxes scoring below this (readers who drew it / readers) are dropped

    def __post_init__(self) -> None:
        if self.method not in ("wbf", "none"):
            raise ValueError(f"fusion.method must be wbf or none, got {self.method!r}")
        if not 0.0 < self.iou_thr <= 1.0 or not 0.0 <= self.skip_box_thr < 1.0:
            raise ValueError("fusion.iou_thr must be in (0, 1] and fusion.skip_box_thr in [0, 1)")


def image_id(sample: Sample) -> str:
    """The VinDr image id: the file name without its suffix."""
    member = split_ref(sample.image)[1] or sample.image
    return Path(member.replace("\\", "/")).stem


def fuse_boxes(boxes: Sequence[Box], width: int, height: int, cfg: FusionConfig = FusionConfig()
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The readers' ``boxes`` of one ``width × height`` image → fused (N, 4) boxes in the same
    pixels, their class ids (0..13) and fused scores (the share of readers that drew them)."""
    from ensemble_boxes import weighted_boxes_fusion

    if not boxes:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0)
    if cfg.method == "none":
        b = np.array([[x.x0, x.y0, x.x1, x.y1] for x in boxes], dtype=np.float64)
        return b, np.array([VINDR.index(x.label) for x in boxes], dtype=np.int64), np.ones(len(boxes))
    scale = np.array([width, height, width, height], dtype=np.float64)
    readers: dict[str | None, list[Box]] = {}
    for x in boxes:
        readers.setdefault(x.reader, []).append(x)
    groups = list(readers.values())
    fused, scores, labels = weighted_boxes_fusion(
        [[[x.x0 / width, x.y0 / height, x.x1 / width, x.y1 / height] for x in g] for g in groups],
        [[1.0] * len(g) for g in groups], [[VINDR.index(x.label) for x in g] for g in groups],
        iou_thr=cfg.iou_thr, skip_box_thr=cfg.skip_box_thr)
    fused = np.asarray(fused, dtype=np.float64).reshape(-1, 4) * scale
    return fused, np.asarray(labels, dtype=np.int64).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Coordinates: original pixels ↔ stored pixels ↔ the network grid


def stored_to_grid(boxes: np.ndarray, h: int, w: int, size: int) -> np.ndarray:
    """Boxes in an ``h × w`` stored image → the padded ``size × size`` grid."""
    nh, nw, oy, ox = fit_geometry(h, w, size, "pad")
    s = np.array([nw / w, nh / h, nw / w, nh / h])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * s + np.array([ox, oy, ox, oy])


def grid_to_stored(boxes: np.ndarray, h: int, w: int, size: int) -> np.ndarray:
    """The inverse of :func:`stored_to_grid`, clipped to the stored image."""
    nh, nw, oy, ox = fit_geometry(h, w, size, "pad")
    b = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - np.array([ox, oy, ox, oy])) / np.array(
        [nw / w, nh / h, nw / w, nh / h])
    return np.clip(b, 0, np.array([w, h, w, h], dtype=np.float64))


def stored_to_original(boxes: np.ndarray, h: int, w: int, original_size: tuple[int, int] | None) -> np.ndarray:
    """Stored pixels → the acquisition's pixels (``original_size`` = (width, height) from
    ``train_meta.csv``; None: the stored image is the original)."""
    if original_size is None:
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ow, oh = original_size
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([ow / w, oh / h, ow / w, oh / h])


# ----------------------------------------------------------------------------------------------
# Checking boxes against their image


def csv_line(sample: Sample, box: Box, h: int, w: int) -> str:
    """``<tree>/train.csv:<line>`` of the row that drew ``box`` (stored pixels) in ``sample``."""
    archive, member = split_ref(sample.image)
    if member is None:
        tree = Tree(Path(sample.image).parent.parent)  # <root>/train/<id>.<suffix>
    else:
        prefix = PurePosixPath(member).parent.parent.as_posix()
        tree = Tree(archive, "" if prefix == "." else prefix)
    where = tree.ref(TRAIN_CSV)
    table = read_table(tree.read_bytes(TRAIN_CSV), where, TRAIN_COLUMNS, tuple(TRAIN_COLUMNS), Problems())
    sx, sy = (1.0, 1.0) if sample.original_size is None else (w / sample.original_size[0], h / sample.original_size[1])
    ident = image_id(sample)
    for i, row in enumerate(table.itertuples(index=False)):
        if row.image_id != ident or row.class_name != box.label or (row.rad_id or None) != box.reader:
            continue
        try:
            coords = [float(row.x_min) * sx, float(row.y_min) * sy, float(row.x_max) * sx, float(row.y_max) * sy]
        except ValueError:
            continue
        if np.allclose(coords, [box.x0, box.y0, box.x1, box.y1], rtol=1e-6, atol=1e-6):
            return f"{where}:{line_of(i)}"
    return where


def checked_boxes(sample: Sample, h: int, w: int) -> tuple[list[Box], int]:
    """The sample's boxes clipped to its ``h × w`` stored image, and how many were clipped; a box
    with no area inside the image is a :class:`DataError` naming its ``train.csv`` line."""
    out, clipped = [], 0
    for b in sample.boxes:
        x0, y0 = min(max(b.x0, 0.0), w), min(max(b.y0, 0.0), h)
        x1, y1 = min(max(b.x1, 0.0), w), min(max(b.y1, 0.0), h)
        if x1 <= x0 or y1 <= y0:
            ow, oh = sample.original_size or (w, h)
            raise DataError(csv_line(sample, b, h, w),
                            f"{b.label!r} box of {b.reader or 'its reader'} has no area inside the image "
                            f"({ow}x{oh} pixels): refused")
        if (x0, y0, x1, y1) != (b.x0, b.y0, b.x1, b.y1):
            clipped += 1
        out.append(Box(b.label, x0, y0, x1, y1, reader=b.reader))
    return out, clipped


# ----------------------------------------------------------------------------------------------
# Trees and sets


def detection_records(tree: str | Path, layout: str | None = None, skip_bad: bool = False) -> list[Sample]:
    """Every annotated image of a VinDr-layout tree; another label set is one line."""
    if not Path(tree).exists():
        raise DataError(tree, "no such folder or archive")
    ds = load_tree(tree, layout=layout, skip_bad=skip_bad)
    if ds.label_names != VINDR:
        raise DataError(tree, f"a {ds.layout} tree has no VinDr-CXR boxes (the detector reads the vindr layout: "
                              "train.csv + train/; `cxr phantom --preset vindr` writes one)")
    if not ds.records:
        raise DataError(tree, "no annotated image")
    return list(ds.records)


def needs_meta(tree: str | Path) -> bool:
    """True when the tree ships ``train_meta.csv`` (a resized copy: boxes map back through it)."""
    return Tree(tree).is_file(META_CSV)


@dataclass
class DetectionSet:
    """Images on the network grid with their fused targets."""

    records: list[Sample]
    images: torch.Tensor  # (N, 1, S, S) float in [0, 1]
    boxes: list[torch.Tensor]  # per image (K, 4) on the grid
    labels: list[torch.Tensor]  # per image (K,) class ids 0..13
    stored: list[tuple[int, int]]  # per image (h, w) as stored
    clipped: int = 0

    def __len__(self) -> int:
        return len(self.records)


def load_detection_set(records: Sequence[Sample], size: int, fusion: FusionConfig) -> DetectionSet:
    xs, boxes, labels, stored, clipped = [], [], [], [], 0
    for r in records:
        img = load_image(r.image)
        h, w = img.shape
        kept, n = checked_boxes(r, h, w)
        clipped += n
        fb, fl, _ = fuse_boxes(kept, w, h, fusion)
        grid = stored_to_grid(fb, h, w, size)
        xs.append(resize_square(img, size, "pad")[None])
        boxes.append(torch.as_tensor(grid, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.as_tensor(fl, dtype=torch.int64))
        stored.append((h, w))
    images = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, 1, size, size)
    return DetectionSet(list(records), images, boxes, labels, stored, clipped)
