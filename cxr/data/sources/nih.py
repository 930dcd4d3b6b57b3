"""NIH ChestX-ray14: 112,120 frontal chest X-rays of 30,805 patients with 14 findings.

Dataset card
    Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. "ChestX-ray8: Hospital-scale chest X-ray
    database and benchmarks on weakly-supervised classification and localization of common
    thorax diseases." CVPR 2017. https://nihcc.app.box.com/v/ChestXray-NIHCC (also mirrored on
    Kaggle as ``nih-chest-xrays/data`` and, 5,606 images, ``nih-chest-xrays/sample``).

    Labels were text-mined from the radiology reports (the authors estimate >90% accuracy), so
    they are noisy; "No Finding" is the all-zero vector, never NaN. Images are 1024x1024 8-bit
    PNGs (a few are stored gray+alpha) resized from originals whose size and pixel spacing the
    CSV gives; the 984 boxes of ``BBox_List_2017.csv`` are in the 1024x1024 stored pixels. The
    loader scales them to each image's stored size (read from its header), so the boxes of a
    resized copy (224², 256²) fall where the findings are.
    ``Data_Entry_2017_v2020.csv`` corrects ages the 2017 file had wrong (e.g. 412 years); the
    loader keeps ages as written, so prefer the v2020 file.

On-disk layout (a folder or a zip archive)::

    Data_Entry_2017_v2020.csv | Data_Entry_2017.csv    or  sample/sample_labels.csv
        (or any *.csv there with the Data_Entry header, e.g. the Kaggle sample kept as
        sample.csv; or a CSV elsewhere, given as ``labels_csv``)
    images/*.png | images_001/images/*.png ... images_012/images/*.png | sample/images/*.png
        (or PNGs at the root itself)
    train_val_list.txt, test_list.txt                  optional official split
    BBox_List_2017.csv                                 optional boxes (8 findings, 880 images)
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.csvutil import header_columns, line_of, outside_root, read_table
from cxr.data.image import image_info
from cxr.data.io import _open_zip, split_ref
from cxr.data.problems import Problems
from cxr.data.record import NIH14, SEXES, VIEWS, Box, Sample, label_vector
from cxr.data.registry import LoadedDataset, register_layout
from cxr.data.tree import Tree
from cxr.errors import CxrError

SITE = "nih"
ENTRY_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "sample_labels.csv")
CSV_DIRS = ("", "sample")
NO_FINDING = "No Finding"
BOX_CSV = "BBox_List_2017.csv"
SPLIT_LISTS = (("train_val_list.txt", "train"), ("test_list.txt", "test"))
SHIPPED_CSV = "Data_Entry_2017_v2020.csv.gz"  # inside the torchxrayvision package's data/
BOX_ALIASES = {"Infiltrate": "Infiltration"}  # BBox_List_2017.csv spells one finding differently
BOX_FRAME = 1024  # BBox_List_2017.csv is in the released 1024 x 1024 PNGs' pixels

# Canonical name -> header spellings. Pandas splits the real Data_Entry header
# "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]" at its inner commas; the Kaggle
# sample_labels.csv spells the same four columns out.
ENTRY_COLUMNS = {
    "image": ("Image Index",),
    "findings": ("Finding Labels",),
    "follow_up": ("Follow-up #",),
    "patient_id": ("Patient ID",),
    "age": ("Patient Age",),
    "sex": ("Patient Gender",),
    "view": ("View Position",),
    "width": ("OriginalImage[Width", "OriginalImageWidth"),
    "height": ("Height]", "OriginalImageHeight"),
    "spacing_x": ("OriginalImagePixelSpacing[x", "OriginalImagePixelSpacing_x"),
    "spacing_y": ("y]", "OriginalImagePixelSpacing_y"),
}
ENTRY_REQUIRED = ("image", "findings", "follow_up", "patient_id", "age", "sex", "view")
# The real header "Image Index,Finding Label,Bbox [x,y,w,h],,," splits the same way.
BOX_COLUMNS = {
    "image": ("Image Index",),
    "finding": ("Finding Label",),
    "x": ("Bbox [x",),
    "y": ("y",),
    "w": ("w",),
    "h": ("h]",),
}

_AGE = re.compile(r"^(\d+(?:\.\d*)?)\s*([YMDymd]?)$")
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1.0 / 12.0, "D": 1.0 / 365.25}
_IMAGE_DIR = re.compile(r"images_\d{3}")


# Metadata -------------------------------------------------------------------------------------

def _parse_findings(text: str) -> np.ndarray | str:
    """NIH14 0/1 vector of a ``Finding Labels`` cell, or the problem with it."""
    if not text:
        return "empty 'Finding Labels' (a normal image says 'No Finding')"
    names = [p.strip() for p in text.split("|")]
    for name in names:
        if name != NO_FINDING and name not in NIH14:
            return (f"unknown finding {name!r} in 'Finding Labels' "
                    f"(known: {', '.join(NIH14)}, {NO_FINDING})")
    if NO_FINDING in names and len(set(names)) > 1:
        return f"'Finding Labels' {text!r} has '{NO_FINDING}' together with findings"
    return label_vector(names, NIH14)


def _numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Floats of a text column (NaN where empty) and a mask of non-empty non-numbers."""
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(num) & (values != "").to_numpy()
    return num, bad


