"""The one record type every loader returns: a chest X-ray sample and what is known about it.

Labels are a float vector aligned with a named label set: 1 = present, 0 = absent, NaN = not
labelled (torchxrayvision's convention), so trees with different label sets can be mixed.
Coordinates of boxes are in the pixels of the image file as stored on disk (``original_size``
says which size that is when the file is a resized variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Canonical label sets --------------------------------------------------------------------------

NIH14: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
NINE: tuple[str, ...] = (
    "Edema", "No Finding", "Pneumonia", "Tuberculosis", "Cardiomegaly", "Emphysema", "Covid",
    "Effusion", "Atelectasis",
)
TB: tuple[str, ...] = ("Tuberculosis",)
VINDR: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
)  # class ids 0..13; class 14 "No finding" is the all-zero vector

SEXES = ("M", "F", "O")
VIEWS = ("PA", "AP", "LL")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``[x0, x1) x [y0, y1)`` in stored-image pixels, with its finding."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    reader: str | None = None  # e.g. VinDr radiologist "R8"

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


@dataclass
class Sample:
    """One chest X-ray image and its annotations.

    ``image`` is a file path, or ``"<archive>.zip!/<member>"`` for an image read straight from
    a zip archive (see :func:`cxr.data.io.read_bytes`). ``masks`` maps a mask name (e.g.
    ``"lung_image_left"``) to such a reference.
    """

    image: str
    patient_id: str
    site: str
    labels: np.ndarray  # float32, shape (len(label_names),), values 1/0/NaN
    label_names: tuple[str, ...]
    age: float | None = None  # years
    sex: str | None = None  # one of SEXES
    view: str | None = None  # one of VIEWS
    follow_up: int | None = None
    pixel_spacing: tuple[float, float] | None = None  # mm, (x, y)
    original_size: tuple[int, int] | None = None  # (width, height) of the acquisition
    boxes: list[Box] = field(default_factory=list)
    masks: dict[str, str] = field(default_factory=dict)
    split: str | None = None  # official split when the source defines one
    source: str | None = None  # origin: "real", "synthetic", "harmonized", or a dataset name
    report: str | None = None  # clinical reading text, when the source has one
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float32).reshape(-1)
        if self.labels.shape[0] != len(self.label_names):
            raise ValueError(
                f"{self.image}: {self.labels.shape[0]} labels for {len(self.label_names)} names"
            )

    @property
    def findings(self) -> tuple[str, ...]:
        """Names of the labels that are present (value 1)."""
        return tuple(n for n, v in zip(self.label_names, self.labels) if v == 1)

    def label(self, name: str) -> float:
        """Value of one label (NaN when the label set does not have it)."""
        if name not in self.label_names:
            return math.nan
        return float(self.labels[self.label_names.index(name)])


def label_vector(present: set[str] | list[str], names: tuple[str, ...]) -> np.ndarray:
    """0/1 vector over ``names`` with ones where the name is in ``present``."""
    wanted = set(present)
    return np.array([1.0 if n in wanted else 0.0 for n in names], dtype=np.float32)


def relabel(sample: Sample, names: tuple[str, ...]) -> Sample:
    """Copy of ``sample`` with labels aligned to ``names``; labels it lacks become NaN."""
    values = np.array([sample.label(n) for n in names], dtype=np.float32)
    copy = Sample(**{**sample.__dict__, "labels": values, "label_names": names})
    return copy
