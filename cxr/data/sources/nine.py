"""The 9-class set built by :func:`cxr.data.nine.build_nine`: ``<Class>/<file>`` plus ``nine.csv``.

``nine.csv`` (columns image, label, source, patient_id, original) is the authority: it carries
the patient ids and the source dataset of every image, which the folder names cannot. Image
paths in it are relative to the folder holding the CSV and must stay inside it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from cxr.data.csvutil import line_of, outside_root, read_table
from cxr.data.dicom import read_header
from cxr.data.image import DICOM_SUFFIXES
from cxr.data.problems import Problems
from cxr.data.record import NINE, Sample, label_vector
from cxr.data.registry import LoadedDataset, register_layout
from cxr.data.sources.folders import canonical_class
from cxr.data.tree import Tree
from cxr.errors import CxrError, DataError

CSV_NAME = "nine.csv"
COLUMNS: tuple[str, ...] = ("image", "label", "source", "patient_id", "original")
REQUIRED: tuple[str, ...] = ("image", "label", "source", "patient_id")


def _header_fields(ref: str) -> dict:
    """Sex, age, view, spacing and size from a DICOM's header (the patient id is nine.csv's)."""
    if not ref.lower().endswith(DICOM_SUFFIXES):
        return {}
    try:
        return read_header(ref).sample_fields()
    except DataError:  # the image check reports a broken file
        return {}


def _detect(path: Path) -> bool:
    try:
        return Tree(path).is_file(CSV_NAME)
    except (CxrError, OSError):
        return False


@register_layout("nine", detect=_detect, priority=90)  # nine.csv is the most specific marker
def load_nine(root: Path, problems: Problems) -> LoadedDataset:
    """The 9-class set: nine.csv with image, label, source, patient_id (and original)."""
    tree = Tree(root)
    csv_ref = tree.ref(CSV_NAME)
    if not tree.is_file(CSV_NAME):
        problems.report(csv_ref, "file not found (not a 9-class set built by build_nine)")
        return LoadedDataset("nine", root, NINE, [])
    table = read_table(tree.read_bytes(CSV_NAME), csv_ref, {c: (c,) for c in COLUMNS}, REQUIRED, problems)
    if table is None:
        return LoadedDataset("nine", root, NINE, [])
    present = set(tree.files(recursive=True))
    seen: set[str] = set()
    records: list[Sample] = []
    originals = table["original"].tolist() if "original" in table else [""] * len(table)
    for i, (raw, label_text, source, patient, original) in enumerate(zip(
            table["image"], table["label"], table["source"], table["patient_id"], originals)):
        where = f"{csv_ref}:{line_of(i)}"
        if outside_root(raw):
            problems.report(where, f"image path {raw!r} is empty, absolute or points outside {root}")
            continue
        rel = "/".join(p for p in raw.replace("\\", "/").split("/") if p not in ("", "."))
        label = canonical_class(label_text)
        if label not in NINE:
            problems.report(where, f"unknown label {label_text!r} (expected one of {', '.join(NINE)})")
            continue
        if rel not in present:
            problems.report(where, f"image file {rel!r} not found")
            continue
        if rel in seen:
            problems.report(where, f"image {rel!r} listed twice")
            continue
        seen.add(rel)
        source = source or "nine"
        ref = tree.ref(rel)
        records.append(Sample(image=ref, patient_id=patient or PurePosixPath(rel).stem,
                              site=source, labels=label_vector({label}, NINE), label_names=NINE,
                              source=source, extra={"original": original} if original else {},
                              **_header_fields(ref)))
    return LoadedDataset("nine", root, NINE, records)
