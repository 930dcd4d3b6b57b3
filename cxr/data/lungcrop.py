"""The lung crop: each image cut to its lungs' bounding box plus a margin before it is resized.

Why: the lungs fill a varying part of a plate (collimation, markers, shoulders, abdomen), and
a network that sees only the lung field cannot learn a site from what lies around it. Every
trainer that reads images through :class:`cxr.data.cache.ImageCache` takes it from the shared
data keys ``data.lung_crop`` (where the masks come from) and ``data.lung_crop_margin``:

- ``masks``: the tree's own lung masks (Montgomery ``ManualMask``) or, for a phantom tree,
  its truth's lung labels (:class:`cxr.data.masks.LungLabels`);
- a folder with ``ManualMask/{leftMask,rightMask}/<image>.png`` (what ``cxr segment`` writes):
  masks looked up by each image's file name;
- a lung-segmenter run folder: masks predicted by its network. Prediction lives above this
  layer, so the segmenter registers itself (:func:`register_mask_predictor`); each image's box
  is predicted once and cached under the cache root, keyed by the image's content hash and the
  checkpoint's weights (``lung_boxes/<key>.json``).

An image without a mask keeps its whole field; all such images are counted and said in one
notice. Boxes are ``(top, left, height, width)`` in the stored image's pixels; a mask is
expected at its image's size (as Montgomery's and ``cxr segment``'s are).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from cxr.data.image import load_image
from cxr.data.io import atomic_write_text, split_ref
from cxr.data.masks import LungLabels, combine_lung_masks, read_binary_mask
from cxr.data.record import Sample
from cxr.errors import ConfigError, DataError

MASKS = "masks"
MASK_DIRS = ("leftMask", "rightMask")  # the Montgomery ManualMask folders, image-left lung first
Box = tuple[int, int, int, int]  # top, left, height, width


def mask_box(mask: np.ndarray) -> Box | None:
    """The tight box of the nonzero pixels of ``mask``, or None when it is empty."""
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    if not rows.size:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def expand_box(box: Box, margin: float, shape: tuple[int, int]) -> Box:
    """``box`` grown by ``margin`` × its own height (width) above and below (left and right),
    rounded outwards, clipped to an image of ``shape``."""
    top, left, h, w = box
    dy, dx = int(np.ceil(margin * h)), int(np.ceil(margin * w))
    y0, x0 = max(0, top - dy), max(0, left - dx)
    y1, x1 = min(shape[0], top + h + dy), min(shape[1], left + w + dx)
    return y0, x0, y1 - y0, x1 - x0


# ----------------------------------------------------------------------------------------------
# Where the masks come from


class MaskPredictor(Protocol):
    """A network that gives an image's lung label image (0 outside, 1 and 2 the lungs)."""

    key: str  # identifies the weights (part of the box cache's file name)

    def __call__(self, img: np.ndarray) -> np.ndarray: ...


_PREDICTORS: list[tuple[Callable[[Path], bool], Callable[[Path], MaskPredictor]]] = []


def register_mask_predictor(detect: Callable[[Path], bool], load: Callable[[Path], MaskPredictor]) -> None:
    """Let ``data.lung_crop=PATH`` name a run folder that ``detect`` recognizes; ``load`` builds its
    predictor (the segmenter registers itself at import, as layouts and networks do)."""
    _PREDICTORS.append((detect, load))


def _mask_name(image_ref: str) -> str:
    member = split_ref(image_ref)[1] or image_ref
    return Path(member.replace("\\", "/")).with_suffix(".png").name


def folder_masks(folder: Path) -> Callable[[Sample], np.ndarray | None]:
    """Masks of a ``ManualMask/{leftMask,rightMask}`` folder, by each image's file name."""
    dirs = [folder / "ManualMask" / d for d in MASK_DIRS]

    def find(sample: Sample) -> np.ndarray | None:
        name = _mask_name(sample.image)
        left, right = (d / name for d in dirs)
        if not (left.is_file() and right.is_file()):
            return None
        try:
            return combine_lung_masks(read_binary_mask(str(left)), read_binary_mask(str(right)))
        except ValueError as e:
            raise DataError(f"{left} + {right}", str(e)) from None

    return find


@dataclass
class CropReport:
    """What :func:`lung_boxes` found: images cropped and images left whole (no mask)."""

    cropped: int = 0
    missing: int = 0
    first_missing: str | None = None

    def notice(self, source: str) -> str | None:
        if not self.missing:
            return None
        return (f"cxr: note: data.lung_crop={source}: no lung mask for {self.missing} of "
                f"{self.missing + self.cropped} images (first: {self.first_missing}); they keep the full image")