def _parse_entries(raw: pd.DataFrame, where: str, problems: Problems) -> pd.DataFrame:
    """Parse and check every field of a Data_Entry/sample_labels frame.

    Returns one row per good image with normalised columns (see :func:`read_nih_metadata`)
    plus ``line``. Each bad row is reported once, with its first problem, in file order, and
    dropped (in strict mode the first one raises).
    """
    n = len(raw)
    errors: dict[int, str] = {}

    def flag(mask: np.ndarray, message: Callable[[int], str]) -> None:
        for i in np.flatnonzero(mask):
            errors.setdefault(int(i), message(int(i)))

    image = raw["image"]
    flag((image == "").to_numpy(), lambda i: "empty 'Image Index'")
    escapes = image.map(outside_root).to_numpy(dtype=bool) & (image != "").to_numpy()
    flag(escapes, lambda i: f"'Image Index' {image[i]!r} points outside the dataset root")
    nested = image.str.contains(r"[/\\]", regex=True).to_numpy(dtype=bool) & ~escapes
    flag(nested, lambda i: f"'Image Index' {image[i]!r} must be a plain file name")

    # Few distinct label strings (~800 in 112,120 rows): parse each once.
    codes, uniques = pd.factorize(raw["findings"])
    parsed = [_parse_findings(u) for u in uniques]
    table = np.stack([p if isinstance(p, np.ndarray) else np.full(len(NIH14), np.nan, np.float32)
                      for p in parsed] or [np.zeros(len(NIH14), np.float32)])
    bad_codes = np.array([isinstance(p, str) for p in parsed] or [False])
    flag(bad_codes[codes], lambda i: parsed[codes[i]])  # type: ignore[arg-type, return-value]
    labels = table[codes]

    pid = raw["patient_id"]
    flag((pid == "").to_numpy(), lambda i: "empty 'Patient ID'")
    digits = pid.str.fullmatch(r"\d+").to_numpy(dtype=bool)
    patient_id = pid.where(~digits, pid.str.zfill(8))  # the file's 1 is the images' "00000001"

    age_text = raw["age"]
    parts = age_text.str.extract(_AGE)
    age_ok = parts[0].notna().to_numpy()
    flag(~age_ok & (age_text != "").to_numpy(),
         lambda i: f"'Patient Age' {age_text[i]!r} is not an age (e.g. 57, or 057Y / 006M / 010D)")
    unit = parts[1].fillna("").str.upper().map(_AGE_UNIT_YEARS).to_numpy(dtype=np.float64)
    age = pd.to_numeric(parts[0], errors="coerce").to_numpy(dtype=np.float64) * unit

    sex = raw["sex"].str.upper()
    flag(~sex.isin(SEXES + ("",)).to_numpy(),
         lambda i: f"'Patient Gender' {raw['sex'][i]!r} is not one of {', '.join(SEXES)}")
    view = raw["view"].str.upper()
    flag(~view.isin(VIEWS + ("",)).to_numpy(),
         lambda i: f"'View Position' {raw['view'][i]!r} is not one of {', '.join(VIEWS)}")

    follow = raw["follow_up"]
    follow_ok = follow.str.fullmatch(r"\d+").to_numpy(dtype=bool)
    flag(~follow_ok & (follow != "").to_numpy(),
         lambda i: f"'Follow-up #' {follow[i]!r} is not a whole number")
    follow_up = pd.to_numeric(follow.where(follow_ok, None), errors="coerce").astype("Int64")

    geometry = {}
    for col in ("width", "height", "spacing_x", "spacing_y"):
        if col not in raw:
            geometry[col] = np.full(n, np.nan)
            continue
        values, bad = _numbers(raw[col])
        header = ENTRY_COLUMNS[col][0]
        flag(bad, lambda i, c=col, h=header: f"{h!r} value {raw[c][i]!r} is not a number")
        geometry[col] = values

    dup = image.duplicated(keep="first").to_numpy() & (image != "").to_numpy()
    if dup.any():
        first = {name: i for i, name in reversed(list(enumerate(image)))}
        flag(dup, lambda i: f"image {image[i]!r} listed twice (first on line {line_of(first[image[i]])})")

    for i in sorted(errors):
        problems.report(f"{where}:{line_of(i)}", errors[i])
    keep = np.ones(n, dtype=bool)
    keep[list(errors)] = False

    out = pd.DataFrame({
        "image": image,
        "patient_id": patient_id,
        "age": age,
        "sex": sex.where(sex != "", None),
        "view": view.where(view != "", None),
        "follow_up": follow_up,
    })
    out = pd.concat([out, pd.DataFrame(labels, columns=list(NIH14))], axis=1)
    out["original_width"] = pd.array(geometry["width"], dtype="Float64").round().astype("Int64")
    out["original_height"] = pd.array(geometry["height"], dtype="Float64").round().astype("Int64")
    out["spacing_x"] = geometry["spacing_x"]
    out["spacing_y"] = geometry["spacing_y"]
    out["line"] = np.arange(n) + line_of(0)
    return out[keep].reset_index(drop=True)


