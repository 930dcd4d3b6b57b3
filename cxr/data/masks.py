"""Lung masks attached to samples, combined into one label image with the sides kept.

Convention (shared with the phantom's ``Projection.lung_mask``): 0 outside the lungs,
1 the image-left lung (the patient's right in a PA film), 2 the image-right lung. Keeping the
sides apart lets later code measure each lung, or check that a flip swapped them.
Mask files are read through :func:`cxr.data.io.read_bytes`, so ``archive.zip!/member``
references work as well as paths.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from cxr.data.io import read_bytes
from cxr.data.record import Sample
from cxr.errors import DataError

LUNG_IMAGE_LEFT = "lung_image_left"
LUNG_IMAGE_RIGHT = "lung_image_right"
OUTSIDE, IMAGE_LEFT, IMAGE_RIGHT = 0, 1, 2


def read_binary_mask(ref: str) -> np.ndarray:
    """A mask file as a bool (H, W) array: any nonzero gray value is inside.

    Palette and colour files are converted to gray first, because a nonzero palette *index*
    can still be a black colour.
    """
    from PIL import Image, UnidentifiedImageError

    data = read_bytes(ref)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("1", "L", "I", "I;16", "I;16L", "I;16B", "F"):
                im = im.convert("L")
            return np.asarray(im) != 0
    except UnidentifiedImageError:
        raise DataError(ref, "mask is not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(ref, f"corrupt or truncated mask image ({e})") from None


def combine_lung_masks(image_left: np.ndarray, image_right: np.ndarray) -> np.ndarray:
    """uint8 (H, W): 0 outside, 1 where ``image_left`` is set, 2 where ``image_right`` is.

    The two inputs must have one shape and must not overlap (a pixel in both lungs means one
    of the masks is wrong); either violation raises ``ValueError``.
    """
    left = np.asarray(image_left, dtype=bool)
    right = np.asarray(image_right, dtype=bool)
    if left.shape != right.shape:
        raise ValueError(f"mask shapes differ: {left.shape} vs {right.shape}")
    overlap = int(np.count_nonzero(left & right))
    if overlap:
        raise ValueError(f"left and right lung masks overlap in {overlap} pixels")
    out = np.zeros(left.shape, dtype=np.uint8)
    out[left] = IMAGE_LEFT
    out[right] = IMAGE_RIGHT
    return out


def has_lung_mask(sample: Sample) -> bool:
    return LUNG_IMAGE_LEFT in sample.masks and LUNG_IMAGE_RIGHT in sample.masks


def load_lung_mask(sample: Sample) -> np.ndarray:
    """The sample's lung masks as one uint8 (H, W) array: 0 outside, 1 image-left, 2 image-right."""
    if not has_lung_mask(sample):
        raise DataError(sample.image, f"no lung masks (needs masks {LUNG_IMAGE_LEFT!r} and "
                                      f"{LUNG_IMAGE_RIGHT!r}; has {sorted(sample.masks)})")
    left_ref, right_ref = sample.masks[LUNG_IMAGE_LEFT], sample.masks[LUNG_IMAGE_RIGHT]
    try:
        return combine_lung_masks(read_binary_mask(left_ref), read_binary_mask(right_ref))
    except ValueError as e:
        raise DataError(f"{left_ref} + {right_ref}", str(e)) from None


TRUTH_DIR = "phantom_truth"  # the phantom's paired-truth folder (cxr.phantom.writers.TRUTH_DIR; a test keeps them equal)
_TRUTH_DEPTH = 4  # how far above an image its tree's phantom_truth/ can be (tree/CXR_png/x.png: 3)


def read_label_mask(ref: str) -> np.ndarray:
    """A lung label file (0 outside, 1 image-left, 2 image-right; the phantom truth's) as uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(read_bytes(ref))) as im:
            return np.asarray(im.convert("L") if im.mode not in ("L", "P") else im).astype(np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(ref, f"unreadable lung label image ({e})") from None


class LungLabels:
    """Each sample's lung label image from the tree's own masks or, for a phantom tree, from its
    ``phantom_truth/manifest.csv`` (the ``lung_mask`` column; searched in the folders above the
    image), or None. The manifests read are kept in the instance, not in the module."""

    def __init__(self) -> None:
        self._truth: dict[str, dict[str, str]] = {}  # folder -> {image path: lung label file}

    def _manifest(self, folder: Path) -> dict[str, str]:
        key = str(folder)
        if key not in self._truth:
            rows: dict[str, str] = {}
            manifest = folder / TRUTH_DIR / "manifest.csv"
            if manifest.is_file():
                with open(manifest, newline="", encoding="utf-8") as f:
                    for r in csv.DictReader(f):
                        if r.get("image") and r.get("lung_mask"):
                            rows[os.path.normpath(folder / r["image"])] = str(folder / r["lung_mask"])
            self._truth[key] = rows
        return self._truth[key]

    def truth_file(self, image_ref: str) -> str | None:
        """The phantom truth's lung label file of ``image_ref`` (a plain path), or None."""
        if "!/" in image_ref:
            return None
        path = Path(os.path.abspath(image_ref))
        for folder in list(path.parents)[:_TRUTH_DEPTH]:
            hit = self._manifest(folder).get(os.path.normpath(path))
            if hit is not None:
                return hit
        return None

    def __call__(self, sample: Sample) -> np.ndarray | None:
        if has_lung_mask(sample):
            return load_lung_mask(sample)
        ref = self.truth_file(sample.image)
        return read_label_mask(ref) if ref is not None else None
