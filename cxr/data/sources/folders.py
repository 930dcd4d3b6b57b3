"""Folder-per-class datasets: one folder of images per class, optionally under split folders.

Many public chest X-ray sets are shipped this way, and three Kaggle downloads have fixed shapes
that get their own layout, site name and patient-id rules:

* ``kaggle_pneumonia`` -- "Chest X-Ray Images (Pneumonia)" (Kermany et al., Cell 2018; the
  Guangzhou Women and Children's Medical Center paediatric films):
  ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. The archive also holds a nested
  duplicate ``chest_xray/chest_xray/`` (and ``__MACOSX/`` junk, which :class:`Tree` hides);
  the duplicate is skipped so no image is counted twice. Patient ids come from file names:
  ``person{N}_bacteria_{M}`` / ``person{N}_virus_{M}`` -> ``person{N}``, ``IM-{N}-{M}`` and
  ``NORMAL2-IM-{N}-{M}`` -> ``IM-{N}``.
* ``kaggle_pct`` -- "Chest X-Ray (Pneumonia, Covid-19, Tuberculosis)":
  ``{train,val,test}/{COVID19,NORMAL,PNEUMONIA,TURBERCULOSIS}/`` (sic).
* ``tb_database`` -- "Tuberculosis (TB) Chest X-ray Database" (Rahman et al., IEEE Access
  2020): ``TB_Chest_Radiography_Database/{Normal,Tuberculosis}/*.png`` with
  ``Normal.metadata.xlsx`` / ``Tuberculosis.metadata.xlsx`` (FILE NAME, FORMAT, SIZE, URL); the
  URL of the collection each image came from is kept in ``sample.extra["source_url"]``.
* ``folders`` -- any other folder-per-class tree of PNG, JPEG or DICOM files. Its site is the
  dataset folder's name and a patient id is the file stem unless the name says better.

Class folder names are matched to canonical names case-insensitively, ignoring spaces, ``_``
and ``-`` (``NORMAL`` -> "No Finding", ``COVID-19`` -> "Covid", ``TB`` -> "Tuberculosis", ...).
Labels are one-hot over :data:`~cxr.data.record.NINE` when every class maps into it, otherwise
over the sorted class names (unmapped folder names kept as they are).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from cxr.data.dicom import HeaderFields
from cxr.data.image import DICOM_SUFFIXES
from cxr.data.problems import Problems
from cxr.data.provenance import GENERATION_LABELS_CSV
from cxr.data.record import NINE, Sample, label_vector
from cxr.data.registry import LoadedDataset, register_layout
from cxr.data.tree import Tree
from cxr.errors import CxrError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")

SPLIT_NAMES: dict[str, str] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


def _key(name: str) -> str:
    """Comparison key of a folder name: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


CLASS_ALIASES: dict[str, str] = {
    **{_key(n): n for n in NINE},
    "normal": "No Finding",
    "covid": "Covid",
    "covid19": "Covid",
    "tuberculosis": "Tuberculosis",
    "turberculosis": "Tuberculosis",  # the spelling used by the kaggle_pct download
    "tb": "Tuberculosis",
}


def canonical_class(folder: str) -> str | None:
    """Canonical class name for a class folder name, or None when it is not a known alias."""
    return CLASS_ALIASES.get(_key(folder))


_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+$", re.IGNORECASE)
_IM = re.compile(r"^(?:NORMAL2-)?(IM-\d+)-\d+$", re.IGNORECASE)


def patient_id_from_name(stem: str) -> str:
    """Patient id encoded in a Kaggle pneumonia file name, else the stem itself.

    ``person12_virus_34`` -> ``person12``; ``IM-0115-0001`` and ``NORMAL2-IM-0927-0001`` ->
    ``IM-0115`` / ``IM-0927``. Several films of one patient then share an id, which keeps them in
    one split.
    """
    for pattern in (_PERSON, _IM):
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _is_image(relpath: str) -> bool:
    return relpath.lower().endswith(IMAGE_SUFFIXES)


def _open(path: Path) -> Tree | None:
    """The tree at ``path``, or None when it is neither a folder nor a zip (for detectors)."""
    try:
        return Tree(path)
    except (CxrError, OSError):
        return None


# Finding the class folders ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClassDir:
    """One class folder: its path in the tree, its name on disk and the split it sits under."""

    rel: str
    folder: str
    split: str | None


