"""Harmonize a whole dataset tree with a classical method: the tree-level face of ``harmonize/``.

A harmonized tree is written like a translated one (:func:`cxr.data.rewrite.rewrite_tree`: same
layout, files, labels and masks; new pixels), so the classifiers can train or test on it and
the paired benchmark can score it. Reference statistics come from the reference tree's
patient-level *training* split only (the same seeded split the classifiers and the CycleGAN
use), so no image later used for testing shapes the harmonizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxr.data.image import decode_image, load_image
from cxr.data.io import read_bytes, split_ref
from cxr.data.layouts import load_tree
from cxr.data.record import Sample
from cxr.data.rewrite import RewriteReport, encode_like, rewrite_tree
from cxr.data.splits import split_records
from cxr.errors import ConfigError, DataError
from harmonize.histogram import HistogramReference, fit_reference, match_histogram

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
    manifest = {"method": method, "reference": str(reference), "reference_split": reference_split,
                "reference_images": ref.n_images, "split_seed": seed,
                "field": field}
    return match_tree(src, out, ref, manifest, layout=layout, workers=workers, overwrite=overwrite,
                      progress=progress)


def match_tree(src: str | Path, out: str | Path, ref: HistogramReference, manifest: dict[str, Any],
               layout: str | None = None, overwrite: bool = False, workers: int = 0,
               progress: Callable[[int], None] | None = None) -> RewriteReport:
    """Write ``src`` with every image histogram-matched to the fitted ``ref`` into the folder
    ``out`` (atomically, by :func:`cxr.data.rewrite.rewrite_tree`); ``manifest`` says what made it."""

    def transform(_records: Sequence[Sample], originals: list[np.ndarray]) -> list[np.ndarray]:
        return [match_histogram(o, ref) for o in originals]

    derivation = f"cxr harmonize {manifest.get('method', 'histogram')}, reference {manifest.get('reference')}"
    return rewrite_tree(src, out, transform, manifest, MANIFEST, layout=layout, workers=workers,
                        overwrite=overwrite, progress=progress, derivation=derivation)


def match_as_written(image: np.ndarray, ref: HistogramReference, source: str) -> np.ndarray:
    """``image``, decoded from the file ``source``, matched to ``ref`` and read back as
    :func:`match_tree` writes it (the source's format and bit depth): exactly what a loader
    reads from the matched tree, without writing it."""
    matched = np.clip(match_histogram(image, ref), 0.0, 1.0)
    return decode_image(encode_like(read_bytes(source), split_ref(source)[1] or source, matched), source)
