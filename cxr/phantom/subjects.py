"""Simulated patients: demographics and findings from real NIH rows, seeded pose and habitus.

A subject's age, sex, view and (unless prescribed) finding set are copied from one real row of
the NIH ChestX-ray14 metadata that torchxrayvision ships, so the joint statistics — ages per
finding, the male/female and PA/AP mix, which findings occur together — are the real ones.
Pose and habitus are drawn around them (see :data:`PARAMS`), and a difficulty knob sets how
large and dense lesions are (``severity``).

Every draw comes from ``numpy.random.SeedSequence([seed, index, ...])``: subject ``index`` of a
run with global ``seed`` is the same whatever else is drawn, in whatever order or process.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxr.errors import CxrError, DataError
from cxr.phantom import lesions
from cxr.phantom.render import YAW_BINS
from cxr.phantom.types import DEFAULT_DIFFICULTY, Subject

NIH_FILE = "Data_Entry_2017_v2020.csv.gz"

# What each sampled parameter means (the keys of Subject.params; render reads them).
PARAMS: dict[str, str] = {
    "yaw_deg": "rotation about the body axis, degrees (one of render.YAW_BINS)",
    "roll_deg": "in-plane tilt, degrees, N(0, 1.5) clipped to ±4",
    "tx_mm": "lateral shift, mm, N(0, 6) clipped to ±15",
    "tz_mm": "vertical shift, mm, N(0, 6) clipped to ±15",
    "width_scale": "chest width factor, N(1 ± 2 % by sex, 0.04)",
    "height_scale": "trunk height factor, N(1 ± 1.5 % by sex, 0.03)",
    "inspiration": "lung height below the apex, N(1, 0.04); AP films × 0.95 (supine, shallow)",
    "heart_scale": "heart size, N(1, 0.05), + 0.2 %/year over 40, AP × 1.10 (magnified)",
    "elastic_mm": "amplitude of the smooth elastic deformation, U(1.5, 4) mm",
    "soft_tissue_cm": "extra soft tissue (fat) front and back, N(0.3 F / 0 M, 1.2) cm",
    "bone_density": "cortical bone factor: 1 at 20–50 y, −1 %/y (F) or −0.4 %/y (M) after 50, "
                    "lower in children, N(·, 0.05)",
}


@dataclass(frozen=True)
class NihRows:
    """The NIH metadata as arrays: one entry per image row."""

    age: np.ndarray  # float32 years
    sex: np.ndarray  # "M" / "F"
    view: np.ndarray  # "PA" / "AP"
    findings: tuple[tuple[str, ...], ...]  # () for "No Finding"; NIH spellings
    by_finding: dict[str, np.ndarray]  # finding -> row indices that have it
    normal: np.ndarray  # row indices with no finding

    def __len__(self) -> int:
        return int(self.age.shape[0])


def _nih_path() -> Path:
    """Where torchxrayvision keeps the file, found without importing it (that costs seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise DataError("torchxrayvision", f"package not installed; it ships {NIH_FILE}")
    return Path(spec.origin).parent / "data" / NIH_FILE


NIH_ASSET = "nih_rows.npz"  # the columns nih_rows needs, packed by cxr.phantom.make_assets


@functools.lru_cache(maxsize=4)
def nih_rows(path: str | None = None) -> NihRows:
    """The NIH metadata, read once per process: the packaged copy of torchxrayvision's file
    (``assets/nih_rows.npz``, 0.02 s) unless ``path`` names a CSV (pandas, 0.5 s with its import)."""
    if path is None:
        packed = _packed_nih()
        if packed is not None:
            return _rows_from_codes(*packed)
    return _rows_from_codes(*nih_codes(Path(path) if path else _nih_path()))


def nih_codes(where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(age float32, sex "M"/"F", view "PA"/"AP", label-set code per row, label sets in order
    of first appearance) from an NIH ``Data_Entry`` CSV: what :data:`NIH_ASSET` packs."""
    import pandas as pd

    cols = ["Finding Labels", "Patient Age", "Patient Gender", "View Position"]
    try:
        df = pd.read_csv(where, usecols=cols)
    except (OSError, ValueError) as err:
        raise DataError(where, f"cannot read NIH metadata ({err.__class__.__name__})") from None
    labels = df["Finding Labels"].fillna("No Finding").astype(str)
    # ~800 distinct label strings among 112k rows: parse each once, then index by row (as
    # fast as reading the file; per-row string work would take several times longer).
    codes, uniques = pd.factorize(labels, use_na_sentinel=False)
    sex = _per_value(pd.factorize(df["Patient Gender"], use_na_sentinel=False),
                     lambda v: v.upper()[:1] if v.upper()[:1] in ("M", "F") else "M")
    view = _per_value(pd.factorize(df["View Position"], use_na_sentinel=False),
                      lambda v: v.upper() if v.upper() in ("PA", "AP") else "PA")
    age = df["Patient Age"].astype(np.float32).clip(0, 100).to_numpy()
    return age, sex.astype("<U1"), view.astype("<U2"), codes.astype(np.int64), [str(u) for u in uniques]


def _packed_nih(ref: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]] | None:
    """The packaged :func:`nih_codes` (None if this install lacks it: the CSV is read instead);
    ``ref``: another packed file (a path)."""
    from importlib import resources

    ref = ref if ref is not None else resources.files("cxr.phantom") / "assets" / NIH_ASSET
    try:
        with ref.open("rb") as fh, np.load(fh) as npz:
            return (npz["age"], npz["sex"], npz["view"], npz["codes"].astype(np.int64),
                    [str(u) for u in npz["labels"]])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as err:
        raise DataError(str(ref), f"unreadable ({err.__class__.__name__})") from None


def _rows_from_codes(age: np.ndarray, sex: np.ndarray, view: np.ndarray, codes: np.ndarray,
                     uniques: list[str]) -> NihRows:
    sets = [tuple(x for x in u.split("|") if x and x != "No Finding") for u in uniques]
    findings = tuple(sets[c] for c in codes)
    names = list(dict.fromkeys(f for fs in sets for f in fs))  # in order of first appearance
    by = {f: np.flatnonzero(np.array([f in fs for fs in sets], dtype=bool)[codes]) for f in names}
    normal = np.flatnonzero(np.array([not fs for fs in sets], dtype=bool)[codes])
    return NihRows(
        age=age, sex=sex, view=view, findings=findings,
        by_finding={k: v.astype(np.int64) for k, v in by.items()},
        normal=normal.astype(np.int64),
    )


def _per_value(factorized: tuple[np.ndarray, Any], fix: Callable[[str], str]) -> np.ndarray:
    """``fix`` applied once per distinct value of a factorized text column (a missing value
    reads as "nan"), spread back over its rows (112k rows hold a handful of sexes and views)."""
    codes, uniques = factorized
    return np.array([fix(str(u)) for u in uniques], dtype=object)[codes]


def severity_from_difficulty(difficulty: float, rng: np.random.Generator) -> float:
    """Lesion severity: median ``2 ** (1 - 2·difficulty)`` (2 at 0, 1 at 0.5, 0.5 at 1), with
    a log-normal spread (σ = 0.35) so that some lesions are obvious and some subtle."""
    return float(2.0 ** (1.0 - 2.0 * difficulty) * math.exp(rng.normal(0.0, 0.35)))


def _clip(x: float, lo: float, hi: float) -> float:
    """``np.clip`` of one number, as a float: the same value, without numpy's dispatch, which
    costs more than the draw it clips (the plan draws ~10 per subject before any rendering)."""
    return float(min(max(x, lo), hi))


def bone_density(age: float, sex: str, rng: np.random.Generator) -> float:
    """Relative cortical bone density: growing through childhood, lost after 50 (faster in women)."""
    if age < 20:
        base = 0.75 + 0.25 * age / 20
    elif age <= 50:
        base = 1.0
    else:
        base = 1.0 - (0.010 if sex == "F" else 0.004) * (age - 50)
    return _clip(base + rng.normal(0.0, 0.05), 0.45, 1.2)


def draw_params(rng: np.random.Generator, age: float, sex: str, view: str) -> dict[str, float]:
    """Pose and habitus around the demographics (see :data:`PARAMS`)."""
    male = sex == "M"
    yaw = YAW_BINS[int(_yaw_cdf().searchsorted(rng.random(), side="right"))]
    inspiration = _clip(rng.normal(1.0, 0.04), 0.9, 1.1) * (0.95 if view == "AP" else 1.0)
    heart = _clip(rng.normal(1.0, 0.05), 0.88, 1.15) * (1.0 + 0.002 * max(age - 40, 0.0))
    heart *= 1.10 if view == "AP" else 1.0
    return {
        "yaw_deg": yaw,
        "roll_deg": _clip(rng.normal(0, 1.5), -4, 4),
        "tx_mm": _clip(rng.normal(0, 6), -15, 15),
        "tz_mm": _clip(rng.normal(0, 6), -15, 15),
        "width_scale": _clip(rng.normal(1.02 if male else 0.98, 0.04), 0.88, 1.12),
        "height_scale": _clip(rng.normal(1.015 if male else 0.985, 0.03), 0.9, 1.1),
        "inspiration": inspiration,
        "heart_scale": heart,
        "elastic_mm": float(rng.uniform(1.5, 4.0)),
        "soft_tissue_cm": _clip(rng.normal(0.0 if male else 0.3, 1.2), -2.0, 4.0),
        "bone_density": bone_density(age, sex, rng),
    }


@functools.lru_cache(maxsize=1)
def _yaw_weights() -> np.ndarray:
    w = np.exp(-0.5 * (np.asarray(YAW_BINS) / 3.0) ** 2)
    w = w / w.sum()
    w.flags.writeable = False  # cached: shared by every draw
    return w


@functools.lru_cache(maxsize=1)
def _yaw_cdf() -> np.ndarray:
    """What ``rng.choice(YAW_BINS, p=_yaw_weights())`` draws from (the same cumulative sums,
    one uniform, the same search), built once instead of on every draw (a tenth of a
    subject's draw time went to ``choice`` checking ``p``); a test holds them equal."""
    cdf = _yaw_weights().cumsum()
    cdf /= cdf[-1]
    cdf.flags.writeable = False
    return cdf


def _check(seed: int, index: int, difficulty: float) -> None:
    for name, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise CxrError(f"subjects: {name} must be a non-negative integer, got {v!r}")
    if not (isinstance(difficulty, (int, float)) and 0.0 <= float(difficulty) <= 1.0):
        raise CxrError(f"subjects: difficulty must be a number in [0, 1], got {difficulty!r}")


def sample_subject(seed: int, index: int, findings: tuple[str, ...] | None = None,
                   difficulty: float = DEFAULT_DIFFICULTY, allowed: tuple[str, ...] | None = None,
                   view: str | None = None, rows: NihRows | None = None) -> Subject:
    """Subject ``index`` of a run seeded ``seed``.

    ``findings=None`` copies a real NIH row's finding set (keeping only ``allowed`` findings when
    given), so multi-label draws follow the real co-occurrence. Prescribed ``findings`` (e.g.
    ``("Tuberculosis",)`` or ``()`` for a normal) take age/sex/view from a real row that has the
    first NIH finding among them (a "No Finding" row for a normal, any row otherwise).
    ``difficulty`` in [0, 1] sets lesion severity (:func:`severity_from_difficulty`).
    """
    _check(seed, index, difficulty)
    rows = rows if rows is not None else nih_rows()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1]))
    subject_seed = int(np.random.SeedSequence([int(seed), int(index), 2]).generate_state(1)[0])
    if findings is None:
        i = int(rng.integers(len(rows)))
        chosen = rows.findings[i]
        if allowed is not None:
            chosen = tuple(f for f in chosen if f in allowed)
    else:
        chosen = tuple(f for f in findings if lesions.canonical(f) is not None)
        nih = [f for f in chosen if f in rows.by_finding]
        pool = rows.by_finding[nih[0]] if nih else (rows.normal if not chosen else None)
        i = int(pool[rng.integers(pool.size)]) if pool is not None and pool.size else int(rng.integers(len(rows)))
    for f in chosen:
        lesions.canonical(f)  # unknown names fail here, with one clear line
    age, sex = float(rows.age[i]), str(rows.sex[i])
    v = view or str(rows.view[i])
    if v not in ("PA", "AP"):
        raise CxrError(f"subjects: view must be PA or AP, got {v!r}")
    params = draw_params(rng, age, sex, v)
    severity = severity_from_difficulty(float(difficulty), rng) if chosen else 1.0
    return Subject(subject_id=f"S{index:06d}", seed=subject_seed, age=age, sex=sex, view=v,
                   findings=chosen, severity=severity, params=params)