def class_dirs(tree: Tree, base: str = "", skip: frozenset[str] = frozenset(),
               problems: Problems | None = None) -> list[ClassDir]:
    """The class folders below ``base``: ``base/<class>`` or ``base/<split>/<class>``.

    When any folder below ``base`` is a split name (train/val/test and common spellings), the
    tree is read as split folders of class folders; a non-split folder beside them is reported.
    Names in ``skip`` (lower case) are ignored, e.g. the nested ``chest_xray`` duplicate.
    """
    top = [d for d in tree.dirs(base) if d.lower() not in skip]
    splits = [d for d in top if d.lower() in SPLIT_NAMES]
    if not splits:
        return [ClassDir(_join(base, d), d, None) for d in top]
    if problems is not None:
        for d in top:
            if d.lower() not in SPLIT_NAMES:
                problems.report(tree.ref(_join(base, d)),
                                "unexpected folder beside the split folders (expected train, val, test)")
    return [ClassDir(_join(base, s, c), c, SPLIT_NAMES[s.lower()])
            for s in splits for c in tree.dirs(_join(base, s))]


def _images(tree: Tree, rel: str) -> list[str]:
    """Image files directly inside ``rel``; other files (notes, spreadsheets) are ignored."""
    return [f for f in tree.files(rel) if _is_image(f)]


def class_images(tree: Tree, rel: str) -> list[str]:
    """Images of one class folder: its own image files, else those of its ``images/`` folder.

    The second form is the COVID-19 Radiography Database's ``COVID/images`` beside
    ``COVID/masks``; the masks are not images of the class.
    """
    images = _images(tree, rel)
    if not images:
        sub = [d for d in tree.dirs(rel) if d.lower() == "images"]
        if sub:
            images = _images(tree, _join(rel, sub[0]))
    return images


def _has_class_images(tree: Tree, base: str, skip: frozenset[str] = frozenset()) -> bool:
    """True when some class folder below ``base`` holds image files and no split folder does.

    Images directly in a split folder mean the tree is not split/class (VinDr's ``train/``).
    """
    for d in tree.dirs(base):
        if d.lower() in SPLIT_NAMES and _images(tree, _join(base, d)):
            return False
    return any(class_images(tree, cd.rel) for cd in class_dirs(tree, base, skip))


def _class_keys(tree: Tree, base: str, skip: frozenset[str] = frozenset()) -> set[str]:
    return {_key(cd.folder) for cd in class_dirs(tree, base, skip)}


# Building records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """What differs between the class-folder layouts."""

    layout: str
    site: str
    allowed: tuple[str, ...] | None  # canonical classes a known layout may hold; None = any
    expected: str = ""  # folder names to quote when a known layout meets an unknown class
    skip: frozenset[str] = frozenset()
    patient_id: Callable[[str], str] = patient_id_from_name


def _load_classes(tree: Tree, root: Path, base: str, spec: _Spec, problems: Problems,
                  extra: Callable[[ClassDir, str], dict] | None = None) -> LoadedDataset:
    """Records for every image in every class folder below ``base``."""
    found: list[tuple[ClassDir, str, list[str]]] = []  # (folder, label, image paths)
    for cd in class_dirs(tree, base, spec.skip, problems):
        label = canonical_class(cd.folder)
        if spec.allowed is not None and label not in spec.allowed:
            problems.report(tree.ref(cd.rel),
                            f"unknown class folder {cd.folder!r} (expected {spec.expected})")
            continue
        images = class_images(tree, cd.rel)
        if not images:
            problems.report(tree.ref(cd.rel), "class folder holds no PNG, JPEG or DICOM images")
            continue
        found.append((cd, label or cd.folder, images))
    if not found:
        problems.report(tree.ref(base) if base else tree.name,
                        "no class folders with PNG, JPEG or DICOM images found")
    labels = {label for _, label, _ in found}
    names = NINE if labels <= set(NINE) else tuple(sorted(labels))
    records = []
    headers = HeaderFields("taken from the file name")
    for cd, label, images in found:
        vector = label_vector({label}, names)
        for rel in images:
            stem = PurePosixPath(rel).stem
            info = {"class_folder": cd.folder}
            if extra is not None:
                info.update(extra(cd, rel))
            ref = tree.ref(rel)
            # DICOM: patient, sex, age, view, spacing and size from the header; else the name
            fields = (headers(ref, spec.patient_id(stem)) if rel.lower().endswith(DICOM_SUFFIXES)
                      else {"patient_id": spec.patient_id(stem)})
            records.append(Sample(image=ref, site=spec.site, labels=vector.copy(), label_names=names,
                                  split=cd.split, source="real", extra=info, **fields))
    headers.notice(tree.ref(base) if base else tree.name)
    return LoadedDataset(spec.layout, root, names, records)