def read_nih_metadata(csv_path: str | Path, problems: Problems | None = None) -> pd.DataFrame:
    """The Data_Entry (or sample_labels) CSV as a normalised frame, no images needed.

    Columns: ``image``, ``patient_id`` (8-digit string), ``age`` (years, NaN if absent),
    ``sex`` (M/F), ``view`` (PA/AP), ``follow_up`` (Int64), the 14 NIH14 labels (float32 0/1),
    ``original_width``/``original_height`` (Int64) and ``spacing_x``/``spacing_y`` (mm).
    Reads ``.csv`` or ``.csv.gz``; bad rows raise (or, with a skip-mode ``problems``, are dropped).
    """
    sink = problems if problems is not None else Problems()
    raw = read_table(Path(csv_path), csv_path, ENTRY_COLUMNS, ENTRY_REQUIRED, sink)
    if raw is None:
        return _parse_entries(pd.DataFrame({c: pd.Series([], dtype=str) for c in ENTRY_REQUIRED}),
                              str(csv_path), sink).drop(columns="line")
    return _parse_entries(raw, str(csv_path), sink).drop(columns="line")


def shipped_nih_metadata_path() -> Path:
    """Path of the full NIH metadata CSV that the torchxrayvision package ships."""
    spec = importlib.util.find_spec("torchxrayvision")  # locate without importing torch
    if spec is None or not spec.submodule_search_locations:
        raise CxrError("torchxrayvision is not installed, so its copy of the NIH metadata "
                       f"({SHIPPED_CSV}) is not available")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / SHIPPED_CSV
        if path.is_file():
            return path
    raise CxrError(f"{Path(next(iter(spec.submodule_search_locations))) / 'data' / SHIPPED_CSV}: "
                   "not found in the installed torchxrayvision package")


# Tree layout ----------------------------------------------------------------------------------

def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _head(tree: Tree, rel: str, limit: int = 1 << 16) -> bytes:
    """The first ``limit`` bytes of a file of ``tree`` (enough for a CSV header line)."""
    path, member = split_ref(tree.ref(rel))
    try:
        if member is None:
            with open(path, "rb") as f:
                return f.read(limit)
        with _open_zip(path).open(member) as f:
            return f.read(limit)
    except (OSError, KeyError, ValueError):
        return b""


def is_entry_header(columns: list[str]) -> bool:
    """True when a CSV header has every required Data_Entry column (either spelling of each)."""
    have = set(columns)
    return all(any(s in have for s in ENTRY_COLUMNS[c]) for c in ENTRY_REQUIRED)


def find_labels_csv(tree: Tree) -> str | None:
    """Relative path of the label CSV: v2020 over 2017 over the Kaggle sample subset, then any
    other ``*.csv`` at the root or in ``sample/`` whose header is Data_Entry's (first by name)."""
    for name in ENTRY_CSVS:
        for folder in CSV_DIRS:
            if tree.is_file(_join(folder, name)):
                return _join(folder, name)
    for folder in CSV_DIRS:
        for rel in tree.files(folder, "*.csv"):
            head = _head(tree, rel).split(b"\n", 1)[0]
            if is_entry_header(header_columns(head, rel)):
                return rel
    return None


