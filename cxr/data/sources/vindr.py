"""VinDr-CXR as released for the Kaggle "VinBigData Chest X-ray Abnormalities Detection".

Dataset card
    Nguyen HQ, Lam K, Le LT, et al. "VinDr-CXR: An open dataset of chest X-rays with
    radiologist's annotations." Scientific Data 9, 429 (2022). https://vindr.ai/datasets/cxr ;
    Kaggle ``vinbigdata-chest-xray-abnormalities-detection`` (DICOM) and community PNG
    re-encodings such as the 256x256 one with ``train_meta.csv``.

    15,000 training images from two Vietnamese hospitals, each read independently by three of
    17 radiologists (R1..R17) who boxed 14 findings (class ids 0..13) or said "No finding"
    (class 14, no box). ``patient_id`` is the DICOM header's PatientID where it has one (sex,
    age, view, pixel spacing and size come from the header too), else the image id (the
    Kaggle release anonymizes patients; said once per tree); its test images have no labels
    and are not loaded.

Label rule: an image is positive for a class when *any* of its readers marked it (readers
disagree often, and a box drawn by one expert is evidence we do not want to vote away); all
other classes are 0, so "No finding" from every reader is the all-zero vector. Every reader's
boxes are kept, with ``Box.reader`` = ``rad_id``, so a consensus rule can be applied later.

On-disk layout (a folder or a zip archive)::

    train.csv        image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max
    train/<image_id>.dicom | .dcm | .png
    train_meta.csv   image_id,dim0,dim1  (original rows, columns) for resized PNGs

Boxes in train.csv are in original pixels. When the stored image is a PNG and train_meta.csv
gives its original size, boxes are rescaled to the stored pixels: ``x * W_stored / dim1``,
``y * H_stored / dim0``; without train_meta.csv they are kept as written.
"""

from __future__ import annotations

import struct
import zipfile
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.data.csvutil import header_columns, line_of, outside_root, read_table
from cxr.data.dicom import HeaderFields
from cxr.data.image import DICOM_SUFFIXES, image_info
from cxr.data.io import _open_zip, split_ref
from cxr.data.problems import Problems
from cxr.data.record import VINDR, Box, Sample, label_vector
from cxr.data.registry import LoadedDataset, register_layout
from cxr.data.tree import Tree
from cxr.errors import CxrError, DataError

