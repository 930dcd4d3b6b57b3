"""Harmonize a whole dataset tree with a classical method: the tree-level face of ``harmonize/``.

A harmonized tree is written like a translated one (:func:`cxr.data.rewrite.rewrite_tree`: same
layout, files, labels and masks; new pixels), so the classifiers can train or test on it and
the paired benchmark can score it. Reference statistics come from the reference tree's
patient-level *training* split only (the same seeded split the classifiers and the CycleGAN
use), so no image later used for testing shapes the harmonizer.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxr.data.image import decode_image, load_image
from cxr.data.io import read_bytes, split_ref
from cxr.data.layouts import load_tree
from cxr.data.masks import has_lung_mask, load_lung_mask, read_binary_mask
from cxr.data.record import Sample
from cxr.data.rewrite import RewriteReport, encode_like, rewrite_tree
from cxr.data.splits import split_records
from cxr.errors import ConfigError, DataError
from cxr.phantom.writers import TRUTH_DIR
from harmonize.histogram import HistogramReference, match_histogram
from harmonize.methods import HARMONIZERS, create_harmonizer, load_harmonizer

MANIFEST = "cxr_harmonization.json"
FITTED = "cxr_harmonizer.safetensors"  # the fitted state, inside the harmonized tree
METHODS = tuple(HARMONIZERS)
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


def harmonize_tree(src: str | Path, out: str | Path, reference: str | Path | None = None, method: str = "histogram",
                   reference_split: str = "train", seed: int = 0, layout: str | None = None,
                   overwrite: bool = False, workers: int = 0,
                   progress: Callable[[int], None] | None = None, field: float | None = None,
                   options: dict[str, Any] | None = None, fitted: str | Path | None = None,
                   save_fitted: str | Path | None = None) -> RewriteReport:
    """Write ``src`` harmonized towards ``reference`` with ``method`` into the folder ``out``.

    The harmonizer (:mod:`harmonize.methods`, ``options`` its options) is fitted on the
    reference tree's patient-level ``reference_split``, or loaded from the file ``fitted``
    (then ``reference`` may be None). ``field`` < 1: histograms of the central ``field`` of each
    side only (``histogram``; see :mod:`harmonize.histogram`). The fitted state is written into
    ``out`` as :data:`FITTED` (and to ``save_fitted`` when given); the manifest names the method,
    its options and the state's SHA-256. Methods that use lung masks find them in the trees
    (:func:`lung_mask_finder`); images without one use the whole image, said in one note.
    """
    options = dict(options or {})
    if field is not None:
        if not 0.0 < field <= 1.0:
            raise ConfigError(f"--field must be in (0, 1], got {field}")
        if method == "histogram":
            options["field"] = field
        elif field != 1.0:
            raise ConfigError(f"--field applies to --method histogram only, not {method}")
    fallback = MaskFallback()
    manifest: dict[str, Any] = {"method": method}
    if fitted is not None:
        harmonizer = load_harmonizer(fitted, method)
        unknown = {k: v for k, v in options.items() if harmonizer.options.get(k) != v}
        if unknown:
            raise ConfigError(f"{fitted}: fitted with {harmonizer.options}; options {unknown} cannot change it")
        manifest["fitted_from"] = str(fitted)
    else:
        harmonizer = create_harmonizer(method, **options)
        if harmonizer.fitted:
            if reference is None:
                raise ConfigError(f"--method {method} needs --reference (or a saved state: --fitted FILE)")
            refs = reference_records(reference, reference_split, seed)
            if len(refs) < 2:
                raise DataError(reference, f"only one reference image in split {reference_split!r}: too few to "
                                           f"fit {method} (needs at least 2)")
            masks = lung_mask_finder(reference, fallback, "reference") if harmonizer.uses_masks else None
            harmonizer.fit((load_image(r.image) for r in refs),
                           (masks(r) for r in refs) if masks is not None else None)
            manifest.update({"reference": str(reference), "reference_split": reference_split,
                             "reference_images": harmonizer.n_images, "split_seed": seed})
    manifest["options"] = harmonizer.options
    if method == "histogram":
        manifest["field"] = harmonizer.options["field"]
    state = harmonizer.to_bytes()
    manifest.update({"fitted_state": FITTED, "fitted_state_sha256": hashlib.sha256(state).hexdigest()})
    masks = lung_mask_finder(src, fallback, "source") if harmonizer.uses_masks else None

    def transform(records: Sequence[Sample], originals: list[np.ndarray]) -> list[np.ndarray]:
        return [harmonizer.apply(o, masks(r) if masks is not None else None) for r, o in zip(records, originals)]

    fitted_on = manifest.get("reference", manifest.get("fitted_from"))
    derivation = f"cxr harmonize {method}" + (f", reference {fitted_on}" if fitted_on else "")
    report = rewrite_tree(src, out, transform, manifest, MANIFEST, layout=layout, workers=workers,
                          overwrite=overwrite, progress=progress, derivation=derivation,
                          extra_files={FITTED: state})
    if save_fitted is not None:
        harmonizer.save(save_fitted)
    fallback.notice()
    return report


class MaskFallback:
    """Counts images that a mask method had to treat whole; :meth:`notice` says so in one line."""

    def __init__(self) -> None:
        self.missing: dict[str, list[int]] = {}  # role -> [missing, seen]

    def count(self, role: str, missing: bool) -> None:
        seen = self.missing.setdefault(role, [0, 0])
        seen[0] += missing
        seen[1] += 1

    def notice(self) -> None:
        parts = [f"{m} of {n} {role} images" for role, (m, n) in self.missing.items() if m]
        if parts:
            print(f"cxr: note: no lung mask for {' and '.join(parts)}: matched on the whole image instead",
                  file=sys.stderr)


def lung_mask_finder(tree: str | Path, fallback: MaskFallback | None = None,
                     role: str = "source") -> Callable[[Sample], np.ndarray | None]:
    """A function giving a record of ``tree`` its lung mask (bool (H, W)) or None.

    Masks come from the record (the tree's own masks, e.g. Montgomery's ``ManualMask``) or,
    for a phantom tree, from ``phantom_truth/manifest.csv`` beside it (its ``lung_mask``
    column). Each miss is counted in ``fallback``.
    """
    truth = _phantom_lungs(Path(tree))

    def find(record: Sample) -> np.ndarray | None:
        mask = None
        if has_lung_mask(record):
            mask = load_lung_mask(record) != 0
        elif (ref := truth.get(_key(record.image))) is not None:
            mask = read_binary_mask(str(ref))
        if fallback is not None:
            fallback.count(role, mask is None)
        return mask

    return find


def _key(ref: str | Path) -> str:
    return os.path.normpath(os.path.abspath(str(ref)))


def _phantom_lungs(tree: Path) -> dict[str, Path]:
    """Image path -> lung label file, from a phantom truth manifest in ``tree`` or its parent."""
    for root in (tree, tree.parent):
        manifest = root / TRUTH_DIR / "manifest.csv"
        if manifest.is_file():
            with open(manifest, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            return {_key(root / r["image"]): root / r["lung_mask"] for r in rows
                    if r.get("image") and r.get("lung_mask")}
    return {}


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
