"""Writing phantom radiographs in the real datasets' exact on-disk layouts.

The phantom's trees must be read by the same loaders as the real downloads, unchanged, so each
writer reproduces its dataset's file names, formats and CSV headers (quirks included):

* Shenzhen: ``ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png``, palette-mode ("P") 8-bit PNGs
  with a gray palette, and ``ClinicalReadings/CHNCXR_0001_0.txt`` ("male 45yrs", then the
  reading; the sex/age line is spelled the several ways the real files spell it).
* Montgomery: ``MontgomerySet/CXR_png/MCUCXR_0001_0.png`` (8-bit "L"), readings with
  ``Patient's Sex: F `` / ``Patient's Age: 027Y`` lines, and ``ManualMask/leftMask|rightMask``
  0/255 lung masks (leftMask = image-left lung = patient's right).
* NIH: ``Data_Entry_2017_v2020.csv``, ``BBox_List_2017.csv`` (header ``...Bbox [x,y,w,h],,,``
  and ``Infiltrate`` for Infiltration, as released), ``images/00000001_000.png``,
  ``train_val_list.txt`` / ``test_list.txt``.
* NIH: every image square at ``--size`` (the release resized every film to 1024 x 1024,
  whatever its aspect); Data_Entry's original size and pixel spacing describe the simulated
  plate, as the real columns describe the original acquisition.
* VinDr: ``train.csv`` (one row per reader per finding; "No finding" rows with empty box
  fields), and either ``train/<image_id>.png`` with ``train_meta.csv`` (original rows/columns;
  boxes in ``train.csv`` are in original pixels, as in the community PNG re-encodings) or, as
  the official release, ``train/<image_id>.dicom`` (the DICOM is the original: boxes in its
  pixels, no train_meta.csv; MONOCHROME1 and MONOCHROME2, the site's bits stored).
* 9-class: ``<Class>/<file>.png`` plus ``nine.csv`` (image, label, source, patient_id, original).
* ``phantom_truth/``: per subject every site's render under one geometry, lung and lesion
  masks, and ``manifest.csv`` with boxes as JSON.

Bit depth: 8-bit PNGs use each site's mode ("P" or "L"). ``bit_depth=16`` writes "I;16" PNGs
holding the acquisition's levels scaled to the full 16-bit range (a 12-bit site still has only
4096 distinct values); a palette cannot hold 16-bit values, so Shenzhen-like images are then
plain 16-bit gray.

Determinism: PNGs carry no timestamps and use a fixed filter and deflate setting, CSV rows are
written in a fixed order, and all wording choices draw from a generator the caller seeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cxr.data.record import NIH14, NINE, VINDR
from cxr.phantom.types import Lesion, Subject

PNG_COMPRESS_LEVEL = 2  # fixed, so the bytes never change (with Z_RLE only 0 vs > 0 matters)
# Run-length matching only: on "Up"-filtered radiographs it is about twice as fast as the default
# match search and the files come out ~10 % smaller (noise leaves few long matches to find);
# masks are runs of one value, exactly what it is for.
PNG_STRATEGY = zlib.Z_RLE
ISAL_LEVEL = 1  # Intel ISA-L's deflate: 3x zlib's Z_RLE speed on 256² radiographs, ~5 % larger


def _deflate_isal(data: bytes | np.ndarray) -> bytes:
    return isal_zlib.compress(data, ISAL_LEVEL)


def _deflate_zlib(data: bytes | np.ndarray) -> bytes:
    z = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 8, PNG_STRATEGY)
    return z.compress(data) + z.flush()


try:  # a dependency (pyproject); zlib only where no isal wheel exists for the platform
    from isal import isal_zlib
except ImportError:  # pragma: no cover - every supported install has isal
    deflate = _deflate_zlib
else:
    deflate = _deflate_isal
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRAY_PALETTE = bytes(v for i in range(256) for v in (i, i, i))

SHENZHEN_DIR = "ChinaSet_AllFiles"
MONTGOMERY_DIR = "MontgomerySet"
TRUTH_DIR = "phantom_truth"
NIH_ENTRY_CSV = "Data_Entry_2017_v2020.csv"
NIH_BOX_CSV = "BBox_List_2017.csv"
NIH_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # three empty columns, as released
NIH_BOX_SPELLING = {"Infiltration": "Infiltrate"}
NIH_BOX_FRAME = 1024  # BBox_List_2017.csv is in the 1024 x 1024 PNGs' pixels
VINDR_HEADER = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")
VINDR_META_HEADER = ("image_id", "dim0", "dim1")
DICOM_SUFFIX = ".dicom"  # VinDr's own spelling
# VinDr DICOMs: a share stored MONOCHROME1 (inverted: the reader flips it back), the rest
# MONOCHROME2, drawn per image; the modality by site (storage-phosphor plates are CR).
MONOCHROME1_SHARE = 0.4
DICOM_MODALITY: dict[str, str] = {"montgomery": "CR"}  # any other site: "DX"
PLATE_FIELD_MM = 430.0  # a 43 cm detector field: both sites' pixel pitch (~143 and ~87 um)
NINE_HEADER = ("image", "label", "source", "patient_id", "original")

# NIH findings → VinDr-CXR local classes (class id = index in VINDR). The VinDr-like tree draws
# NIH co-occurrences renamed through this table; NIH findings absent here (Emphysema, Hernia)
# have no VinDr box class and are not drawn for it.
VINDR_OF: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation", "Infiltration": "Infiltration",
    "Mass": "Nodule/Mass", "Nodule": "Nodule/Mass", "Effusion": "Pleural effusion",
    "Pleural_Thickening": "Pleural thickening", "Pneumothorax": "Pneumothorax",
    "Fibrosis": "Pulmonary fibrosis", "Pneumonia": "Lung Opacity", "Edema": "Lung Opacity",
}




def vindr_class(finding: str) -> str | None:
    """The VinDr class a finding is boxed as (a VinDr name stays itself), or None."""
    return finding if finding in VINDR else VINDR_OF.get(finding)


# --------------------------------------------------------------------------------------------
# Pixels and files
# --------------------------------------------------------------------------------------------

def to_pixels(image: np.ndarray, bits: int, bit_depth: int) -> np.ndarray:
    """Float image in [0, 1] (already on ``2^bits - 1`` levels) → uint8 or uint16 pixels."""
    if bit_depth == 8:
        return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    if bit_depth == 16:
        levels = 2**bits - 1
        q = np.round(np.clip(image, 0, 1) * levels).astype(np.int64)
        return ((q * 65535 + levels // 2) // levels).astype(np.uint16)  # integer: exact levels
    raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))  # the CRC of kind + data, without joining them
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)))


def png_bytes(pixels: np.ndarray, mode: str = "L") -> bytes:
    """Encode a 2-D uint8 ("L", "P" with a gray palette) or uint16 ("I;16") array as PNG.

    A small encoder of our own (one IDAT, the "Up" filter on every row, ISA-L's deflate at a
    fixed level, or zlib's run-length strategy without it) because encoding is a large share of
    the phantom's time per image: it runs several times faster than Pillow's adaptive filtering,
    and it writes exactly the chunks we choose (no timestamps), so the bytes depend on the
    pixels (and on which deflate is installed) only.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ValueError(f"expected a non-empty 2-D image, got shape {pixels.shape}")
    h, w = pixels.shape
    if mode == "I;16":
        if pixels.dtype != np.uint16:
            raise ValueError(f"I;16 needs uint16 pixels, got {pixels.dtype}")
        raw, depth, color = pixels.astype(">u2").view(np.uint8).reshape(h, 2 * w), 16, 0
    elif mode in ("L", "P"):
        if pixels.dtype != np.uint8:
            raise ValueError(f"{mode} needs uint8 pixels, got {pixels.dtype}")
        raw, depth, color = pixels, 8, (3 if mode == "P" else 0)
    else:
        raise ValueError(f"unsupported PNG mode {mode!r}")
    rows = np.empty((h, raw.shape[1] + 1), np.uint8)
    rows[:, 0] = 2  # filter type "Up": each byte minus the byte above (mod 256)
    rows[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])
    parts = [PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))]
    if color == 3:
        parts.append(_chunk(b"PLTE", GRAY_PALETTE))
    parts.append(_chunk(b"IDAT", deflate(rows)))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def image_png(image: np.ndarray, bits: int, bit_depth: int, mode8: str) -> bytes:
    """A radiograph as PNG: ``mode8`` at 8 bits, "I;16" at 16 bits."""
    return png_bytes(to_pixels(image, bits, bit_depth), mode8 if bit_depth == 8 else "I;16")


