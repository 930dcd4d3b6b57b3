"""Building the 9-class chest X-ray set from four public sources.

Classes (:data:`~cxr.data.record.NINE`): Edema, No Finding, Pneumonia, Tuberculosis,
Cardiomegaly, Emphysema, Covid, Effusion, Atelectasis. Each class comes from exactly one source:

* NIH ChestX-ray14: the *single-label* images of Edema, Cardiomegaly, Emphysema, Effusion and
  Atelectasis (exactly one finding) and No Finding (no finding at all). NIH Pneumonia is not
  taken, although NIH has that label: the set's definition also says "Pneumonia only from the
  pneumonia source", and we follow that rule so that the class has one origin like the others.
* the Covid source (any class-folder tree, e.g. ``kaggle_pct``): its Covid class only;
* the pneumonia source (e.g. ``kaggle_pneumonia``): its Pneumonia class only;
* the TB source (e.g. ``tb_database``, or an NLM TB set): its Tuberculosis class only.

The result is a folder-per-class tree ``out/<Class>/<file>`` plus ``out/nine.csv`` (image,
label, source, patient_id, original), read back by the ``nine`` layout.
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from cxr.data.io import read_bytes, split_ref
from cxr.data.layouts import LoadedDataset, load_tree
from cxr.data.record import NINE, Sample
from cxr.data.sources.nine import COLUMNS, CSV_NAME
from cxr.errors import CxrError

NIH_CLASSES: tuple[str, ...] = ("Edema", "Cardiomegaly", "Emphysema", "Effusion", "Atelectasis")
"""NIH findings taken when they are an image's only finding (plus No Finding)."""

CONFOUNDING_CAVEAT = (
    "caveat: in this 9-class set source and class are confounded -- Covid, Pneumonia and "
    "Tuberculosis each come from a single other dataset than the NIH classes, so a classifier "
    "can separate them by hospital, scanner and preprocessing instead of by disease; treat its "
    "scores as an upper bound and test across sources before drawing clinical conclusions."
)


@dataclass(frozen=True)
class _Pick:
    label: str
    sample: Sample
    source: str


def _load(path: Path, role: str, skip_bad: bool) -> LoadedDataset:
    """Load one source tree (layout auto-detected); a wrong tree is one line naming the role."""
    try:
        return load_tree(path, skip_bad=skip_bad)
    except CxrError as e:
        raise CxrError(f"{role} source: {e}") from None


def _nih_picks(ds: LoadedDataset, path: Path) -> list[_Pick]:
    """Single-label NIH images of the NIH classes, and the images with no finding."""
    needed = set(NIH_CLASSES)
    # NIH says "No Finding" with the all-zero vector; a label set that has it as a class (NINE)
    # is a class-folder tree, where "no finding among the labels" would mean something else.
    if not needed <= set(ds.label_names) or "No Finding" in ds.label_names:
        raise CxrError(f"{path}: not an NIH ChestX-ray14 tree (found layout {ds.layout!r} with "
                       f"labels {', '.join(ds.label_names)})")
    picks = []
    for s in ds.records:
        if np.isnan(s.labels).any():  # not fully labelled: cannot say it is single-label
            continue
        found = s.findings
        if not found:
            picks.append(_Pick("No Finding", s, s.site or "nih"))
        elif len(found) == 1 and found[0] in needed:
            picks.append(_Pick(found[0], s, s.site or "nih"))
    if not picks:
        raise CxrError(f"{path}: no single-label NIH images of {', '.join(('No Finding',) + NIH_CLASSES)}")
    return picks


def _class_picks(ds: LoadedDataset, path: Path, label: str, role: str) -> list[_Pick]:
    """The images of one class of a source tree."""
    picks = [_Pick(label, s, s.site or role) for s in ds.records if s.label(label) == 1]
    if not picks:
        raise CxrError(f"{path}: no {label} images in the {role} source "
                       f"(layout {ds.layout!r}, classes: {', '.join(ds.label_names) or 'none'})")
    return picks


def _check_out(out: Path) -> None:
    if out.is_symlink() or out.is_file():
        raise CxrError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise CxrError(f"{out}: output folder is not empty; refusing to overwrite it")


def _place(ref: str, dst: Path, link: bool) -> None:
    """Put the image ``ref`` at ``dst``: hard link, else symlink, else copy (``link=False``:
    always copy). Zip members are always extracted copies."""
    path, member = split_ref(ref)
    if member is not None:
        dst.write_bytes(read_bytes(ref))
        return
    src = Path(path)
    if not src.is_file():
        raise CxrError(f"{src}: image file not found")
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed there
            pass
        try:
            os.symlink(os.path.abspath(src), dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _file_name(ref: str, taken: set[str]) -> str:
    """The image's own file name, made unique within its class folder (case-insensitively)."""
    path, member = split_ref(ref)
    name = PurePosixPath(member if member is not None else Path(path).as_posix()).name
    stem, suffix = PurePosixPath(name).stem, PurePosixPath(name).suffix
    n = 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}_{n}{suffix}"
    taken.add(name.lower())
    return name


def build_nine(nih: Path, covid: Path, pneumonia: Path, tb: Path, out: Path, link: bool = True,
               *, skip_bad: bool = False) -> dict[str, int]:
    """Merge the four sources into the 9-class tree at ``out``; return the image count per class.

    ``out`` must not exist or be an empty folder. The tree is built in a temporary folder beside
    ``out`` and renamed into place at the end, so an interrupted build never leaves a partial
    set. ``link`` places hard links (or symlinks) to the source files where the file system
    allows, copies otherwise; ``skip_bad`` loads the sources in skip mode.
    """
    nih, covid, pneumonia, tb, out = map(Path, (nih, covid, pneumonia, tb, out))
    _check_out(out)
    picks = _nih_picks(_load(nih, "NIH", skip_bad), nih)
    picks += _class_picks(_load(covid, "Covid", skip_bad), covid, "Covid", "covid")
    picks += _class_picks(_load(pneumonia, "pneumonia", skip_bad), pneumonia, "Pneumonia", "pneumonia")
    picks += _class_picks(_load(tb, "TB", skip_bad), tb, "Tuberculosis", "tb")
    picks.sort(key=lambda p: (NINE.index(p.label), p.sample.image))

    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same file system, so the final rename is atomic; mkdir (not
    # mkdtemp) so the finished folder gets the user's usual permissions.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    counts = {name: 0 for name in NINE}
    try:
        taken: dict[str, set[str]] = {name: set() for name in NINE}
        rows = []
        for p in picks:
            folder = tmp / p.label
            folder.mkdir(exist_ok=True)
            name = _file_name(p.sample.image, taken[p.label])
            _place(p.sample.image, folder / name, link)
            rows.append({"image": f"{p.label}/{name}", "label": p.label, "source": p.source,
                         "patient_id": p.sample.patient_id, "original": p.sample.image})
            counts[p.label] += 1
        with open(tmp / CSV_NAME, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
        _check_out(out)  # it may have been filled while we were building
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
