"""DICOM headers in, derived DICOMs out.

``read_header`` reads what a loader wants from a DICOM file's header without its pixel data
(``stop_before_pixels``): PatientID, PatientSex, PatientAge ("045Y", "006M", "010D" → years),
ViewPosition, PixelSpacing (else ImagerPixelSpacing) and Rows/Columns. Loaders take these over
the file name, which stays the fallback.

``mark_derived`` gives a DICOM whose pixels a method replaced (``cxr harmonize``, ``cxr
translate``) its own identity, as PS3.3 C.7.6.1 and C.12.1 ask of a derived image: a new SOP
Instance UID (and file meta Media Storage SOP Instance UID), one new Series Instance UID for
everything one run writes, ImageType ``DERIVED\\SECONDARY\\…``, a DerivationDescription naming
the method, and the original referenced in the Source Image Sequence.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.data.io import _open_zip, split_ref
from cxr.data.record import VIEWS
from cxr.errors import DataError

# DICOM Age String (VR AS): nnnD, nnnW, nnnM or nnnY. Some writers drop the zeros or the unit.
_AGE = re.compile(r"(\d{1,3})\s*([DWMY]?)", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1.0 / 365.25, "W": 7.0 / 365.25, "M": 1.0 / 12.0, "Y": 1.0, "": 1.0}
_SEXES = {"M": "M", "F": "F", "O": "O"}
_VIEWS = {v: v for v in VIEWS} | {"LATERAL": "LL", "LAT": "LL"}
# Lossy transfer syntaxes: a derived image of such a source carries LossyImageCompression "01".
_LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
          "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}
DESCRIPTION_MAX = 1024  # DerivationDescription is an ST: at most 1024 characters


def parse_age(text: str) -> float | None:
    """Years from a DICOM age string: ``"045Y"`` → 45, ``"006M"`` → 0.5, ``"010D"`` → 10/365.25.

    None for an empty or unreadable value (a header is evidence, not a contract)."""
    m = _AGE.fullmatch(str(text).strip())
    if m is None:
        return None
    return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]


@dataclass(frozen=True)
class DicomHeader:
    """What a loader takes from a DICOM header; None where the header lacks the element."""

    patient_id: str | None
    sex: str | None  # one of cxr.data.record.SEXES
    age: float | None  # years
    view: str | None  # one of cxr.data.record.VIEWS
    view_position: str | None  # ViewPosition as written (e.g. "RL", which is no VIEWS value)
    pixel_spacing: tuple[float, float] | None  # mm, (x, y)
    size: tuple[int, int] | None  # (width, height) = (Columns, Rows)

    def sample_fields(self) -> dict[str, Any]:
        """The :class:`~cxr.data.record.Sample` fields the header fills (those it has)."""
        fields = {"sex": self.sex, "age": self.age, "view": self.view,
                  "pixel_spacing": self.pixel_spacing, "original_size": self.size}
        return {k: v for k, v in fields.items() if v is not None}


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _spacing(ds) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = (float(v) for v in value)  # DICOM order: row spacing (y), column spacing (x)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return col, row
    return None


def _size(ds) -> tuple[int, int] | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    return (cols, rows) if rows > 0 and cols > 0 else None


def header_of(ds) -> DicomHeader:
    """:class:`DicomHeader` of a pydicom dataset."""
    view_position = _text(ds, "ViewPosition")
    sex = _text(ds, "PatientSex")
    age = _text(ds, "PatientAge")
    return DicomHeader(
        patient_id=_text(ds, "PatientID"),
        sex=_SEXES.get(sex.upper()) if sex else None,
        age=parse_age(age) if age else None,
        view=_VIEWS.get(view_position.upper()) if view_position else None,
        view_position=view_position,
        pixel_spacing=_spacing(ds),
        size=_size(ds),
    )


def read_header(ref: str | Path) -> DicomHeader:
    """The header of the DICOM file (or zip member) ``ref``, read without its pixel data."""
    import pydicom

    path, member = split_ref(str(ref))
    try:
        if member is None:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        else:
            with _open_zip(path).open(member) as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        return header_of(ds)
    except FileNotFoundError:
        raise DataError(ref, "file not found") from None
    except Exception as e:  # pydicom raises many types for a damaged header
        raise DataError(ref, f"not a readable DICOM file ({type(e).__name__}: {e})") from None


class HeaderFields:
    """Sample fields of DICOM files from their headers, a fallback patient id where the header
    has none; :meth:`notice` then says once (one line, not one per file) how many fell back.

    A header that cannot be read falls back too: the image check (``datasets inspect``, the
    decoder) reports the broken file itself.
    """

    def __init__(self, fallback: str = "the file name"):
        self.fallback = fallback  # what the fallback id is, for the notice
        self.files = 0
        self.fallbacks = 0
        self.ids: set[str] = set()

    def __call__(self, ref: str, fallback_id: str) -> dict[str, Any]:
        """``patient_id`` and the header's sex, age, view, pixel spacing and size, for ``Sample``."""
        try:
            header = read_header(ref)
        except DataError:
            header = None
        self.files += 1
        fields = header.sample_fields() if header is not None else {}
        if header is None or header.patient_id is None:
            self.fallbacks += 1
            fields["patient_id"] = fallback_id
        else:
            self.ids.add(header.patient_id)
            fields["patient_id"] = header.patient_id
        return fields

    def notice(self, where: str | Path) -> None:
        """One line on stderr when some files fell back to their file name, or all share one id."""
        if self.fallbacks:
            print(f"cxr: note: {where}: {self.fallbacks} of {self.files} DICOM files have no PatientID; "
                  f"their patient id is {self.fallback}", file=sys.stderr)
        if len(self.ids) == 1 and self.files - self.fallbacks > 1:
            print(f"cxr: note: {where}: all {self.files - self.fallbacks} DICOM files with a PatientID share "
                  f"{next(iter(self.ids))!r} (one patient: they fall into one split)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Derived images


@dataclass(frozen=True)
class Derivation:
    """What every DICOM one run writes shares: its new series and how its pixels were made."""

    series_uid: str
    description: str

    @classmethod
    def new(cls, description: str) -> Derivation:
        """A fresh series for one run of a method described by ``description``."""
        from pydicom.uid import generate_uid

        text = " ".join(description.split())
        if len(text) > DESCRIPTION_MAX:
            text = text[: DESCRIPTION_MAX - 1] + "…"
        return cls(generate_uid(), text)


def mark_derived(ds, derivation: Derivation, source_transfer_syntax: str | None = None) -> None:
    """Give the pydicom dataset ``ds``, whose pixel data was replaced, a derived image's identity.

    The original's SOP Class and Instance UIDs go into the Source Image Sequence; ImageType
    becomes ``DERIVED\\SECONDARY`` followed by the original's values after its first two.
    ``source_transfer_syntax`` lossy (JPEG, JPEG 2000): LossyImageCompression becomes "01".
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    source = Dataset()
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    sop_instance = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    if sop_class:
        source.ReferencedSOPClassUID = sop_class
    if sop_instance:
        source.ReferencedSOPInstanceUID = sop_instance
    if len(source):
        ds.SourceImageSequence = Sequence([source])
    new_uid = generate_uid()
    ds.SOPInstanceUID = new_uid
    ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    if sop_class:
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SeriesInstanceUID = derivation.series_uid
    old = ds.get("ImageType")
    values = [str(v) for v in old] if old is not None and not isinstance(old, str) else ([old] if old else [])
    ds.ImageType = ["DERIVED", "SECONDARY", *values[2:]]
    ds.DerivationDescription = derivation.description
    if source_transfer_syntax in _LOSSY and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