def _empty(layout: str, root: Path, problems: Problems, what: str) -> LoadedDataset:
    problems.report(root, f"not a {what} tree")
    return LoadedDataset(layout, root, NINE, [])


# Kaggle "Chest X-Ray Images (Pneumonia)" -------------------------------------------------------

_PNEUMONIA = _Spec("kaggle_pneumonia", "kaggle_pneumonia", ("No Finding", "Pneumonia"),
                   "NORMAL, PNEUMONIA", skip=frozenset({"chest_xray"}))


def _pneumonia_base(tree: Tree) -> str | None:
    """The shallowest ``chest_xray`` folder with split folders of NORMAL/PNEUMONIA classes."""
    candidates = ["chest_xray", "chest_xray/chest_xray"]
    if not tree.is_zip and tree.root.name.lower() == "chest_xray":
        candidates.insert(0, "")
    for base in candidates:
        if base and not tree.is_dir(base):
            continue
        top = [d.lower() for d in tree.dirs(base)]
        if not any(d in SPLIT_NAMES for d in top):
            continue
        keys = _class_keys(tree, base, _PNEUMONIA.skip)
        other = {"covid", "covid19", "turberculosis", "tuberculosis"}  # those are kaggle_pct
        if {"normal", "pneumonia"} <= keys and not keys & other:
            return base
    return None


def _detect_pneumonia(path: Path) -> bool:
    tree = _open(path)
    return tree is not None and _pneumonia_base(tree) is not None


@register_layout("kaggle_pneumonia", detect=_detect_pneumonia, priority=20)
def load_kaggle_pneumonia(root: Path, problems: Problems) -> LoadedDataset:
    """Kaggle "Chest X-Ray Images (Pneumonia)": chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}."""
    tree = Tree(root)
    base = _pneumonia_base(tree)
    if base is None:
        return _empty("kaggle_pneumonia", root, problems,
                      "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}")

    def kind(cd: ClassDir, rel: str) -> dict:
        m = re.search(r"_(bacteria|virus)_", PurePosixPath(rel).name, re.IGNORECASE)
        return {"pneumonia_type": m.group(1).lower()} if m else {}

    return _load_classes(tree, root, base, _PNEUMONIA, problems, kind)


# Kaggle "Chest X-Ray (Pneumonia, Covid-19, Tuberculosis)" --------------------------------------

_PCT = _Spec("kaggle_pct", "kaggle_pct", ("Covid", "No Finding", "Pneumonia", "Tuberculosis"),
             "COVID19, NORMAL, PNEUMONIA, TURBERCULOSIS")


def _pct_base(tree: Tree) -> str | None:
    """The folder (root, or a single wrapper folder) with the split/COVID19... folders."""
    candidates = [""]
    top = tree.dirs()
    if len(top) == 1:
        candidates.append(top[0])
    for base in candidates:
        if not any(d.lower() in SPLIT_NAMES for d in tree.dirs(base)):
            continue
        keys = _class_keys(tree, base)
        if "turberculosis" in keys or {"covid19", "normal", "pneumonia"} <= keys:
            return base
    return None


def _detect_pct(path: Path) -> bool:
    tree = _open(path)
    return tree is not None and _pct_base(tree) is not None


@register_layout("kaggle_pct", detect=_detect_pct, priority=20)
def load_kaggle_pct(root: Path, problems: Problems) -> LoadedDataset:
    """Kaggle "Chest X-Ray (Pneumonia, Covid-19, Tuberculosis)": {train,val,test}/{COVID19,...}."""
    tree = Tree(root)
    base = _pct_base(tree)
    if base is None:
        return _empty("kaggle_pct", root, problems,
                      "{train,val,test}/{COVID19,NORMAL,PNEUMONIA,TURBERCULOSIS}")
    return _load_classes(tree, root, base, _PCT, problems)


# "Tuberculosis (TB) Chest X-ray Database" ------------------------------------------------------

_TB = _Spec("tb_database", "tb_database", ("No Finding", "Tuberculosis"), "Normal, Tuberculosis")
_TB_FOLDER = "tb_chest_radiography_database"
_TB_COLUMNS = ("FILE NAME", "URL")