def mask_png(mask: np.ndarray) -> bytes:
    """A binary mask as a 0/255 8-bit PNG (the Montgomery ManualMask convention)."""
    return png_bytes(np.where(mask, np.uint8(255), np.uint8(0)), "L")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file, making its folder on first use.

    Plain ``os.open``/``os.write``: a phantom run writes several small files per image, and
    Python's buffered file objects (plus a ``mkdir`` attempt per file) cost about as much CPU
    again as the kernel's own work.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    """UTF-8 text, line ends exactly as given."""
    write_bytes(path, text.encode("utf-8"))


def write_csv(path: Path, header: Sequence[str] | str, rows: Iterable[Sequence[Any]]) -> None:
    """CSV with ``\\n`` line ends; a string header is written verbatim (for NIH's odd headers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if isinstance(header, str):
            f.write(header + "\n")
        else:
            csv.writer(f, lineterminator="\n").writerow(header)
        writer = csv.writer(f, lineterminator="\n")
        for row in rows:
            writer.writerow(row)


# --------------------------------------------------------------------------------------------
# Where lesions are, in words
# --------------------------------------------------------------------------------------------

def lesion_site(lesion: Lesion, lung_mask: np.ndarray) -> tuple[str | None, str]:
    """(patient side "right"/"left"/None, zone "upper"/"middle"/"lower") of a lesion.

    The image-left lung (label 1) is the patient's right, as in a PA film.
    """
    labels = lung_mask[lesion.mask]
    ones, twos = int((labels == 1).sum()), int((labels == 2).sum())
    x0, y0, x1, y1 = lesion.box
    side: str | None
    if ones or twos:
        side = "right" if ones >= twos else "left"
    else:
        side = "right" if (x0 + x1) / 2 < lung_mask.shape[1] / 2 else "left"
    rows = np.flatnonzero(lung_mask.any(axis=1))
    top, bottom = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, lung_mask.shape[0])
    rel = ((y0 + y1) / 2 - top) / max(bottom - top, 1)
    zone = "upper" if rel < 0.4 else ("middle" if rel < 0.7 else "lower")
    if getattr(lesion, "region", "lung") == "heart" or lesion.finding == "Cardiomegaly":
        side = None
    return side, zone


def _sides(lesions: Sequence[Lesion], lung_mask: np.ndarray) -> tuple[str, str]:
    """Combined side ("right"/"left"/"bilateral") and dominant zone of a set of lesions."""
    sites = [lesion_site(les, lung_mask) for les in lesions]
    sides = {s for s, _ in sites if s}
    side = "bilateral" if len(sides) > 1 else (sides.pop() if sides else "bilateral")
    zones = [z for _, z in sites]
    zone = max(("upper", "middle", "lower"), key=zones.count) if zones else "upper"
    return side, zone


# --------------------------------------------------------------------------------------------
# Clinical readings
# --------------------------------------------------------------------------------------------

# What each TB lesion kind is called in a reading.
_TB_WORDS = {
    "cavity": "cavitation", "nodule_cluster": "nodular infiltrates", "nodules": "nodules",
    "consolidation": "consolidation", "fibrotic": "fibrotic streaks", "fibrosis": "fibrosis",
    "miliary": "miliary pattern", "effusion": "pleural effusion", "pleural_effusion": "pleural effusion",
}


def _age_text_shenzhen(age: float) -> str:
    if age < 1:
        return f"{max(1, round(age * 12))}month"
    return f"{int(age)}yrs"


def shenzhen_sex_age_line(sex: str, age: float, rng: np.random.Generator) -> str:
    """First line of a Shenzhen reading, in one of the spellings the real files use."""
    word = "female" if sex == "F" else "male"
    age_text = _age_text_shenzhen(age)
    style = rng.choice(6, p=[0.7, 0.1, 0.08, 0.06, 0.03, 0.03])
    if style == 1:
        return f"{word.capitalize()} {age_text}"
    if style == 2:
        return f"{word} , {age_text}"
    if style == 3:
        return f"{word}{age_text}"
    if style == 4 and sex == "F":
        return f"femal {age_text}"
    if style == 5:
        return f"{word}  {age_text}"
    return f"{word} {age_text}"


def shenzhen_reading(sex: str, age: float, lesions: Sequence[Lesion], lung_mask: np.ndarray,
                     tb: bool, rng: np.random.Generator) -> str:
    """ClinicalReadings text of a Shenzhen image: sex/age line, then the reading."""
    first = shenzhen_sex_age_line(sex, age, rng)
    if not tb:
        body = "normal"
    else:
        side, zone = _sides(lesions, lung_mask)
        kinds = [les.kind for les in lesions if les.finding == "Tuberculosis"]
        where = {"bilateral": "Bilateral", "right": "right", "left": "left"}[side]
        templates = [f"{where} PTB",
                     f"{where} PTB, {zone} lobes" if side == "bilateral" else f"{where} {zone} PTB",
                     f"{where} secondary PTB", f"PTB in the {where.lower()} {zone} field"]
        body = templates[int(rng.integers(len(templates)))]
        effusions = [les for les in lesions if les.kind in ("effusion", "pleural_effusion")]
        if effusions:
            body += f" with {_sides(effusions, lung_mask)[0]} pleural effusion"
        elif "cavity" in kinds and rng.random() < 0.6:
            body += " with cavitation"
    sep = "\n\n" if rng.random() < 0.3 else "\n"
    return f"{first}{sep}{body}\n"


def montgomery_reading(sex: str, age: float, lesions: Sequence[Lesion], lung_mask: np.ndarray,
                       tb: bool, rng: np.random.Generator) -> str:
    """ClinicalReadings text of a Montgomery image: ``Patient's Sex``/``Age`` lines, then reading."""
    age_text = f"{max(0, int(age)):03d}Y"
    head = f"Patient's Sex: {sex} \nPatient's Age: {age_text}\n"
    if not tb:
        body = "normal"
    else:
        side, zone = _sides(lesions, lung_mask)
        words = sorted({_TB_WORDS.get(les.kind, "infiltrate") for les in lesions
                        if les.finding == "Tuberculosis"}) or ["infiltrate"]
        where = "bilateral" if side == "bilateral" else f"{side} {zone} lobe"
        body = f"{where} {' and '.join(words[:2])}, TB"
        if rng.random() < 0.3:
            body = body.upper() if rng.random() < 0.5 else body.capitalize()
    return f"{head}\n{body}\n"