def detect_nih(root: Path) -> bool:
    try:
        return find_labels_csv(Tree(root)) is not None
    except CxrError:
        return False


def _image_dirs(tree: Tree) -> list[str]:
    found = [d for d in ("images", "sample/images") if tree.is_dir(d)]
    for d in tree.dirs():
        if _IMAGE_DIR.fullmatch(d):  # official archives unpack to images_NNN/images/
            found.append(f"{d}/images" if tree.is_dir(f"{d}/images") else d)
    if not found and tree.files("", "*.png"):
        found.append("")  # the images themselves, e.g. an images/ folder given with labels_csv
    return found


def _index_images(tree: Tree, problems: Problems) -> dict[str, str] | None:
    """Image file name -> relative path, by listing each image folder once.

    ``None`` (after reporting) when there is no image folder or all of them are empty.
    """
    dirs = _image_dirs(tree)
    if not dirs:
        problems.report(tree.name, "no image folder (looked for images/, sample/images/, "
                                   "images_001/images/ ... images_012/images/ and PNGs at the root)")
        return None
    index: dict[str, str] = {}
    for d in dirs:
        files = tree.files(d, "*.png")
        if not files:
            problems.report(tree.ref(d) if d else tree.name, "image folder holds no PNG images")
        for rel in files:
            index.setdefault(rel.rsplit("/", 1)[-1], rel)
    return index or None


def _first_file(tree: Tree, candidates: list[str]) -> str | None:
    return next((c for c in candidates if tree.is_file(c)), None)


def _read_splits(tree: Tree, folder: str, problems: Problems) -> dict[str, str]:
    """Image name -> "train" (train_val_list.txt) or "test" (test_list.txt)."""
    split: dict[str, str] = {}
    origin: dict[str, str] = {}
    for name, which in SPLIT_LISTS:
        rel = _first_file(tree, list(dict.fromkeys([_join(folder, name), name])))
        if rel is None:
            continue
        for n, line in enumerate(tree.read_text(rel).splitlines(), start=1):
            image = line.strip()
            if not image:
                continue
            if image in split and split[image] != which:
                problems.report(f"{tree.ref(rel)}:{n}", f"image {image!r} is also in {origin[image]}")
                continue
            split[image], origin[image] = which, name
    return split


def _read_boxes(tree: Tree, folder: str, problems: Problems) -> dict[str, list[Box]]:
    """Image name -> boxes ``(x, y, x + w, y + h)`` from BBox_List_2017.csv, when present."""
    rel = _first_file(tree, list(dict.fromkeys([_join(folder, BOX_CSV), BOX_CSV])))
    if rel is None:
        return {}
    where = tree.ref(rel)
    raw = read_table(tree.read_bytes(rel), where, BOX_COLUMNS, tuple(BOX_COLUMNS), problems)
    if raw is None:
        return {}
    boxes: dict[str, list[Box]] = {}
    for i, row in enumerate(raw.itertuples(index=False)):
        at = f"{where}:{line_of(i)}"
        if not row.image or outside_root(row.image) or "/" in row.image or "\\" in row.image:
            problems.report(at, f"'Image Index' {row.image!r} is not a plain image file name")
            continue
        label = BOX_ALIASES.get(row.finding, row.finding)
        if label not in NIH14:
            problems.report(at, f"unknown finding {row.finding!r} in 'Finding Label'")
            continue
        try:
            x, y, w, h = (float(v) for v in (row.x, row.y, row.w, row.h))
        except ValueError:
            problems.report(at, f"'Bbox [x,y,w,h]' {[row.x, row.y, row.w, row.h]} has a non-number")
            continue
        if not all(np.isfinite([x, y, w, h])):
            problems.report(at, "'Bbox [x,y,w,h]' has a missing or infinite value")
            continue
        if w < 0 or h < 0:
            problems.report(at, f"box with negative size (w={w:g}, h={h:g}): x_max < x_min or y_max < y_min")
            continue
        boxes.setdefault(row.image, []).append(Box(label, x, y, x + w, y + h))
    return boxes


def _stored_frame(boxes: list[Box], image: str, where: str, problems: Problems) -> list[Box]:
    """Boxes of the 1024² frame scaled to the stored image's size (read from its header only)."""
    if not boxes:
        return []
    try:
        info = image_info(image)
    except CxrError as e:
        problems.report(where, f"boxes of {image!r} kept in the 1024 x 1024 frame: {e}")
        return list(boxes)
    sx, sy = info.width / BOX_FRAME, info.height / BOX_FRAME
    if sx == 1 and sy == 1:
        return list(boxes)
    return [Box(b.label, b.x0 * sx, b.y0 * sy, b.x1 * sx, b.y1 * sy, b.reader) for b in boxes]