def _tb_base(tree: Tree) -> str | None:
    candidates = [d for d in tree.dirs() if d.lower() == _TB_FOLDER]
    named_root = not tree.is_zip and tree.root.name.lower() == _TB_FOLDER
    if named_root or tree.files("", "*.metadata.xlsx"):
        candidates.insert(0, "")
    for base in candidates:
        if {"normal", "tuberculosis"} <= {_key(d) for d in tree.dirs(base)}:
            return base
    return None


def _detect_tb(path: Path) -> bool:
    tree = _open(path)
    return tree is not None and _tb_base(tree) is not None


def read_tb_metadata(tree: Tree, base: str, problems: Problems) -> dict[str, str]:
    """Image stem (lower case) -> source URL, from the ``*.metadata.xlsx`` sheets beside the
    class folders. Absent sheets are fine (the URL is only provenance)."""
    import pandas as pd

    urls: dict[str, str] = {}
    for rel in tree.files(base, "*.metadata.xlsx"):
        ref = tree.ref(rel)
        try:
            frame = pd.read_excel(io.BytesIO(tree.read_bytes(rel)), dtype=str)
        except CxrError:
            raise
        except Exception as e:  # openpyxl/zipfile raise many types for a damaged workbook
            problems.report(ref, f"cannot read the metadata sheet ({type(e).__name__}: {e})")
            continue
        columns = {str(c).strip().upper(): c for c in frame.columns}
        missing = [c for c in _TB_COLUMNS if c not in columns]
        if missing:
            problems.report(ref, "missing column(s) " + ", ".join(missing))
            continue
        for name, url in zip(frame[columns["FILE NAME"]], frame[columns["URL"]]):
            if isinstance(name, str) and isinstance(url, str) and name.strip():
                stem = PurePosixPath(name.strip()).stem if _is_image(name.strip()) else name.strip()
                urls[stem.lower()] = url.strip()
    return urls


@register_layout("tb_database", detect=_detect_tb, priority=20)
def load_tb_database(root: Path, problems: Problems) -> LoadedDataset:
    """"Tuberculosis (TB) Chest X-ray Database": TB_Chest_Radiography_Database/{Normal,Tuberculosis}."""
    tree = Tree(root)
    base = _tb_base(tree)
    if base is None:
        return _empty("tb_database", root, problems,
                      "TB_Chest_Radiography_Database/{Normal,Tuberculosis}")
    urls = read_tb_metadata(tree, base, problems)

    def source_url(cd: ClassDir, rel: str) -> dict:
        url = urls.get(PurePosixPath(rel).stem.lower())
        return {"source_url": url} if url else {}

    return _load_classes(tree, root, base, _TB, problems, source_url)


# Any folder-per-class tree ---------------------------------------------------------------------


def _generic_base(tree: Tree) -> str | None:
    """The class-tree folder: the root, or its only subfolder when the root is a wrapper."""
    candidates = [""]
    top = tree.dirs()
    if len(top) == 1 and not any(_is_image(f) for f in tree.files()):
        candidates.append(top[0])
    for base in candidates:
        if _has_class_images(tree, base):
            return base
    return None


def _other_layout_root(tree: Tree, base: str) -> bool:
    """True for roots of other layouts: a CSV at the top (NIH, VinDr, a built ``nine`` set) or
    a ``CXR_png`` folder (NLM) means the folders there are not classes; ``cxr generate``'s
    labels CSV beside a synthetic folder-per-class tree is no such CSV."""
    csvs = [f for f in tree.files(base, "*.csv") if f.rsplit("/", 1)[-1] != GENERATION_LABELS_CSV]
    return bool(csvs) or any(d.lower() == "cxr_png" for d in tree.dirs(base))


def _detect_generic(path: Path) -> bool:
    tree = _open(path)
    if tree is None or _other_layout_root(tree, ""):
        return False
    base = _generic_base(tree)
    return base is not None and not _other_layout_root(tree, base)


@register_layout("folders", detect=_detect_generic, priority=-100)
def load_folders(root: Path, problems: Problems) -> LoadedDataset:
    """Any folder-per-class tree of PNG/JPEG/DICOM images, optionally under train/val/test."""
    tree = Tree(root)
    base = _generic_base(tree) or ""
    if base:
        site = PurePosixPath(base).name
    else:
        site = tree.root.stem if tree.is_zip else tree.root.resolve().name
    return _load_classes(tree, root, base, _Spec("folders", site, None), problems)