# --------------------------------------------------------------------------------------------
# Per-image metadata rows, collected by the generator and written at the end
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TruthBox:
    """One lesion's box in stored-image pixels (x0, y0, x1, y1; exclusive ends)."""

    finding: str
    kind: str
    box: tuple[int, int, int, int]
    region: str = "lung"  # where it must lie: "lung" field, "heart" shadow or "pleura" (effusions)

    def as_json(self) -> dict[str, Any]:
        return {"finding": self.finding, "kind": self.kind, "box": list(self.box), "region": self.region}


@dataclass
class ImageRow:
    """What a tree needs to know about one written image (sizes in stored pixels)."""

    index: int  # subject index
    subject_id: str
    seed: int
    tree: str
    image: str  # path relative to the output folder
    chain: str  # site whose appearance the tree image has
    width: int
    height: int
    original_width: int  # acquisition frame size the image stands for
    original_height: int
    age: float
    sex: str
    view: str
    findings: tuple[str, ...]
    severity: float
    boxes: list[TruthBox] = field(default_factory=list)
    renders: dict[str, str] = field(default_factory=dict)  # chain -> truth image path
    lung_mask: str = ""
    lesion_masks: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # tree-specific (patient id, readers…)


def truth_manifest_rows(rows: Sequence[ImageRow], chains: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    header = ["subject_id", "seed", "age", "sex", "view", "findings", "severity", "tree", "image",
              "geometry", "width", "height"] + [f"render_{c}" for c in chains] + \
             ["lung_mask", "lesion_masks", "boxes"]
    out = []
    for r in rows:
        boxes = [b.as_json() for b in r.boxes]
        out.append([r.subject_id, r.seed, f"{r.age:g}", r.sex, r.view, "|".join(r.findings),
                    f"{r.severity:g}", r.tree, r.image, r.chain, r.width, r.height]
                   + [r.renders.get(c, "") for c in chains]
                   + [r.lung_mask, json.dumps(r.lesion_masks), json.dumps(boxes, separators=(",", ":"))])
    return header, out


TRUTH_README = """Paired ground truth of a phantom dataset (written by `cxr phantom`).

Every subject was exposed once (one pose, one detector frame: its own tree's site geometry)
and developed by every acquisition chain, so the images below are pixel-aligned with each
other and with the masks and boxes:

  <site>/<subject_id>.png      the subject as that site renders it (one folder per site); the
                               one named in the manifest's `geometry` column is byte-identical
                               to the image in the dataset tree (8-bit trees)
  lung/<subject_id>.png        lung labels: 0 outside, 1 image-left lung (patient's right),
                               2 image-right lung
  lesions/<subject_id>_<k>.png lesion k as a 0/255 mask
  manifest.csv                 one row per subject: subject_id, seed, age, sex, view, findings
                               (|-joined), severity, tree, image (path of the tree image),
                               geometry (site whose geometry all renders share), width, height,
                               render_<site> per site, lung_mask, lesion_masks (JSON list),
                               boxes (JSON list of {finding, kind, box: [x0, y0, x1, y1) with
                               exclusive ends, region: "lung", "heart" or "pleura"}), in image pixels.
  settings.json                what made this tree: preset, size, seed, image count, bit depth,
                               difficulty, findings, the CT (anatomy, labels, structures) and
                               every site's full acquisition chain
"""


def write_settings(root: Path, settings: dict[str, Any]) -> Path:
    """``phantom_truth/settings.json``: what made the tree (sorted keys, no timestamps, so the
    same command writes the same bytes)."""
    path = root / TRUTH_DIR / "settings.json"
    write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return path


def write_truth_manifest(root: Path, rows: Sequence[ImageRow], chains: Sequence[str]) -> Path:
    """``phantom_truth/manifest.csv`` (rows in subject order) and a README saying what is where."""
    path = root / TRUTH_DIR / "manifest.csv"
    header, body = truth_manifest_rows(rows, chains)
    write_csv(path, header, body)
    write_text(root / TRUTH_DIR / "README.txt", TRUTH_README)
    return path


# NIH --------------------------------------------------------------------------------------------

def nih_pixel_spacing(width: int, height: int) -> float:
    """Detector pixel pitch (mm) of a 43 cm field at this frame size, to three decimals."""
    return round(PLATE_FIELD_MM / max(width, height), 3)


def write_nih(root: Path, rows: Sequence[ImageRow], test_patients: set[str]) -> None:
    """Data_Entry_2017_v2020.csv, BBox_List_2017.csv and the patient-level split lists.

    ``row.extra`` holds ``patient_id`` (int) and ``follow_up`` (int). Boxes are written in the
    1024 x 1024 frame of the real release's PNGs whatever ``--size`` is, as in the real
    BBox_List (so a tree at another size reads like a user's resized copy of NIH).
    """
    entries, boxes, train, test = [], [], [], []
    for r in sorted(rows, key=lambda r: r.image):
        name = r.image.rsplit("/", 1)[-1]
        labels = nih_labels_text(r.findings)
        spacing = nih_pixel_spacing(r.original_width, r.original_height)
        entries.append([name, labels, r.extra["follow_up"], r.extra["patient_id"], int(r.age), r.sex,
                        r.view, r.original_width, r.original_height, f"{spacing:g}", f"{spacing:g}"])
        sx, sy = NIH_BOX_FRAME / r.width, NIH_BOX_FRAME / r.height
        for b in r.boxes:
            x0, y0, x1, y1 = (v * s for v, s in zip(b.box, (sx, sy, sx, sy)))
            label = NIH_BOX_SPELLING.get(b.finding, b.finding)
            boxes.append([name, label, f"{float(x0):g}", f"{float(y0):g}", f"{float(x1 - x0):g}",
                          f"{float(y1 - y0):g}", "", "", ""])
        (test if str(r.extra["patient_id"]) in test_patients else train).append(name)
    write_csv(root / NIH_ENTRY_CSV, NIH_ENTRY_HEADER, entries)
    write_csv(root / NIH_BOX_CSV, NIH_BOX_HEADER, boxes)
    write_text(root / "train_val_list.txt", "".join(f"{n}\n" for n in train))
    write_text(root / "test_list.txt", "".join(f"{n}\n" for n in test))


# VinDr ------------------------------------------------------------------------------------------

def vindr_image_id(seed: int, index: int) -> str:
    """A 32-hex-digit id like VinDr's, fixed by (seed, index)."""
    return hashlib.md5(f"cxr-phantom:{seed}:{index}".encode()).hexdigest()


def vindr_reader_rows(image_id: str, boxes: Sequence[TruthBox],
                      scale: tuple[float, float], rng: np.random.Generator,
                      n_readers: int = 3, pool: int = 17, p_detect: float = 0.8,
                      jitter: float = 0.06) -> list[list[Any]]:
    """train.csv rows of simulated readers: each boxes each finding it sees, with jitter.

    Every reader misses each finding with probability ``1 - p_detect``, but at least one reader
    marks every finding, so the any-reader label equals the truth. A reader who marks nothing
    writes one "No finding" row (class 14, empty box fields). Box coordinates are in the
    original frame's pixels (``scale`` = original / stored, per axis).
    """
    readers = sorted(rng.choice(pool, size=n_readers, replace=False) + 1)
    seen = rng.random((n_readers, len(boxes))) < p_detect
    if len(boxes):
        missed = ~seen.any(axis=0)
        seen[rng.integers(n_readers, size=int(missed.sum())), np.flatnonzero(missed)] = True
    sx, sy = scale
    rows: list[list[Any]] = []
    for k, reader in enumerate(readers):
        rad = f"R{reader}"
        marked = False
        for j, b in enumerate(boxes):
            if not seen[k, j]:
                continue
            x0, y0, x1, y1 = b.box
            name = vindr_class(b.finding)
            if name is None:
                continue
            w, h = x1 - x0, y1 - y0
            d = rng.normal(0, jitter, 4) * (w, h, w, h)
            bx0, by0 = max(0.0, x0 + d[0]), max(0.0, y0 + d[1])
            bx1, by1 = max(bx0 + 1, x1 + d[2]), max(by0 + 1, y1 + d[3])
            rows.append([image_id, name, VINDR.index(name), rad, f"{bx0 * sx:.1f}", f"{by0 * sy:.1f}",
                         f"{bx1 * sx:.1f}", f"{by1 * sy:.1f}"])
            marked = True
        if not marked:
            rows.append([image_id, "No finding", len(VINDR), rad, "", "", "", ""])
    return rows


def write_vindr(root: Path, rows: Sequence[ImageRow]) -> None:
    """train.csv (rows made by the workers, in ``extra['reader_rows']``) and, for PNG images,
    train_meta.csv (a DICOM is the original itself: its boxes need no rescaling)."""
    ordered = sorted(rows, key=lambda r: r.index)
    write_csv(root / "train.csv", VINDR_HEADER, (row for r in ordered for row in r.extra["reader_rows"]))
    pngs = [r for r in ordered if not r.image.endswith(DICOM_SUFFIX)]
    if pngs:
        write_csv(root / "train_meta.csv", VINDR_META_HEADER,
                  ([r.extra["image_id"], r.original_height, r.original_width] for r in pngs))


def dicom_uid(*parts: object) -> str:
    """A ``2.25.<integer>`` UID fixed by ``parts`` (the same tree, the same UIDs)."""
    digest = hashlib.sha256(":".join(map(str, ("cxr-phantom",) + parts)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"  # 128 bits: at most 39 digits, as 2.25 wants


def radiograph_dicom(image: np.ndarray, bits: int, *, photometric: str, modality: str,
                     patient_id: str, sex: str, age: float, view: str,
                     spacing: tuple[float, float], uids: tuple[str, str, str]) -> bytes:
    """A float image in [0, 1] (on ``2^bits - 1`` levels) as an uncompressed DICOM radiograph.

    ``BitsStored = bits`` in 16 allocated, unsigned; MONOCHROME1 stores ``2^bits - 1 - level``
    (white is zero), so a reader that honours the photometric interpretation shows the same
    image. The modality rescale is the identity (slope 1, intercept 0, as a DX header must
    state) and the VOI window spans the stored range (centre ``2^(bits-1)``, width ``2^bits``:
    the identity under DICOM's linear window function). ``spacing`` is (row, column) in mm;
    ``uids`` are (study, series, SOP instance). No dates or times, so the bytes depend on the
    arguments only.
    """
    import pydicom  # lazy: only --format dicom needs it; the PNG trees stay light
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
    )

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    levels = 2**bits - 1
    q = np.round(np.clip(image, 0, 1) * levels).astype(np.uint16)
    if photometric == "MONOCHROME1":
        q = np.uint16(levels) - q
    sop_class = ComputedRadiographyImageStorage if modality == "CR" else DigitalXRayImageStorageForPresentation
    study, series, sop = uids
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientID = patient_id
    ds.PatientSex = sex
    ds.PatientAge = f"{min(999, max(0, int(age))):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(q.shape[0]), int(q.shape[1])
    ds.PixelSpacing = [f"{spacing[0]:.4f}", f"{spacing[1]:.4f}"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.WindowCenter, ds.WindowWidth = str(2 ** (bits - 1)), str(2**bits)
    ds.PixelData = q.astype("<u2").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def vindr_dicom(image: np.ndarray, bits: int, site: str, subject: Subject, image_id: str,
                frame_size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """``train/<image_id>.dicom`` of a VinDr-like tree: the stored image is the original.

    ``frame_size`` is the simulated plate's (width, height): the pixel spacing is its pitch
    times the plate pixels each stored pixel spans. PatientID is the subject's id (the
    ``subject_id`` of ``phantom_truth/manifest.csv``); one study and one series per image.
    """
    h, w = image.shape
    pitch = PLATE_FIELD_MM / max(frame_size)
    photometric = "MONOCHROME1" if rng.random() < MONOCHROME1_SHARE else "MONOCHROME2"
    uids = (dicom_uid(image_id, "study"), dicom_uid(image_id, "series"), dicom_uid(image_id, "image"))
    return radiograph_dicom(image, bits, photometric=photometric, modality=DICOM_MODALITY.get(site, "DX"),
                            patient_id=subject.subject_id, sex=subject.sex, age=subject.age,
                            view=subject.view, spacing=(pitch * frame_size[1] / h, pitch * frame_size[0] / w),
                            uids=uids)


# 9-class ----------------------------------------------------------------------------------------

def nine_class(findings: Sequence[str]) -> str:
    """The single 9-class label of a subject drawn for the 9-class tree."""
    if not findings:
        return "No Finding"
    if len(findings) != 1 or findings[0] not in NINE:
        raise ValueError(f"9-class subjects need one finding of {NINE}, got {findings}")
    return findings[0]


def write_nine(root: Path, rows: Sequence[ImageRow]) -> None:
    ordered = sorted(rows, key=lambda r: r.image)
    write_csv(root / "nine.csv", NINE_HEADER,
              ([r.image, nine_class(r.findings), f"phantom_{r.chain}", r.subject_id, r.subject_id]
               for r in ordered))


def nih_labels_text(findings: Iterable[str]) -> str:
    names = sorted(f for f in findings if f in NIH14)
    return "|".join(names) if names else "No Finding"
