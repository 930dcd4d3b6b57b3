"""``data.prematch: histogram``: domain A histogram-matched to domain B before the CycleGAN sees it.

The classical method and the learned one chained: a gray-level curve puts domain A's gray
levels where domain B has them, and the generators only learn what such a curve cannot
(sharpness, range compression, noise texture). With the key set, the trainer

1. fits the reference histogram on domain B's *training* images only (the images
   ``images_seen.txt`` lists for B: the patient-level split by ``data.split_fractions`` and
   ``data.split_seed``, or all of B with ``data.split=all``), over the central
   ``data.prematch_field`` of each side (:func:`harmonize.histogram.fit_reference`);
2. writes domain A matched to it into ``<run>/prematched/<name of A>`` (the same tree
   ``cxr harmonize`` writes, atomically: :func:`harmonize.trees.match_tree`), with the fitted
   reference in its ``cxr_harmonization.json``; a resumed run reuses it;
3. trains on that tree as domain A (so ``images_seen.txt`` lists the matched images), and
   records the reference in the ``G_ab`` generators' input contract, so that ``cxr translate
   --direction a2b`` applies the same match to the original images first
   (:mod:`gan.cyclegan.translate`). ``b2a`` translations come out with matched domain A's gray
   levels (the match is not undone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.errors import DataError
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.data import select_records
from harmonize.histogram import HistogramReference, fit_reference
from harmonize.trees import MANIFEST, match_tree

PREMATCH_DIR = "prematched"
GENERATORS = ("G_ab", "G_ab_ema")  # the modules that read domain A (the weight average too)


def prematched_tree(cfg: CycleGANConfig, run_dir: Path) -> Path:
    """Where the run keeps domain A matched: ``<run>/prematched/<A's folder name>``."""
    a = Path(cfg.data.a)
    name = a.stem if a.suffix.lower() == ".zip" else a.name
    return Path(run_dir) / PREMATCH_DIR / (name or "a")


def _recipe(cfg: CycleGANConfig) -> dict[str, Any]:
    """What the matched tree depends on; a tree made otherwise is rebuilt, never reused."""
    d = cfg.data
    return {"method": d.prematch, "source": str(d.a), "layout": d.layout_a, "reference": str(d.b),
            "reference_layout": d.layout_b, "reference_split": d.split,
            "split_fractions": list(d.split_fractions), "split_seed": d.split_seed, "field": d.prematch_field,
            # only when set, so the recipe of a run made before the key existed still matches
            **({"reference_labels_csv": d.labels_csv_b} if d.labels_csv_b is not None else {})}


def fit_domain_b(cfg: CycleGANConfig) -> HistogramReference:
    """The reference histogram of domain B's training images (the split the trainer draws B from)."""
    where = f"data.b={cfg.data.b}"
    if not Path(cfg.data.b).exists():
        raise DataError(where, "no such folder or archive")
    records = load_tree(cfg.data.b, layout=cfg.data.layout_b, labels_csv=cfg.data.labels_csv_b).records
    if not records:
        raise DataError(where, "no images found to fit the histogram match on")
    chosen = select_records(records, cfg.data, where)
    return fit_reference((load_image(r.image) for r in chosen), field=cfg.data.prematch_field)


def read_manifest(tree: Path) -> dict[str, Any] | None:
    """A matched tree's manifest, or None when the tree is absent or incomplete."""
    try:
        return json.loads((Path(tree) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def domain_a(cfg: CycleGANConfig, run_dir: Path, build: bool = True) -> str:
    """The tree to train on as domain A: ``data.a``, or its matched copy with ``data.prematch``.

    ``build``: write the matched copy when it is missing or was made with other settings (the
    main process); otherwise only name it (the other DDP processes, after the main one).
    """
    if cfg.data.prematch is None:
        return cfg.data.a
    out = prematched_tree(cfg, run_dir)
    manifest = read_manifest(out)
    if build and (manifest is None or manifest.get("recipe") != _recipe(cfg)):
        if not Path(cfg.data.a).exists():
            raise DataError(f"data.a={cfg.data.a}", "no such folder or archive")
        ref = fit_domain_b(cfg)
        meta = {"method": cfg.data.prematch, "reference": str(cfg.data.b), "reference_split": cfg.data.split,
                "reference_images": ref.n_images, "split_seed": cfg.data.split_seed, "field": ref.field,
                "recipe": _recipe(cfg), "quantiles": ref.quantiles.tolist()}
        match_tree(cfg.data.a, out, ref, meta, layout=cfg.data.layout_a, overwrite=True)
    return str(out)


def contract(cfg: CycleGANConfig, run_dir: Path) -> dict[str, Any] | None:
    """The match a translator must apply to domain A's images first (None without prematch)."""
    if cfg.data.prematch is None:
        return None
    tree = prematched_tree(cfg, run_dir)
    manifest = read_manifest(tree)
    if manifest is None or "quantiles" not in manifest:
        raise DataError(tree, f"the matched domain A has no complete {MANIFEST}")
    return {"method": manifest["method"], "field": manifest["field"], "reference_images": manifest["reference_images"],
            "quantiles": manifest["quantiles"]}


def with_contract(model_args: dict[str, dict], prematch: dict[str, Any] | None) -> dict[str, dict]:
    """``model_args`` with the match recorded in the input contract of every generator reading A."""
    if prematch is None:
        return model_args
    out = dict(model_args)
    for name in GENERATORS:
        if name in out:
            out[name] = {**out[name], "input": {**out[name]["input"], "prematch": prematch}}
    return out


def reference_of(prematch: dict[str, Any]) -> HistogramReference:
    """The fitted reference a generator's input contract records."""
    return HistogramReference(quantiles=np.asarray(prematch["quantiles"], dtype=np.float64),
                              n_images=int(prematch["reference_images"]), field=float(prematch["field"]))
