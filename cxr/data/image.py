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
            return ImageInfo(int(ds.Columns), int(ds.Rows), int(ds.get("BitsStored", ds.BitsAllocated)),
                             f"DICOM:{ds.PhotometricInterpretation}")
        except Exception as e:  # pydicom raises many types for bad headers
            raise DataError(ref, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
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