def _opt(value: float) -> float | None:
    return None if value != value else float(value)  # NaN -> None


def load_nih(root: str | Path, problems: Problems | None = None,
             require_images: bool = True, labels_csv: str | Path | None = None) -> LoadedDataset:
    """Load an NIH ChestX-ray14 tree (full release or Kaggle sample) as NIH14 samples.

    With ``require_images=False`` every CSV row becomes a sample whether or not its PNG is
    present (``image`` then names where it would be, under ``images/``): metadata-only use.
    ``labels_csv``: the Data_Entry-style CSV to use, wherever it is, instead of looking for one
    in the tree.
    """
    sink = problems if problems is not None else Problems()
    result = _load_nih(root, sink, require_images, labels_csv)
    result.problems = list(sink.items)
    return result


def _read_csv_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _load_nih(root: str | Path, problems: Problems, require_images: bool,
              labels_csv: str | Path | None = None) -> LoadedDataset:
    root = Path(root)
    tree = Tree(root)
    result = LoadedDataset(SITE, root, NIH14, [])
    if labels_csv is not None:
        where, folder = str(labels_csv), ""
        data = _read_csv_bytes(Path(labels_csv))
        if data is None:
            state = "no such file" if not Path(labels_csv).exists() else "cannot be read"
            problems.report(where, f"{state} (given as the NIH label CSV)")
            return result
    else:
        csv_rel = find_labels_csv(tree)
        if csv_rel is None:
            problems.report(tree.name, f"no NIH label file ({', '.join(ENTRY_CSVS)}, or another CSV with "
                                       "the Data_Entry header) at the root or in sample/")
            return result
        where, folder, data = tree.ref(csv_rel), csv_rel.rpartition("/")[0], tree.read_bytes(csv_rel)
    raw = read_table(data, where, ENTRY_COLUMNS, ENTRY_REQUIRED, problems)
    if raw is None:
        return result
    meta = _parse_entries(raw, where, problems)
    index: dict[str, str] = {}
    if require_images:
        found = _index_images(tree, problems)
        if found is None:
            return result
        index = found
    splits = _read_splits(tree, folder, problems)
    boxes = _read_boxes(tree, folder, problems)
    labels = meta[list(NIH14)].to_numpy(dtype=np.float32)
    default_dir = _join(folder, "images")
    dir_refs: dict[str, str] = {}

    columns = ("image", "patient_id", "age", "sex", "view", "follow_up", "original_width",
               "original_height", "spacing_x", "spacing_y", "line")
    rows = zip(*(meta[c].astype(object).where(meta[c].notna(), None).tolist() for c in columns))
    for k, (image, pid, age, sex, view, follow, width, height, sx, sy, line) in enumerate(rows):
        rel = index.get(image)
        if rel is None:
            if require_images:
                problems.report(f"{where}:{line}", f"image {image!r} is listed but not found in the "
                                                   "image folders")
                continue
            rel = _join(default_dir, image)
        folder_of, _, name = rel.rpartition("/")
        if folder_of not in dir_refs:
            dir_refs[folder_of] = tree.ref(folder_of)
        result.records.append(Sample(
            # tree.ref(rel), without 112k Path joins
            image=f"{dir_refs[folder_of]}/{name}" if folder_of else tree.ref(rel),
            patient_id=pid,
            site=SITE,
            labels=labels[k].copy(),
            label_names=NIH14,
            age=None if age is None else _opt(age),
            sex=sex,
            view=view,
            follow_up=None if follow is None else int(follow),
            pixel_spacing=None if sx is None or sy is None else (float(sx), float(sy)),
            original_size=None if width is None or height is None else (int(width), int(height)),
            boxes=_stored_frame(boxes.get(image, []), tree.ref(rel), where, problems) if require_images
            else list(boxes.get(image, [])),
            split=splits.get(image),
            source="real",
        ))
    return result


@register_layout("nih", detect=detect_nih, priority=60,  # a label CSV: above folder-name layouts
                 description="NIH ChestX-ray14 (a Data_Entry-style CSV + PNGs)", labels_csv=True)
def load_nih_layout(root: Path, problems: Problems, labels_csv: Path | None = None) -> LoadedDataset:
    """NIH ChestX-ray14 (a Data_Entry-style CSV + PNGs)."""
    return load_nih(root, problems, labels_csv=labels_csv)
