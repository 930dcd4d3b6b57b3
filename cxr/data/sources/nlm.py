"""The NLM tuberculosis sets: Shenzhen (China) and Montgomery County (USA) chest X-rays.

Dataset cards
-------------
* **Shenzhen** -- 662 PA films from Shenzhen No.3 People's Hospital (326 normal, 336 TB),
  palette or RGB PNGs. ``ChinaSet_AllFiles/`` (newer downloads: ``Shenzhen-Hospital-CXR-Set/``)
  holds ``CXR_png/CHNCXR_0001_0.png`` and ``ClinicalReadings/CHNCXR_0001_0.txt``.
* **Montgomery** -- 138 PA films (80 normal, 58 TB) of 135 patients from Montgomery County,
  Maryland, with manual lung masks. ``MontgomerySet/`` holds ``CXR_png/MCUCXR_0001_0.png``,
  ``ClinicalReadings/MCUCXR_0001_0.txt`` and ``ManualMask/{leftMask,rightMask}/<image name>``.
* The Kaggle "pulmonary chest x-ray abnormalities" archive nests both:
  ``ChinaSet_AllFiles/ChinaSet_AllFiles/...`` and ``Montgomery/MontgomerySet/...``; it is read
  as a folder or straight from the downloaded ``.zip``.

The last digit of an image name is the label (0 normal, 1 TB). Cite: Jaeger S, Candemir S,
Antani S, Wang YX, Lu PX, Thoma G. Two public chest X-ray datasets for computer-aided screening
of pulmonary diseases. Quant Imaging Med Surg 2014;4(6):475-477.

Every file is reached through :class:`~cxr.data.tree.Tree`, never through ``Path``, so the
same code serves extracted folders and zip archives. Bad items go to
:class:`~cxr.data.problems.Problems`; what "skip" means for each:

* an image whose name, reading, masks or ``same pt as`` link is bad: the image is skipped;
* a whole ``ClinicalReadings`` or ``ManualMask`` folder missing: one problem for the folder,
  and (with ``skip_bad``) the images load without readings / masks, rather than one problem per
  image for what is really one incomplete download.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from cxr.data.image import image_info
from cxr.data.masks import LUNG_IMAGE_LEFT, LUNG_IMAGE_RIGHT
from cxr.data.problems import Problems
from cxr.data.provenance import tree_origin
from cxr.data.record import TB, Sample
from cxr.data.registry import LoadedDataset, register_layout
from cxr.data.tree import Tree
from cxr.errors import DataError

IMAGES, READINGS, MASKS = "CXR_png", "ClinicalReadings", "ManualMask"
# leftMask is the lung on the image's left (the patient's right).
MASK_FOLDERS = ((LUNG_IMAGE_LEFT, "leftMask"), (LUNG_IMAGE_RIGHT, "rightMask"))


# Readings -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """What a ClinicalReadings file says about one image."""

    sex: str | None  # "M", "F" or "O"
    age: float | None  # years
    report: str | None  # the radiologist's reading, without the sex/age lines
    same_as: str | None = None  # stem of another image of the same patient (Montgomery)


# Age units as written in the readings: Shenzhen "45yrs", "16month", "64days"; Montgomery
# uses the DICOM age string "027Y" (Y/M/W/D). A bare number is years.
_DAYS_PER_YEAR = 365.25
_UNIT_YEARS = {
    **dict.fromkeys(("", "y", "yr", "yrs", "year", "years"), 1.0),
    **dict.fromkeys(("m", "mo", "mos", "month", "months"), 1.0 / 12.0),
    **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), 7.0 / _DAYS_PER_YEAR),
    **dict.fromkeys(("d", "day", "days"), 1.0 / _DAYS_PER_YEAR),
}
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)\s*[.,]?", re.IGNORECASE)


def parse_age(text: str) -> float:
    """Age in years from ``"45yrs"``, ``"42"``, ``"16month"``, ``"64days"`` or ``"027Y"``."""
    m = _AGE.fullmatch(text.strip())
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNIT_YEARS:
        raise ValueError(f"age {text.strip()!r} is not a number of years, months, weeks or days")
    return float(m.group(1)) * _UNIT_YEARS[unit]


# "femal" is a real spelling in the Shenzhen readings; the age may follow with no space
# ("female24yrs") or after a comma ("male , 29yrs"; a full-width "，" is accepted too).
_SZ_SEX = re.compile(r"(female|femal|male)\s*[,，]?\s*(.*)", re.IGNORECASE)


def parse_shenzhen_reading(text: str) -> Reading:
    """First non-empty line ``"<sex> <age>"``, then the reading (blank lines dropped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty reading (expected a first line such as 'male 45yrs')")
    m = _SZ_SEX.fullmatch(lines[0])
    if m is None:
        raise ValueError(f"first line {lines[0]!r} does not start with the sex "
                         "(expected e.g. 'male 45yrs' or 'female 38yrs')")
    sex = "F" if m.group(1).lower().startswith("f") else "M"
    try:
        age = parse_age(m.group(2))
    except ValueError as e:
        raise ValueError(f"first line {lines[0]!r}: {e}") from None
    return Reading(sex=sex, age=age, report="\n".join(lines[1:]) or None)


_MC_FIELD = re.compile(r"patient[’']?s\s+(sex|age)\s*:\s*(.*)", re.IGNORECASE)
_MC_SEXES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_SAME_PT = re.compile(r"same\s+pt\.?\s+as\s+(MCUCXR_\d{4}_\d)", re.IGNORECASE)


def parse_montgomery_reading(text: str) -> Reading:
    """``Patient's Sex: F`` and ``Patient's Age: 027Y`` lines, then the reading.

    A reading ``NO REPORT (same pt as MCUCXR_0162_1)`` marks a repeat scan of that patient;
    such a reading may lack the sex and age lines, any other must have both.
    """
    fields: dict[str, str] = {}
    report: list[str] = []
    for line in (raw.strip() for raw in text.splitlines()):
        m = _MC_FIELD.fullmatch(line)
        if m:
            fields[m.group(1).lower()] = m.group(2).strip()
        elif line:
            report.append(line)
    link = _SAME_PT.search(text)
    same_as = link.group(1).upper() if link else None
    sex = age = None
    if "sex" in fields:
        sex = _MC_SEXES.get(fields["sex"].upper())
        if sex is None:
            raise ValueError(f"Patient's Sex {fields['sex']!r} is not M, F or O")
    elif same_as is None:
        raise ValueError("no \"Patient's Sex:\" line")
    if "age" in fields:
        age = parse_age(fields["age"])
    elif same_as is None:
        raise ValueError("no \"Patient's Age:\" line")
    return Reading(sex=sex, age=age, report="\n".join(report) or None, same_as=same_as)


# Sites ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """How one NLM set is laid out and read."""

    name: str  # site and source name of its records
    prefix: str  # image name prefix, "CHNCXR" / "MCUCXR"
    folders: tuple[str, ...]  # names the site folder is published under
    locations: tuple[str, ...]  # where the site folder sits below a download root, nested first
    parse_reading: Callable[[str], Reading]
    has_masks: bool

    @property
    def example(self) -> str:
        return f"{self.folders[0]}/{IMAGES}/{self.prefix}_0001_0.png"


SHENZHEN = Site(
    "shenzhen", "CHNCXR", ("ChinaSet_AllFiles", "Shenzhen-Hospital-CXR-Set"),
    ("ChinaSet_AllFiles/ChinaSet_AllFiles", "ChinaSet_AllFiles",
     "Shenzhen-Hospital-CXR-Set/Shenzhen-Hospital-CXR-Set", "Shenzhen-Hospital-CXR-Set"),
    parse_shenzhen_reading, has_masks=False,
)
MONTGOMERY = Site(
    "montgomery", "MCUCXR", ("MontgomerySet",),
    ("Montgomery/MontgomerySet", "MontgomerySet/MontgomerySet", "MontgomerySet"),
    parse_montgomery_reading, has_masks=True,
)
SITES = (SHENZHEN, MONTGOMERY)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _has_site_images(tree: Tree, loc: str, site: Site) -> bool:
    return bool(tree.files(_join(loc, IMAGES), f"{site.prefix}_*.png"))


def find_site(tree: Tree, site: Site) -> str | None:
    """Relative path of ``site``'s folder in ``tree`` ("" for the root itself), or None.

    A published folder name without ``CXR_png`` still counts (the loader then says what is
    missing); the root itself counts only when its ``CXR_png`` holds the site's images.
    """
    for loc in site.locations:
        if tree.is_dir(_join(loc, IMAGES)):
            return loc
    if _has_site_images(tree, "", site):
        return ""
    for loc in site.locations:
        if tree.is_dir(loc):
            return loc
    return None


def find_sites(tree: Tree) -> dict[str, str]:
    """Site name -> relative folder of every NLM site in ``tree``.

    A zip archive may wrap everything in one top folder, which is looked through.
    """
    found = {s.name: loc for s in SITES if (loc := find_site(tree, s)) is not None}
    if not found and tree.is_zip:
        tops = tree.dirs()
        if len(tops) == 1:
            inner = find_sites(tree.sub(tops[0]))
            found = {name: _join(tops[0], loc) for name, loc in inner.items()}
    return found


# Loading --------------------------------------------------------------------------------------

def _parse_name(name: str, site: Site) -> tuple[str, float]:
    """``(stem, label)`` from ``CHNCXR_0001_0.png``; ValueError says what is wrong."""
    m = re.fullmatch(rf"({site.prefix}_\d{{4}})_([^._]+)\.png", name, re.IGNORECASE)
    if m is None:
        raise ValueError(f"file name does not match {site.prefix}_NNNN_L.png "
                         "(L = 0 normal, 1 tuberculosis)")
    if m.group(2) not in ("0", "1"):
        raise ValueError(f"label digit {m.group(2)!r} in the file name is not 0 (normal) "
                         "or 1 (tuberculosis)")
    return name[:-4], float(m.group(2))


def patient_groups(stems: Iterable[str], links: dict[str, str]) -> dict[str, str]:
    """Map each stem to the earliest stem (by name) of its linked group.

    ``links`` maps a stem to another stem of the same patient; chains and cycles are followed
    (union-find), so ``a -> b -> c`` puts all three under ``min(a, b, c)``.
    """
    parent = {s: s for s in stems}

    def root(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for a, b in links.items():
        ra, rb = root(a), root(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            parent[hi] = lo
    return {s: root(s) for s in parent}


def _patient_id(stem: str) -> str:
    return stem.rsplit("_", 1)[0]  # MCUCXR_0162_1 -> MCUCXR_0162


@dataclass
class _Candidate:
    """An image that passed its own checks, waiting for the links to be resolved."""

    rel: str
    stem: str
    label: float
    reading: Reading | None
    reading_ref: str | None
    masks: dict[str, str]


def _check_masks(tree: Tree, rel: str, name: str, mask_files: set[str],
                 problems: Problems) -> dict[str, str] | None:
    """The image's mask refs after checking they exist and match its size; None if not."""
    refs = {}
    for key, folder in MASK_FOLDERS:
        mrel = _join(MASKS, folder, name)
        if mrel not in mask_files:
            problems.report(tree.ref(mrel), f"missing lung mask for {name}")
            return None
        refs[key] = tree.ref(mrel)
    try:
        info = image_info(tree.ref(rel))
        for ref in refs.values():
            minfo = image_info(ref)
            if (minfo.width, minfo.height) != (info.width, info.height):
                problems.report(ref, f"mask size {minfo.width}x{minfo.height} differs from "
                                     f"image size {info.width}x{info.height} of {name}")
                return None
    except DataError as e:
        problems.report(e.where, e.problem)
        return None
    return refs


def load_site(tree: Tree, site: Site, problems: Problems, synthetic: bool = False) -> list[Sample]:
    """Records of one site folder (the folder holding ``CXR_png``), sorted by file name.

    ``synthetic``: the tree was written by ``cxr generate`` (its manifest says so), whose images
    have no patient, so no reading and no lung mask; their folders' absence is no problem.
    """
    if not tree.is_dir(IMAGES):
        problems.report(tree.name, f"no {IMAGES} folder (expected {site.example})")
        return []
    files = tree.files(IMAGES)
    if not files:
        problems.report(tree.ref(IMAGES), f"empty {IMAGES} folder (expected {site.example})")
        return []

    images: dict[str, tuple[str, float]] = {}  # stem -> (relpath, label)
    numbers: dict[str, str] = {}  # "CHNCXR_0001" -> first stem seen with it
    for rel in files:
        name = rel.rsplit("/", 1)[-1]
        try:
            stem, label = _parse_name(name, site)
        except ValueError as e:
            problems.report(tree.ref(rel), str(e))
            continue
        key = _patient_id(stem).upper()
        if key in numbers:
            problems.report(tree.ref(rel), f"image number also used by {numbers[key]}.png "
                                           "with another label digit")
            continue
        numbers[key] = stem
        images[stem] = (rel, label)

    readings = set(tree.files(READINGS)) if tree.is_dir(READINGS) else None
    if readings is None and not synthetic:
        problems.report(tree.name, f"no {READINGS} folder (expected "
                                   f"{site.folders[0]}/{READINGS}/{site.prefix}_0001_0.txt)")
    mask_files: set[str] | None = None
    if site.has_masks:
        if tree.is_dir(MASKS):
            mask_files = set(tree.files(MASKS, recursive=True))
        elif not synthetic:
            problems.report(tree.name, f"no {MASKS} folder (expected {site.folders[0]}/{MASKS}/"
                                       f"leftMask/{site.prefix}_0001_0.png)")

    candidates: list[_Candidate] = []
    for stem, (rel, label) in images.items():
        reading = reading_ref = None
        if readings is not None:
            rrel = _join(READINGS, f"{stem}.txt")
            reading_ref = tree.ref(rrel)
            if rrel not in readings:
                problems.report(reading_ref, f"missing clinical reading for {stem}.png")
                continue
            try:
                reading = site.parse_reading(tree.read_text(rrel))
            except ValueError as e:
                problems.report(reading_ref, str(e))
                continue
        masks: dict[str, str] = {}
        if mask_files is not None:
            checked = _check_masks(tree, rel, f"{stem}.png", mask_files, problems)
            if checked is None:
                continue
            masks = checked
        candidates.append(_Candidate(rel, stem, label, reading, reading_ref, masks))

    links: dict[str, str] = {}
    kept: list[_Candidate] = []
    for c in candidates:
        target = c.reading.same_as if c.reading else None
        if target is not None and target not in images:
            problems.report(c.reading_ref, f"'same pt as {target}' names an image that is not "
                                           f"in {IMAGES}")
            continue
        if target is not None:
            links[c.stem] = target
        kept.append(c)
    groups = patient_groups(images, links)

    records = []
    for c in kept:
        r = c.reading
        extra: dict[str, str] = {}
        if c.reading_ref is not None:
            extra["reading_file"] = c.reading_ref
        if r is not None and r.same_as is not None:
            extra["same_patient_as"] = r.same_as
        records.append(Sample(
            image=tree.ref(c.rel), patient_id=_patient_id(groups[c.stem]), site=site.name,
            labels=np.array([c.label], dtype=np.float32), label_names=TB,
            age=r.age if r else None, sex=r.sex if r else None, view="PA",
            masks=c.masks, source=site.name, report=r.report if r else None, extra=extra,
        ))
    return records


# Layouts --------------------------------------------------------------------------------------

def _open(root: Path) -> Tree | None:
    try:
        return Tree(root)
    except (DataError, OSError, zipfile.BadZipFile):
        return None


def _is_site_folder(root: Path, site: Site) -> bool:
    """``root`` itself is the site folder: its CXR_png holds the site's images, or it carries a
    published name and is not just the Kaggle wrapper of a folder of that name."""
    tree = _open(root)
    if tree is None:
        return False
    try:
        if _has_site_images(tree, "", site):
            return True
        return (not tree.is_zip and root.name in site.folders
                and not any(tree.is_dir(name) for name in site.folders))
    except (DataError, OSError, zipfile.BadZipFile):
        return False


def _holds_sites(root: Path) -> bool:
    tree = _open(root)
    if tree is None:
        return False
    try:
        return bool(find_sites(tree))
    except (DataError, OSError, zipfile.BadZipFile):
        return False


def _load_one(root: Path, site: Site, layout: str, problems: Problems) -> LoadedDataset:
    tree = Tree(root)
    loc = find_site(tree, site) or ""
    synthetic = tree_origin(root) == "synthetic"
    return LoadedDataset(layout, Path(root), TB, load_site(tree.sub(loc), site, problems, synthetic))


@register_layout("shenzhen", detect=lambda p: _is_site_folder(p, SHENZHEN), priority=80,
                 description="NLM Shenzhen TB set (ChinaSet_AllFiles/CXR_png/CHNCXR_*.png)")
def load_shenzhen(root: Path, problems: Problems) -> LoadedDataset:
    """NLM Shenzhen TB set: ChinaSet_AllFiles/ or Shenzhen-Hospital-CXR-Set/."""
    return _load_one(root, SHENZHEN, "shenzhen", problems)


@register_layout("montgomery", detect=lambda p: _is_site_folder(p, MONTGOMERY), priority=80,
                 description="NLM Montgomery TB set with lung masks "
                             "(MontgomerySet/CXR_png/MCUCXR_*.png)")
def load_montgomery(root: Path, problems: Problems) -> LoadedDataset:
    """NLM Montgomery TB set with lung masks: MontgomerySet/."""
    return _load_one(root, MONTGOMERY, "montgomery", problems)


@register_layout("nlm", detect=_holds_sites, priority=70,
                 description="NLM Shenzhen and/or Montgomery sets below one folder or zip "
                             "(native download or Kaggle 'pulmonary chest x-ray abnormalities')")
def load_nlm(root: Path, problems: Problems) -> LoadedDataset:
    """Both NLM sets below one folder or zip (native download or the Kaggle archive)."""
    tree = Tree(root)
    found = find_sites(tree)
    if not found:
        problems.report(tree.name, "no NLM set found (expected ChinaSet_AllFiles/, "
                                   "Shenzhen-Hospital-CXR-Set/ or MontgomerySet/, e.g. "
                                   f"{SHENZHEN.example}, or the Kaggle nesting "
                                   f"ChinaSet_AllFiles/{SHENZHEN.example})")
        return LoadedDataset("nlm", Path(root), TB, [])
    records: list[Sample] = []
    synthetic = tree_origin(root) == "synthetic"
    for site in SITES:
        if site.name in found:
            records += load_site(tree.sub(found[site.name]), site, problems, synthetic)
    return LoadedDataset("nlm", Path(root), TB, records)
