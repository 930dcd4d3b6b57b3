"""Decoding chest X-ray files into one-channel float images in [0, 1].

Display convention everywhere: bone bright, air dark. ``image_info`` reads only the header
(cheap, for ``datasets inspect`` and mask/image size checks); ``load_image`` decodes pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from cxr.data.io import read_bytes, split_ref
from cxr.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    bit_depth: int  # bits per sample as stored (8, 16, or DICOM BitsStored)
    mode: str  # PIL mode ("L", "I;16", "P", "LA", "RGB", "RGBA", ...) or "DICOM:<photometric>"


def is_dicom_ref(ref: str | Path) -> bool:
    path, member = split_ref(str(ref))
    return (member or path).lower().endswith(DICOM_SUFFIXES)


def image_info(ref: str | Path) -> ImageInfo:
    """Size, bit depth and mode from the file header, without decoding pixels."""
    data = read_bytes(ref)
    if not data:
        raise DataError(ref, "empty file (0 bytes)")
    if is_dicom_ref(ref) or data[128:132] == b"DICM":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as e:  # pydicom raises many types for bad headers
            raise DataError(ref, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
        missing = [k for k in ("Rows", "Columns", "PhotometricInterpretation") if k not in ds]
        if "BitsStored" not in ds and "BitsAllocated" not in ds:
            missing.append("BitsStored")
        if missing:  # no image here (a report, a PDF, a header-only file): say so, not AttributeError
            try:
                has_pixels = "PixelData" in pydicom.dcmread(io.BytesIO(data), force=True)
            except Exception:  # the pixel part is damaged: the missing header elements are the news
                has_pixels = True
            if not has_pixels:
                raise DataError(ref, "DICOM file has no pixel data")
            raise DataError(ref, f"DICOM header lacks {', '.join(missing)}")
        try:
            return ImageInfo(int(ds.Columns), int(ds.Rows), int(ds.get("BitsStored", ds.get("BitsAllocated"))),
                             f"DICOM:{ds.PhotometricInterpretation}")
        except (TypeError, ValueError) as e:
            raise DataError(ref, f"not a readable DICOM header ({type(e).__name__}: {e})") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            depth = 16 if mode in ("I;16", "I;16B", "I;16L", "I") else 8
            if mode == "1":
                depth = 1
            return ImageInfo(im.width, im.height, depth, mode)
    except UnidentifiedImageError:
        raise DataError(ref, "not an image file (unrecognised format)") from None
    except OSError as e:
        raise DataError(ref, f"cannot read image header: {e}") from None


def _pil_to_float(im, ref: str | Path):
    """PIL image (any mode real CXR files use) → float32 (H, W) in [0, 1], one channel."""
    import numpy as np

    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
    if mode == "I":  # PIL opens some 16-bit grayscale PNGs as 32-bit "I"
        arr = np.asarray(im, dtype=np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(ref, f"pixel values {arr.min()}..{arr.max()} do not fit 16 bits")
        return arr.astype(np.float32) / 65535.0
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0
    if mode in ("LA", "La"):  # NIH has some gray+alpha files: the alpha plane is dropped
        return np.asarray(im.getchannel(0), dtype=np.uint8).astype(np.float32) / 255.0
    if mode == "P":  # Shenzhen's palette PNGs: map through the palette, then to gray
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(im, dtype=np.uint8)[..., :3].astype(np.float32)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return rgb[..., 0] / 255.0
        # Rec. 601 luma, as PIL's "L" conversion: a colour file is still read, not rejected.
        return (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0
    raise DataError(ref, f"unsupported image mode {mode!r} (expected grayscale, palette or RGB)")


def _dicom_to_float(data: bytes, ref: str | Path):
    """DICOM → float32 in [0, 1], display convention (MONOCHROME1 inverted).

    Stored values pass the modality LUT (RescaleSlope/Intercept); then the first VOI window,
    when the file has one, maps ``[c - w/2, c + w/2]`` linearly to [0, 1]; otherwise the full
    range the stored bits can hold (after rescale) is mapped to [0, 1], so that a 12-bit image
    keeps its relative contrast instead of being stretched to its own min/max.
    """
    import numpy as np
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:
        raise DataError(ref, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise DataError(ref, "DICOM file has no pixel data")
    allocated = int(ds.get("BitsAllocated", 16))
    stored = int(ds.get("BitsStored", allocated))
    if not 1 <= stored <= allocated:
        raise DataError(ref, f"BitsStored={stored} is outside 1..BitsAllocated={allocated}")
    try:
        raw = ds.pixel_array
    except Exception as e:
        raise DataError(ref, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if raw.ndim == 3 and raw.shape[-1] in (3, 4) and int(ds.get("SamplesPerPixel", 1)) > 1:
        raw = raw[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif raw.ndim != 2:
        raise DataError(ref, f"expected a single 2-D frame, got pixel array of shape {raw.shape}")
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo_raw, hi_raw = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)
    arr = raw.astype(np.float64)
    if arr.min() < lo_raw or arr.max() > hi_raw:
        raise DataError(ref, f"pixel values {arr.min():.0f}..{arr.max():.0f} exceed BitsStored={stored}")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    arr = arr * slope + intercept
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if width <= 0:
            raise DataError(ref, f"WindowWidth={width} is not positive")
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = sorted((lo_raw * slope + intercept, hi_raw * slope + intercept))
    out = np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark; flip to display convention
        out = 1.0 - out
    return out


def load_image(ref: str | Path):
    """Decode one image file into a float32 (H, W) array in [0, 1], bone bright.

    PNG/JPEG in 8- or 16-bit grayscale, gray+alpha, palette, RGB(A); DICOM in MONOCHROME1/2
    with rescale, VOI window and BitsStored honoured. 16-bit sources keep their depth here;
    only the later normalization and cache quantize. Bad files raise a one-line DataError.
    """
    return decode_image(read_bytes(ref), ref)


def decode_image(data: bytes, ref: str | Path):
    """:func:`load_image` of a file's bytes (``ref`` names the file in errors and tells DICOM)."""
    if not data:
        raise DataError(ref, "empty file (0 bytes)")
    if is_dicom_ref(ref) or data[128:132] == b"DICM":
        return _dicom_to_float(data, ref)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _pil_to_float(im, ref)
    except UnidentifiedImageError:
        raise DataError(ref, "not an image file (unrecognised format)") from None
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(ref, f"corrupt or truncated image ({e})") from None


def check_image(ref: str | Path) -> ImageInfo:
    """Header plus an integrity check that is cheaper than decoding.

    PNG/JPEG: PIL's ``verify`` walks every chunk and checksum, which catches truncated files.
    DICOM: the header must parse and carry pixel data of the declared size.
    Raises a one-line DataError; returns the header info otherwise.
    """
    info = image_info(ref)
    data = read_bytes(ref)
    if info.mode.startswith("DICOM:"):
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" not in ds:
            raise DataError(ref, "DICOM file has no pixel data")
        return info
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # PIL raises SyntaxError/OSError/struct.error for damaged files
        raise DataError(ref, f"corrupt or truncated image ({e})") from None
    if info.mode not in _SUPPORTED_MODES:
        raise DataError(ref, f"unsupported image mode {info.mode!r} (expected grayscale, palette or RGB)")
    return info


_SUPPORTED_MODES = frozenset({"1", "L", "LA", "La", "P", "RGB", "RGBA", "RGBX", "I", "F",
                              "I;16", "I;16L", "I;16B", "I;16N"})
