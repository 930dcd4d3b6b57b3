"""Rewrite a dataset tree image by image: same layout, same files, new pixels.

Translation by a generator (``cxr translate``), classical harmonization (``cxr harmonize``) and
any later image-to-image method share this: every file of the input tree is carried over,
each image a loader lists is replaced by the method's output *at its original size, in its
original file format and mode* (8/16-bit gray, palette with the source's palette, RGB(A)/gray
+alpha with the source's alpha, JPEG, DICOM with its header and VOI/rescale inverted), and
every other file (labels, clinical readings, masks, CSV metadata) is copied unchanged. So the
new tree is read by the same loader as the source, with the same records, labels and masks.
A JSON manifest at the top records what made it.

The output is written to a temporary folder beside ``out`` and renamed into place when
complete, so an interrupted run never leaves a half-written tree behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from cxr.data.dicom import Derivation, mark_derived
from cxr.data.image import is_dicom_ref, load_image
from cxr.data.io import claim_output, naming, read_bytes, split_ref, swap_in_tree
from cxr.data.layouts import load_tree
from cxr.data.record import Sample
from cxr.data.tree import Tree
from cxr.errors import ConfigError, DataError

# A method: (records of the batch, their decoded images (H, W) float in [0, 1]) → new images,
# each the shape of its input, in [0, 1].
BatchTransform = Callable[[Sequence[Sample], list[np.ndarray]], list[np.ndarray]]


# ----------------------------------------------------------------------------------------------
# Writing an image like its source


def encode_like(source: bytes, ref: str, image: np.ndarray, derivation: Derivation | None = None) -> bytes:
    """``image`` (H, W) float in [0, 1] encoded in the format, mode and metadata of ``source``.

    The loaders decode the result back to ``image`` up to the format's quantization. A DICOM
    written with a ``derivation`` is marked as a derived image of ``source`` (new SOP Instance
    UID, the derivation's series, :func:`cxr.data.dicom.mark_derived`); without one its header
    is kept as it is (for images that are measured, not written).
    """
    if is_dicom_ref(ref) or source[128:132] == b"DICM":
        return _encode_dicom(source, ref, image, derivation)
    from PIL import Image

    with Image.open(io.BytesIO(source)) as src:
        src.load()
        fmt = src.format or "PNG"
        mode = src.mode
        if (src.height, src.width) != image.shape:
            raise DataError(ref, f"new image is {image.shape[1]}x{image.shape[0]}, "
                                 f"the source is {src.width}x{src.height}")
        gray8 = Image.fromarray(np.round(image * 255.0).astype(np.uint8), mode="L")
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            out = Image.fromarray(np.round(image * 65535.0).astype(np.uint16))
        elif mode == "L":
            out = gray8
        elif mode == "P":
            # Map onto the source's own palette so its palette (and the loader's path) is kept.
            out = gray8.convert("RGB").quantize(palette=src, dither=Image.Dither.NONE)
            if "transparency" in src.info:
                out.info["transparency"] = src.info["transparency"]
        elif mode == "RGB":
            out = Image.merge("RGB", (gray8, gray8, gray8))
        elif mode in ("RGBA", "RGBX"):
            out = Image.merge("RGBA", (gray8, gray8, gray8, src.getchannel(3)))
        elif mode in ("LA", "La"):
            out = Image.merge("LA", (gray8, src.getchannel(1).convert("L")))
        elif mode == "1":
            out = gray8.convert("1", dither=Image.Dither.NONE)
        elif mode == "F":
            out = Image.fromarray(image.astype(np.float32), mode="F")
        else:
            raise DataError(ref, f"cannot write a translation in image mode {mode!r}")
        buf = io.BytesIO()
        kwargs: dict[str, Any] = {}
        if fmt == "JPEG":
            kwargs = {"quality": 95}
            if out.mode not in ("L", "RGB"):
                out = out.convert("L")
        if "dpi" in src.info:
            kwargs["dpi"] = src.info["dpi"]
        out.save(buf, format=fmt, **kwargs)
        return buf.getvalue()


def _encode_dicom(source: bytes, ref: str, image: np.ndarray, derivation: Derivation | None = None) -> bytes:
    """The source DICOM with new pixel data whose display (as the loader maps it) is ``image``.

    Inverts the loader's chain: photometric (MONOCHROME1 is inverted), VOI window (or the full
    stored range), modality rescale; pixels are written uncompressed (Explicit VR Little Endian,
    whatever the source's transfer syntax: the syntax written is that of the pixels written).
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(source), force=True)
    source_syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) or None
    rows, cols = int(ds.Rows), int(ds.Columns)
    if (rows, cols) != image.shape:
        raise DataError(ref, f"new image is {image.shape[1]}x{image.shape[0]}, the source is {cols}x{rows}")
    allocated = int(ds.get("BitsAllocated", 16))
    stored = int(ds.get("BitsStored", allocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo_raw, hi_raw = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = sorted((lo_raw * slope + intercept, hi_raw * slope + intercept))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    v = image.astype(np.float64)
    if photometric == "MONOCHROME1":
        v = 1.0 - v
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        photometric = "MONOCHROME2"  # a colour DICOM comes back as gray
    raw = np.clip(np.round(((lo + v * (hi - lo)) - intercept) / slope), lo_raw, hi_raw)
    dtype = {8: np.int8 if signed else np.uint8, 16: np.int16 if signed else np.uint16,
             32: np.int32 if signed else np.uint32}.get(allocated)
    if dtype is None:
        raise DataError(ref, f"cannot write DICOM pixels with BitsAllocated={allocated}")
    ds.PixelData = raw.astype(dtype).tobytes()
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    if "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds["PixelData"].VR = "OW" if allocated > 8 else "OB"
    if derivation is not None:
        mark_derived(ds, derivation, source_syntax)
    buf = io.BytesIO()
    # force_encoding: a big-endian or implicit-VR source is re-encoded as the syntax says
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    return buf.getvalue()

# ----------------------------------------------------------------------------------------------
# The tree


class _Decoded(Dataset):
    """Decoding in DataLoader workers; the method runs in the main process."""

    def __init__(self, records: list[Sample]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        return i, load_image(self.records[i].image)


def _collate(items: list) -> tuple[list[int], list[np.ndarray]]:
    return [it[0] for it in items], [it[1] for it in items]


@dataclass(frozen=True)
class RewriteReport:
    out: Path
    layout: str
    images: int  # rewritten
    copied: int


def _relative_images(tree: Tree, records: list[Sample], rels: list[str]) -> dict[str, int]:
    """Relative path in the tree → record index, for every record's image."""
    by_ref = {os.path.normpath(tree.ref(r)) if not tree.is_zip else tree.ref(r): r for r in rels}
    out: dict[str, int] = {}
    for i, rec in enumerate(records):
        key = rec.image if tree.is_zip else os.path.normpath(rec.image)
        rel = by_ref.get(key)
        if rel is None:
            raise DataError(rec.image, f"image listed by the loader is not a file of the tree {tree.name}")
        out[rel] = i
    return out


def check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output folder inside (or containing) the input, a file, or a non-empty folder."""
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents or (src.is_dir() and out_r in src_r.parents):
        raise DataError(out, "the output folder must be outside the input tree (and not contain it)")
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "output folder is not empty (pass --overwrite to replace it)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rewrite_tree(src: str | Path, out: str | Path, transform: BatchTransform, manifest: dict[str, Any],
                 manifest_name: str, layout: str | None = None, batch_size: int = 8, workers: int = 0,
                 overwrite: bool = False, progress: Callable[[int], None] | None = None,
                 derivation: str | None = None, extra_files: dict[str, bytes] | None = None) -> RewriteReport:
    """Write ``src`` (folder or zip) to the folder ``out`` with every image passed through ``transform``.

    ``manifest`` (plus source, layout, counts and a timestamp) is written as ``manifest_name``.
    Every DICOM written is a derived image (:func:`cxr.data.dicom.mark_derived`) of one new
    series for the run, its DerivationDescription ``derivation`` (default: the manifest's name).
    The series UID is in the manifest (``dicom_series_uid``). ``extra_files`` (name -> bytes) are
    written beside the manifest, inside the same atomic rename (e.g. a harmonizer's fitted state).
    """
    src, out = Path(src), Path(out)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    ds = load_tree(src, layout=layout)
    if not ds.records:
        raise DataError(src, f"no images to rewrite (layout {ds.layout})")
    check_out(src, out, overwrite)
    tree = Tree(src)
    rels = tree.files(recursive=True)
    images = _relative_images(tree, ds.records, rels)

    derived = Derivation.new(derivation or f"cxr, {manifest_name.removesuffix('.json')}")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    with claim_output(out), naming(out, tmp):  # one writer per --out, --overwrite or not; OS errors name it
        return _rewrite_claimed(src, out, tmp, ds, tree, rels, images, transform, manifest, manifest_name,
                                batch_size, workers, progress, derived, extra_files or {})


def _rewrite_claimed(src: Path, out: Path, tmp: Path, ds, tree: Tree, rels: list[str], images: dict[str, int],
                     transform: BatchTransform, manifest: dict[str, Any], manifest_name: str, batch_size: int,
                     workers: int, progress: Callable[[int], None] | None,
                     derived: Derivation, extra_files: dict[str, bytes]) -> RewriteReport:
    tmp.mkdir()
    try:
        copied = 0
        for rel in rels:
            if rel in images:
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if tree.is_zip:
                dest.write_bytes(tree.read_bytes(rel))
            else:
                shutil.copy2(src / rel, dest)
            copied += 1
        rel_of = {i: rel for rel, i in images.items()}
        dicoms = 0
        loader = DataLoader(_Decoded(ds.records), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
        for idx, originals in loader:
            new = transform([ds.records[i] for i in idx], originals)
            for i, image, original in zip(idx, new, originals):
                if image.shape != original.shape:
                    raise ValueError(f"transform changed the image shape {original.shape} -> {image.shape}")
                ref = ds.records[i].image
                source = read_bytes(ref)
                data = encode_like(source, split_ref(ref)[1] or ref, np.clip(image, 0.0, 1.0), derived)
                dicoms += is_dicom_ref(ref) or source[128:132] == b"DICM"
                dest = tmp / rel_of[i]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            if progress:
                progress(len(idx))
        full = {"source": str(src), "layout": ds.layout, **manifest, "images": len(images), "copied": copied,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if dicoms:
            full["dicom_series_uid"] = derived.series_uid
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data)
        (tmp / manifest_name).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        swap_in_tree(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RewriteReport(out, ds.layout, len(images), copied)