def check_source(source: str | None, key: str = "data.lung_crop") -> None:
    """A cheap check before any work: ``masks``, a mask folder or a recognized run folder."""
    if source is None or source == MASKS:
        return
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"config key '{key}': {source}: not '{MASKS}' and no such folder")
    if (path / "ManualMask").is_dir() or any(detect(path) for detect, _ in _PREDICTORS):
        return
    what = ("a run folder, but no registered lung segmenter reads it (a segmenter run, "
            "with classifiers.segmenter imported, is needed)" if (path / "checkpoints").is_dir()
            else "neither a ManualMask/{leftMask,rightMask} folder nor a lung-segmenter run")
    raise ConfigError(f"config key '{key}': {source}: {what}")


def lung_boxes(records: Sequence[Sample], source: str, margin: float, cache_root: str | Path | None = None,
               content_hash: Callable[[str], str] | None = None,
               echo: Callable[[str], None] | None = None) -> dict[str, Box | None]:
    """Each record's crop box (the mask's box grown by ``margin``), or None where it has no mask.

    ``cache_root`` and ``content_hash`` (an image ref's content hash,
    :meth:`cxr.data.cache.ImageCache.content_hash`) keep predicted boxes across runs. Images
    without a mask are said once through ``echo`` (default: standard error).
    """
    if margin < 0:
        raise ConfigError(f"config key 'data.lung_crop_margin': must be >= 0, got {margin}")
    check_source(source)
    report = CropReport()
    out: dict[str, Box | None] = {}
    if source == MASKS or (Path(source) / "ManualMask").is_dir():
        find = LungLabels() if source == MASKS else folder_masks(Path(source))
        for r in dict((r.image, r) for r in records).values():
            mask = find(r)
            out[r.image] = _grown(mask_box(mask) if mask is not None else None, margin, mask)
    else:
        out = _predicted_boxes(records, Path(source), margin, cache_root, content_hash)
    for ref, box in out.items():
        if box is None:
            report.missing += 1
            report.first_missing = report.first_missing or ref
        else:
            report.cropped += 1
    line = report.notice(source)
    if line is not None:
        (echo or (lambda s: print(s, file=sys.stderr)))(line)
    return out


def _grown(box: Box | None, margin: float, mask: np.ndarray | None) -> Box | None:
    return None if box is None or mask is None else expand_box(box, margin, mask.shape)


def _predicted_boxes(records: Sequence[Sample], run: Path, margin: float, cache_root: str | Path | None,
                     content_hash: Callable[[str], str] | None) -> dict[str, Box | None]:
    """Boxes from a registered predictor; the tight boxes (and image shapes) cached by content hash."""
    load = next(ld for detect, ld in _PREDICTORS if detect(run))
    predictor: MaskPredictor | None = None
    store_file = Path(cache_root) / "lung_boxes" / f"{_safe(run)}.json" if cache_root is not None else None
    store: dict[str, list] = {}
    if store_file is not None and store_file.is_file():
        try:
            store = json.loads(store_file.read_text())
        except (OSError, json.JSONDecodeError):
            store = {}  # a damaged store only costs predicting again
    out: dict[str, Box | None] = {}
    dirty = False
    for r in records:
        if r.image in out:
            continue
        if predictor is None:
            predictor = load(run)
        digest = content_hash(r.image) if content_hash is not None else None
        key = f"{predictor.key}:{digest}" if digest is not None else None
        if key is None or key not in store:
            img = load_image(r.image)
            tight = mask_box(predictor(img) != 0)
            entry = [list(tight) if tight is not None else None, list(img.shape)]
            if key is not None:
                store[key] = entry
                dirty = True
        else:
            entry = store[key]
        tight, shape = entry
        out[r.image] = expand_box(tuple(tight), margin, tuple(shape)) if tight is not None else None
    if dirty and store_file is not None:
        store_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(store_file, json.dumps(store))
    return out


def _safe(path: Path) -> str:
    """A file-name-safe, stable name for a run folder (its absolute path, hashed)."""
    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]


def boxes_or_none(records: Sequence[Sample], source: str | None, margin: float,
                  cache_root: str | Path | None = None, content_hash: Callable[[str], str] | None = None,
                  echo: Callable[[str], None] | None = None) -> Mapping[str, Box | None] | None:
    """:func:`lung_boxes`, or None when ``source`` is None (no crop): what the trainers call."""
    if source is None:
        return None
    return lung_boxes(records, source, margin, cache_root, content_hash, echo)
