"""Contract between the phantom's anatomy/rendering half and its acquisition/writing half.

``render`` (cxr.phantom.render) turns a :class:`Subject` into a :class:`Projection`: material
line integrals of one patient at one pose, *before* any acquisition chain. An acquisition
chain (cxr.phantom.chains) turns a Projection into a site-specific radiograph, applying the
same geometric transform to masks and boxes. The same Projection through two chains gives the
paired ground truth a harmonization study needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Deferred:
    """A dataclass field that may be given a zero-argument function instead of its value: the
    function is called on the first read, and its result kept.

    For arrays only some readers need: the heart mask and the lung paths cost resampled
    channels per subject, and only some lesions (and tests) read them; a phantom run's
    acquisition and writers never do.
    The field stays required (no default).
    """

    @staticmethod
    def slot_of(name: str) -> str:
        """Where the field ``name`` keeps its value (or its function) in the instance's dict."""
        return f"_deferred_{name}"

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = self.slot_of(name)

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            raise AttributeError(self.slot)  # tells dataclass the field has no default
        value = obj.__dict__[self.slot]
        if callable(value):
            value = obj.__dict__[self.slot] = value()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


def deferred(obj: Any, name: str) -> Any:
    """What a :class:`Deferred` field of ``obj`` holds (the value, or the function not yet
    called), to hand on without computing it."""
    return obj.__dict__[Deferred.slot_of(name)]


# Lesion difficulty when none is given: calibrated so that the small CNN of the fitness check
# (experiments/phantom_fitness.py) reaches an in-domain TB AUC near the published 0.87-0.90 of
# real Shenzhen/Montgomery screening (0.895 at 0.45; 0.834 at 0.5 since effusions no longer
# draw the lung field's edge, 0.924 at 0.4).
DEFAULT_DIFFICULTY = 0.45


@dataclass(frozen=True)
class Subject:
    """One simulated patient: identity, demographics, findings and seeded variation."""

    subject_id: str  # e.g. "S000123"
    seed: int  # drives every random choice about this subject (pose, habitus, lesions)
    age: float  # years
    sex: str  # "M" or "F"
    view: str  # "PA" or "AP"
    findings: tuple[str, ...]  # finding names (NIH14 / NINE / "Tuberculosis"); () = normal
    severity: float = 1.0  # scales lesion size/contrast; difficulty knob
    params: dict[str, Any] = field(default_factory=dict)  # sampled pose/habitus values


@dataclass
class Lesion:
    """One inserted finding, with its projected 2D mask and bounding box (projection pixels)."""

    finding: str  # label name, e.g. "Tuberculosis", "Nodule", "Effusion"
    kind: str  # how it was made, e.g. "cavity", "nodule_cluster", "miliary"
    mask: np.ndarray  # bool (H, W)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), tight around mask
    region: str = "lung"  # where it must lie: "lung" (a lung field), "heart" (heart shadow) or
    # "pleura" (a lung field and the posterior recess below it: effusions)


@dataclass
class Projection:
    """Line integrals (water-equivalent cm) of soft tissue and bone, plus anatomy masks.

    Arrays are (H, W) float32 in the projection grid (square, ``size`` pixels, patient's right
    on the image left as in a PA radiograph). Lesions are already included in ``soft``/``bone``
    (air-filled ones subtract from ``soft``).
    """

    subject: Subject
    soft: np.ndarray
    bone: np.ndarray
    body_mask: np.ndarray  # bool
    lung_mask: np.ndarray  # uint8: 0 outside, 1 image-left lung (patient right), 2 image-right
    heart_mask: np.ndarray = Deferred()  # type: ignore[assignment]  # bool; may be given as a function
    lesions: list[Lesion] = field(default_factory=list)
    pixel_spacing_mm: float = 1.0

    @property
    def size(self) -> int:
        return int(self.soft.shape[0])
