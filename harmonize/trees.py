"""Harmonize a whole dataset tree with a classical method: the tree-level face of ``harmonize/``.

A harmonized tree is written like a translated one (:func:`cxr.data.rewrite.rewrite_tree`: same
layout, files, labels and masks; new pixels), so the classifiers can train or test on it and
the paired benchmark can score it. Reference statistics come from the reference tree's
patient-level *training* split only (the same seeded split the classifiers and the CycleGAN
use), so no image later used for testing shapes the harmonizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.record import Sample
from cxr.data.rewrite import RewriteReport, rewrite_tree
from cxr.data.splits import split_records
from cxr.errors import ConfigError, DataError
from harmonize.histogram import fit_reference, match_histogram

MANIFEST = "cxr_harmonization.json"
METHODS = ("histogram",)
SPLITS = ("train", "val", "test", "all")


def reference_records(reference: str | Path, split: str = "train", seed: int = 0,
                      layout: str | None = None) -> list[Sample]:
    """The reference tree's records in its patient-level ``split`` (or all of them)."""
    if split not in SPLITS:
        raise ConfigError(f"--reference-split must be one of {', '.join(SPLITS)}, got {split!r}")
    records = load_tree(reference, layout=layout).records
    if split != "all":
        records = split_records(records, seed=seed)[split]
    if not records:
        raise DataError(reference, f"no reference images in split {split!r}")
    return records


def harmonize_tree(src: str | Path, out: str | Path, reference: str | Path, method: str = "histogram",
                   reference_split: str = "train", seed: int = 0, layout: str | None = None,
                   overwrite: bool = False, workers: int = 0,
                   progress: Callable[[int], None] | None = None, field: float = 1.0) -> RewriteReport:
    """Write ``src`` harmonized towards ``reference`` with ``method`` into the folder ``out``.

    ``field`` < 1: histograms of the central ``field`` of each side only (see
    :mod:`harmonize.histogram`).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown harmonization method {method!r} (choose from: {', '.join(METHODS)})")
    if not 0.0 < field <= 1.0:
        raise ConfigError(f"--field must be in (0, 1], got {field}")
    refs = reference_records(reference, reference_split, seed)
    ref = fit_reference((load_image(r.image) for r in refs), field=field)

    def transform(_records: Sequence[Sample], originals: list[np.ndarray]) -> list[np.ndarray]:
        return [match_histogram(o, ref) for o in originals]

    manifest = {"method": method, "reference": str(reference), "reference_split": reference_split,
                "reference_images": ref.n_images, "split_seed": seed,
                "field": field}
    return rewrite_tree(src, out, transform, manifest, MANIFEST, layout=layout, workers=workers,
                        overwrite=overwrite, progress=progress)