SITE = "vindr"
TRAIN_CSV = "train.csv"
META_CSV = "train_meta.csv"
IMAGE_DIR = "train"
NO_FINDING_ID = len(VINDR)  # 14
NO_FINDING = "No finding"
CLASS_NAMES = VINDR + (NO_FINDING,)
IMAGE_SUFFIXES = (".dicom", ".dcm", ".png")  # preference order when several exist
TRAIN_COLUMNS = {c: (c,) for c in
                 ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")}
META_COLUMNS = {c: (c,) for c in ("image_id", "dim0", "dim1")}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_Row = namedtuple("_Row", tuple(TRAIN_COLUMNS))


@dataclass
class _Reading:
    """What all readers said about one image, gathered over its train.csv rows."""

    line: int  # first line of the image in train.csv
    classes: set[int] = field(default_factory=set)
    boxes: list[Box] = field(default_factory=list)
    readers: set[str] = field(default_factory=set)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _id_problem(image_id: str) -> str | None:
    if not image_id:
        return "empty 'image_id'"
    if outside_root(image_id):
        return f"'image_id' {image_id!r} points outside the dataset root"
    if "/" in image_id or "\\" in image_id:
        return f"'image_id' {image_id!r} must be a plain id, not a path"
    return None


def _row_problem(row: _Row, reading: _Reading) -> str | None:
    """Check one train.csv row; on success add it to ``reading`` and return None."""
    if row.class_name not in CLASS_NAMES:
        return f"unknown finding {row.class_name!r} in 'class_name' (known: {', '.join(CLASS_NAMES)})"
    if not row.class_id.isdecimal() or int(row.class_id) > NO_FINDING_ID:
        return f"'class_id' {row.class_id!r} is not a class id 0..{NO_FINDING_ID}"
    class_id = int(row.class_id)
    if CLASS_NAMES[class_id] != row.class_name:
        return (f"'class_name' {row.class_name!r} does not match 'class_id' {class_id} "
                f"({CLASS_NAMES[class_id]!r})")
    box = None
    if class_id != NO_FINDING_ID:  # "No finding" rows carry no box
        coords = {}
        for name in ("x_min", "y_min", "x_max", "y_max"):
            value = _number(getattr(row, name))
            if value is None:
                return f"{name!r} {getattr(row, name)!r} is not a number (a finding needs a box)"
            coords[name] = value
        for lo, hi in (("x_min", "x_max"), ("y_min", "y_max")):
            if coords[hi] < coords[lo]:
                return f"box with {hi} < {lo} ({hi}={coords[hi]:g}, {lo}={coords[lo]:g})"
        box = Box(row.class_name, coords["x_min"], coords["y_min"], coords["x_max"],
                  coords["y_max"], reader=row.rad_id or None)
    reading.classes.add(class_id)
    if row.rad_id:
        reading.readers.add(row.rad_id)
    if box is not None:
        reading.boxes.append(box)
    return None


def _read_annotations(tree: Tree, problems: Problems) -> dict[str, _Reading] | None:
    """Image id -> its readings, in first-appearance order; a bad row drops its whole image."""
    where = tree.ref(TRAIN_CSV)
    raw = read_table(tree.read_bytes(TRAIN_CSV), where, TRAIN_COLUMNS, tuple(TRAIN_COLUMNS), problems)
    if raw is None:
        return None
    readings: dict[str, _Reading] = {}
    bad: set[str] = set()
    rows = map(_Row._make, zip(*(raw[c].tolist() for c in _Row._fields)))  # fast row access
    for i, row in enumerate(rows):
        if row.image_id in bad:
            continue
        reading = readings.get(row.image_id)
        if reading is None:
            problem = _id_problem(row.image_id)
            reading = readings[row.image_id] = _Reading(line_of(i))
        else:
            problem = None
        problem = problem or _row_problem(row, reading)
        if problem is not None:
            readings.pop(row.image_id, None)
            bad.add(row.image_id)
            problems.report(f"{where}:{line_of(i)}", problem)
    return readings


def _read_meta(tree: Tree, problems: Problems) -> dict[str, tuple[int, int]] | None:
    """Image id -> original (rows, columns) from train_meta.csv; None when there is no such file."""
    if not tree.is_file(META_CSV):
        return None
    where = tree.ref(META_CSV)
    raw = read_table(tree.read_bytes(META_CSV), where, META_COLUMNS, tuple(META_COLUMNS), problems)
    if raw is None:
        return {}
    dims: dict[str, tuple[int, int]] = {}
    for i, row in enumerate(raw.itertuples(index=False)):
        if not (row.dim0.isdecimal() and row.dim1.isdecimal() and int(row.dim0) > 0 and int(row.dim1) > 0):
            problems.report(f"{where}:{line_of(i)}",
                            f"'dim0'/'dim1' {row.dim0!r}/{row.dim1!r} are not positive whole numbers")
            continue
        dims[row.image_id] = (int(row.dim0), int(row.dim1))
    return dims


def _index_images(tree: Tree, problems: Problems) -> dict[str, str] | None:
    """Image id -> relative path of its file in train/ (DICOM preferred over PNG)."""
    if not tree.is_dir(IMAGE_DIR):
        problems.report(tree.name, f"no {IMAGE_DIR}/ image folder")
        return None
    index: dict[str, str] = {}
    rank: dict[str, int] = {}
    for rel in tree.files(IMAGE_DIR):
        name = rel.rsplit("/", 1)[-1]
        stem, dot, suffix = name.rpartition(".")
        order = IMAGE_SUFFIXES.index(f".{suffix.lower()}") if f".{suffix.lower()}" in IMAGE_SUFFIXES else -1
        if not dot or order < 0:
            continue
        if stem not in rank or order < rank[stem]:
            index[stem], rank[stem] = rel, order
    if not index:
        problems.report(tree.ref(IMAGE_DIR), "image folder holds no DICOM (.dicom/.dcm) or PNG images")
        return None
    return index


def _png_size(ref: str) -> tuple[int, int]:
    """(width, height) of a PNG from its IHDR chunk: the first 24 bytes, not the whole file."""
    path, member = split_ref(ref)
    try:
        if member is None:
            with open(path, "rb") as f:
                head = f.read(24)
        else:
            with _open_zip(path).open(member) as f:
                head = f.read(24)
    except FileNotFoundError:
        raise DataError(ref, "file not found") from None
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(ref, f"cannot read: {e}") from None
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        info = image_info(ref)  # not a plain PNG header: let the decoder say what it is
        return info.width, info.height
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _scaled(box: Box, sx: float, sy: float) -> Box:
    return Box(box.label, box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy, reader=box.reader)


def load_vindr(root: str | Path, problems: Problems | None = None,
               require_images: bool = True) -> LoadedDataset:
    """Load the VinDr-CXR training tree (DICOM, or PNG with train_meta.csv) as VINDR samples.

    With ``require_images=False`` every annotated image becomes a sample whether or not its
    file is present (``image`` then names ``train/<id>.dicom``) and boxes keep the original
    pixel coordinates, since the stored size cannot be read.
    """
    sink = problems if problems is not None else Problems()
    result = _load_vindr(root, sink, require_images)
    result.problems = list(sink.items)
    return result


def _load_vindr(root: str | Path, problems: Problems, require_images: bool) -> LoadedDataset:
    root = Path(root)
    tree = Tree(root)
    result = LoadedDataset(SITE, root, VINDR, [])
    if not tree.is_file(TRAIN_CSV):
        problems.report(tree.name, f"no {TRAIN_CSV} (VinDr-CXR annotations)")
        return result
    readings = _read_annotations(tree, problems)
    if readings is None:
        return result
    meta = _read_meta(tree, problems)
    index: dict[str, str] = {}
    if require_images:
        found = _index_images(tree, problems)
        if found is None:
            return result
        index = found
    where = tree.ref(TRAIN_CSV)
    headers = HeaderFields("the image id (the file name)")
    for image_id, reading in readings.items():
        at = f"{where}:{reading.line}"
        rel = index.get(image_id)
        if rel is None:
            if require_images:
                problems.report(at, f"image {image_id!r} is listed but {IMAGE_DIR}/{image_id}"
                                    ".dicom/.dcm/.png is not found")
                continue
            rel = f"{IMAGE_DIR}/{image_id}{IMAGE_SUFFIXES[0]}"
        ref = tree.ref(rel)
        dims = meta.get(image_id) if meta is not None else None
        boxes = reading.boxes
        if require_images and meta is not None and rel.lower().endswith(".png") and boxes:
            if dims is None:
                problems.report(at, f"image {image_id!r} has no row in {META_CSV}, so its boxes "
                                    "cannot be rescaled to the stored PNG")
                continue
            try:
                width, height = _png_size(ref)
            except DataError as e:
                problems.report(e.where, e.problem)
                continue
            rows, cols = dims
            boxes = [_scaled(b, width / cols, height / rows) for b in boxes]
        fields = {"patient_id": image_id, "original_size": None if dims is None else (dims[1], dims[0])}
        if require_images and rel.lower().endswith(DICOM_SUFFIXES):
            fields.update(headers(ref, image_id))  # PatientID, sex, age, view, spacing, size
        result.records.append(Sample(
            image=ref,
            site=SITE,
            labels=label_vector([VINDR[c] for c in reading.classes if c != NO_FINDING_ID], VINDR),
            label_names=VINDR,
            boxes=boxes,
            split="train",
            source="real",
            extra={"readers": tuple(sorted(reading.readers, key=lambda r: (len(r), r)))},
            **fields,
        ))
    headers.notice(tree.name)
    return result


def detect_vindr(root: Path) -> bool:
    try:
        tree = Tree(root)
        if not (tree.is_file(TRAIN_CSV) and tree.is_dir(IMAGE_DIR)):
            return False
        columns = header_columns(tree.read_bytes(TRAIN_CSV), tree.ref(TRAIN_CSV))
    except CxrError:
        return False
    return set(TRAIN_COLUMNS) <= set(columns)


@register_layout("vindr", detect=detect_vindr, priority=60,  # train.csv columns + train/
                 description="VinDr-CXR (train.csv + train/ DICOM or PNG, optional train_meta.csv)")
def load_vindr_layout(root: Path, problems: Problems) -> LoadedDataset:
    """VinDr-CXR (train.csv + train/ DICOM or PNG, optional train_meta.csv)."""
    return load_vindr(root, problems)
