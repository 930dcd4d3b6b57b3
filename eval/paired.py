"""Scoring harmonization against paired truth: SSIM and PSNR to the true target-site renders.

The phantom renders every subject through every site's acquisition chain under one geometry
(``phantom_truth/``, see :mod:`cxr.phantom.writers`), so a Montgomery-like image translated to
Shenzhen-like can be compared pixel by pixel with the *same subject* as the Shenzhen-like chain
really renders it. Three candidates are scored the same way:

* ``untranslated`` -- the source image as it is (how far apart the sites are);
* ``histogram`` -- histogram matching to the target tree's training images
  (:mod:`harmonize.histogram`, the classical baseline);
* ``cyclegan`` (or any other method) -- the translated tree's image of the same file.

Besides the whole image, SSIM is also reported over the lung fields alone (``ssim_lung``, from
``phantom_truth/lung``): the source site's collimation borders and burnt-in side marker stay in
the truth render (same geometry, other chain), while an unpaired translator learns that the
target site's images have none and tends to remove them.

SSIM (Wang et al. 2004; 11×11 Gaussian window, σ = 1.5, K = (0.01, 0.03), mean of the SSIM
map) and PSNR come from kornia (its SSIM equals torchmetrics' to 1e-6; kornia imports in a
fraction of the time), on images in [0, 1] at the file's own size. Reported per method as the
mean over subjects, with the subject count.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from cxr.data import preprocess
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.record import Sample
from cxr.data.splits import split_records
from cxr.errors import DataError
from cxr.metrics.intervals import patient_bootstrap
from cxr.metrics.ssim import SSIM_WINDOW, ssim_terms
from cxr.phantom.sheet import fit_tile, save_png
from harmonize.histogram import fit_reference, match_histogram
from harmonize.trees import reference_records

TRUTH_DIR = "phantom_truth"


def _pair_tensors(pred: np.ndarray, target: np.ndarray, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise DataError(where or "image pair", f"shapes differ: {pred.shape} vs {target.shape}")
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None, None]
    return p, t


CENTRE_FIELD = 0.7  # central fraction of each side scored apart from the border (see centre_mask)


def ssim_map(pred: np.ndarray, target: np.ndarray) -> torch.Tensor:
    """kornia's (H, W) SSIM map of two (H, W) images in [0, 1]."""
    from kornia.metrics import ssim as kornia_ssim

    p, t = _pair_tensors(pred, target)
    return kornia_ssim(p, t, SSIM_WINDOW, max_val=1.0)[0, 0]


def ssim_factors(pred: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of :func:`ssim_map` as (H, W) maps, luminance l and contrast-structure cs
    (:mod:`cxr.metrics.ssim`), whose product is the SSIM map.

    Where SSIM is lost says what a translator got wrong: a low l is a gray-level error (a
    window, an offset), a low cs lost or invented edges and texture."""
    lum, cs = ssim_terms(*_pair_tensors(pred, target))
    return lum[0, 0], cs[0, 0]


def masked_mean(values: torch.Tensor, mask: np.ndarray | None) -> float:
    """Mean of an SSIM map, over the pixels of ``mask`` when one is given."""
    if mask is None:
        return float(values.mean())
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    if m.shape != values.shape or not m.any():
        raise DataError("mask", f"mask of shape {tuple(m.shape)} with {int(m.sum())} pixels does not fit "
                                f"an image of shape {tuple(values.shape)}")
    return float(values[m].mean())


def ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Structural similarity of two (H, W) images in [0, 1]: the mean of kornia's SSIM map,
    over the pixels of ``mask`` when one is given (e.g. the lung fields)."""
    return masked_mean(ssim_map(pred, target), mask)


def centre_mask(shape: tuple[int, int], field: float = CENTRE_FIELD) -> np.ndarray:
    """The central ``field`` of each side: where the anatomy is, and exactly the pixels the
    CycleGAN's discriminators judge with ``loss.d_field`` = ``field`` (the same
    :func:`cxr.data.preprocess.centre_box`); outside it lie collimation blades, markers and
    frame edges."""
    return preprocess.centre_mask(shape, field)


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two (H, W) images in [0, 1] (inf when equal)."""
    from kornia.metrics import psnr as kornia_psnr

    p, t = _pair_tensors(pred, target)
    if torch.equal(p, t):
        return math.inf
    return float(kornia_psnr(p, t, max_val=1.0))


def pair_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """One (prediction, truth) pair's scores: SSIM, PSNR, SSIM inside and outside the central
    70 % (``ssim_centre``, ``ssim_border``: NaN when the centre is everything), SSIM's two
    factors (``luminance``, ``cs``), ``wide`` (1.0 for a landscape frame) and, given ``mask``,
    SSIM inside it (``ssim_lung``)."""
    values = ssim_map(pred, target)
    centre = centre_mask(values.shape)
    lum, cs = ssim_factors(pred, target)
    out = {"ssim": masked_mean(values, None), "psnr": psnr(pred, target),
           "ssim_centre": masked_mean(values, centre),
           "ssim_border": masked_mean(values, ~centre) if not centre.all() else math.nan,
           "luminance": float(lum.mean()), "cs": float(cs.mean()),
           "wide": float(values.shape[-1] > values.shape[-2])}
    if mask is not None:
        out["ssim_lung"] = masked_mean(values, mask)
    return out


CI_LEVEL = 0.95
CI_BOOT = 1000


def summarize(rows: Sequence[dict[str, float]], patient_ids: Sequence | None = None,
              n_boot: int = CI_BOOT, seed: int = 0) -> dict[str, float]:
    """Means of :func:`pair_metrics` rows (see :func:`score_pairs` for the keys) and, given one
    patient id per row, a 95 % patient-bootstrap interval of the mean SSIM (``ssim_lo``,
    ``ssim_hi``; :func:`cxr.metrics.intervals.patient_bootstrap`): how far the figure could move with
    other patients of the same kind, on top of the run-to-run spread over seeds."""
    if not rows:
        return {"n": 0, "ssim": math.nan, "ssim_std": math.nan, "psnr": math.nan}
    col = {key: np.asarray([r[key] for r in rows], dtype=np.float64) for key in rows[0]}
    s = col["ssim"]
    out = {"n": len(rows), "ssim": float(s.mean()), "ssim_std": float(s.std()), "psnr": float(col["psnr"].mean()),
           "ssim_centre": float(col["ssim_centre"].mean()), "ssim_border": float(col["ssim_border"].mean()),
           "luminance": float(col["luminance"].mean()), "cs": float(col["cs"].mean())}
    wide = col["wide"] > 0.5
    for name, chosen in (("portrait", ~wide), ("landscape", wide)):
        out[f"n_{name}"] = int(chosen.sum())
        for key in ("ssim", "luminance", "cs"):
            out[f"{key}_{name}"] = float(col[key][chosen].mean()) if chosen.any() else math.nan
    if "ssim_lung" in col:
        out["ssim_lung"] = float(col["ssim_lung"].mean())
    if patient_ids is not None:
        ci = patient_bootstrap(lambda idx: {"ssim": float(s[idx].mean())}, len(s), patient_ids, n_boot, seed,
                               CI_LEVEL)
        out["ssim_lo"], out["ssim_hi"] = ci["ssim"]
    return out


def score_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]],
                masks: Iterable[np.ndarray | None] | None = None,
                patient_ids: Sequence | None = None) -> dict[str, float]:
    """Mean SSIM and PSNR over (prediction, truth) pairs, their count and SSIM spread, the mean
    SSIM inside and outside the central 70 % (``ssim_centre``, ``ssim_border``; see
    :func:`centre_mask`), the mean SSIM of portrait (height ≥ width) and of landscape frames
    apart (``ssim_portrait``/``n_portrait``, ``ssim_landscape``/``n_landscape``; NaN where
    there are none: one site's plates may come in both orientations while the other's never
    do), and with ``masks`` (one per pair) the mean SSIM inside them (``ssim_lung``).

    Also the means of SSIM's two factors (:func:`ssim_factors`), over all pairs and per frame
    orientation: ``luminance``/``cs``, ``luminance_portrait``/``cs_portrait``,
    ``luminance_landscape``/``cs_landscape``; and with ``patient_ids`` (one per pair) the 95 %
    patient-bootstrap interval of the mean SSIM (``ssim_lo``/``ssim_hi``, :func:`summarize`)."""
    masks = iter(masks) if masks is not None else None
    rows = [pair_metrics(pred, target, next(masks) if masks is not None else None) for pred, target in pairs]
    return summarize(rows, patient_ids)


def paired_gain(rows: Sequence[dict[str, float]], baseline: Sequence[dict[str, float]], patient_ids: Sequence,
                n_boot: int = CI_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """Mean SSIM of ``rows`` minus that of ``baseline`` on the same images, with a 95 % paired
    patient-bootstrap interval: both are scored on the same resampled patients, so the interval
    is about the difference (is a method *clearly* above a baseline?), not about the patients."""
    d = np.asarray([r["ssim"] for r in rows]) - np.asarray([b["ssim"] for b in baseline])
    if d.size == 0:
        return math.nan, math.nan, math.nan
    lo, hi = patient_bootstrap(lambda idx: {"d": float(d[idx].mean())}, len(d), patient_ids, n_boot, seed,
                               CI_LEVEL)["d"]
    return float(d.mean()), lo, hi


# ----------------------------------------------------------------------------------------------
# Phantom pairs


@dataclass(frozen=True)
class PhantomPair:
    """One subject of the source tree and its true render by the target site."""

    subject_id: str
    source: Path  # the image in the source tree (the source site's render)
    truth: Path  # phantom_truth/<target>/<subject>.png
    rel: str  # path of the image inside its site folder, e.g. "CXR_png/MCUCXR_0001_0.png"
    site_folder: str  # e.g. "MontgomerySet"
    lung: Path | None = None  # phantom_truth/lung/<subject>.png: 0 outside, 1 and 2 the lungs


def phantom_pairs(phantom: str | Path, source_tree: str = "montgomery", target_site: str = "shenzhen") -> list[PhantomPair]:
    """Every image of ``source_tree`` in a phantom folder, paired with its ``target_site`` render."""
    phantom = Path(phantom)
    manifest = phantom / TRUTH_DIR / "manifest.csv"
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(manifest, "no phantom truth manifest (write the phantom with `cxr phantom`)") from None
    column = f"render_{target_site}"
    if rows and column not in rows[0]:
        sites = [c[len("render_"):] for c in rows[0] if c.startswith("render_")]
        raise DataError(manifest, f"no renders for site {target_site!r} (sites: {', '.join(sites)})")
    pairs = []
    for row in rows:
        if row["tree"] != source_tree:
            continue
        folder, _, rel = row["image"].partition("/")
        lung = phantom / row["lung_mask"] if row.get("lung_mask") else None
        pairs.append(PhantomPair(row["subject_id"], phantom / row["image"], phantom / row[column], rel, folder, lung))
    if not pairs:
        raise DataError(manifest, f"no images of tree {source_tree!r}")
    return pairs


def target_folder(phantom: str | Path, target_site: str = "shenzhen") -> Path:
    """The site folder of the phantom tree whose images the target site rendered."""
    pairs = phantom_pairs(phantom, source_tree=target_site, target_site=target_site)
    return Path(phantom) / pairs[0].site_folder


def _site_folder(pair: PhantomPair) -> Path:
    """The source tree's site folder that holds ``pair.source`` (``pair.rel`` inside it)."""
    return pair.source.parents[len(Path(pair.rel).parts) - 1]


def source_records(pairs: Sequence[PhantomPair]) -> list[Sample]:
    """The source tree's records (one read of the tree), for callers that split or look up
    patients several times: pass them as ``records`` to :func:`split_subset` and
    :func:`pair_patient_ids`."""
    return load_tree(_site_folder(pairs[0])).records if pairs else []


def split_subset(pairs: Sequence[PhantomPair], split: str = "test", seed: int = 0,
                 records: Sequence[Sample] | None = None) -> list[PhantomPair]:
    """The pairs whose source image is in the source tree's patient-level ``split`` (or all);
    ``records`` (:func:`source_records`) spares reading the tree again."""
    if split == "all" or not pairs:
        return list(pairs)
    records = source_records(pairs) if records is None else records
    chosen = {str(Path(r.image)) for r in split_records(records, seed=seed)[split]}
    return [p for p in pairs if str(p.source) in chosen]


def split_subsets(pairs: Sequence[PhantomPair], splits: Sequence[str], seed: int = 0,
                  records: Sequence[Sample] | None = None) -> dict[str, list[PhantomPair]]:
    """:func:`split_subset` for each of ``splits``, ``{split: pairs}``, from one read of the tree."""
    records = source_records(pairs) if records is None else records
    return {split: split_subset(pairs, split, seed, records) for split in splits}


def pair_patient_ids(pairs: Sequence[PhantomPair], records: Sequence[Sample] | None = None) -> list[str]:
    """Each pair's patient, as the source tree's loader names it (the subject id where the tree
    has no record of the image): the unit the bootstrap intervals resample."""
    if not pairs:
        return []
    records = source_records(pairs) if records is None else records
    by_image = {str(Path(r.image)): r.patient_id for r in records}
    return [by_image.get(str(p.source)) or p.subject_id for p in pairs]


BASELINES = ("untranslated", "histogram")  # what every other method's gain is measured against


def harmonization_scores(pairs: Sequence[PhantomPair],
                         methods: dict[str, Callable[[PhantomPair, np.ndarray], np.ndarray]],
                         patient_ids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """SSIM/PSNR to the truth of ``untranslated`` and of each method ``(pair, source image) → image``.

    When every pair has a lung mask, ``ssim_lung`` scores the lung fields alone: the anatomy a
    reader looks at, without the collimation borders and side markers, which belong to the
    source site's geometry and which an unpaired translator is pushed to remove.

    Every method's mean SSIM gets a 95 % patient-bootstrap interval (``ssim_lo``/``ssim_hi``),
    and every method other than the :data:`BASELINES` its paired gain over each of them
    (``gain_vs_<baseline>`` with ``_lo``/``_hi``, :func:`paired_gain`). ``patient_ids`` (one per
    pair) spares reading the source tree again when the caller already has them
    (:func:`pair_patient_ids`).
    """
    truths = [load_image(p.truth) for p in pairs]
    sources = [load_image(p.source) for p in pairs]
    lungs = [load_image(p.lung) > 0 for p in pairs] if pairs and all(p.lung for p in pairs) else [None] * len(pairs)
    ids = list(patient_ids) if patient_ids is not None else pair_patient_ids(pairs)
    rows = {"untranslated": [pair_metrics(src, t, m) for src, t, m in zip(sources, truths, lungs)]}
    for name, method in methods.items():
        rows[name] = [pair_metrics(method(p, src), t, m) for p, src, t, m in zip(pairs, sources, truths, lungs)]
    out = {name: summarize(r, ids) for name, r in rows.items()}
    for name, r in rows.items():
        for base in BASELINES:
            if name not in BASELINES and base in rows and r:
                gain = paired_gain(r, rows[base], ids)
                for suffix, value in zip(("", "_lo", "_hi"), gain):
                    out[name][f"gain_vs_{base}{suffix}"] = value
    return out


def translated_tree_method(translated: str | Path) -> Callable[[PhantomPair, np.ndarray], np.ndarray]:
    """A method reading each pair's image from a translated copy of the source site folder."""
    root = Path(translated)
    return lambda pair, _src: load_image(root / pair.rel)


def histogram_method(reference_images: Iterable[np.ndarray], field: float = 1.0
                     ) -> Callable[[PhantomPair, np.ndarray], np.ndarray]:
    """A method matching each source image's histogram to ``reference_images``' (the baseline;
    ``field`` < 1: the central field's histograms, see :mod:`harmonize.histogram`)."""
    ref = fit_reference(reference_images, field=field)
    return lambda _pair, src: match_histogram(src, ref)


def histogram_reference_images(phantom: str | Path, target_site: str = "shenzhen", seed: int = 0) -> list[np.ndarray]:
    """The images histogram matching is fitted to: the target tree's patient-level training
    split (``cxr harmonize``'s default reference split), so no scored image shapes it."""
    return [load_image(r.image) for r in reference_records(target_folder(phantom, target_site), "train", seed)]


def phantom_report(phantom: str | Path, translated: str | Path | None = None, source_tree: str = "montgomery",
                   target_site: str = "shenzhen", split: str = "test", seed: int = 0,
                   histogram_field: float | None = None) -> dict[str, dict[str, float]]:
    """Scores of ``untranslated``, ``histogram`` and (given a translated copy of the source site
    folder) ``cyclegan`` images of ``source_tree`` against their true ``target_site`` renders.

    The histogram reference is the target tree's patient-level training split; ``split``
    ("test", "val", "train" or "all") picks the source images scored (split with ``seed``).
    ``histogram_field`` (< 1) adds ``histogram_centre``: matching the central field's histograms.
    """
    return phantom_reports(phantom, translated, source_tree, target_site, (split,), seed, histogram_field)[split]


def phantom_reports(phantom: str | Path, translated: str | Path | None = None, source_tree: str = "montgomery",
                    target_site: str = "shenzhen", splits: Sequence[str] = ("val", "test"), seed: int = 0,
                    histogram_field: float | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`phantom_report` for several splits at once, ``{split: scores}``: the histogram
    reference (the target tree's training images) is loaded and fitted once, not per split."""
    reference = histogram_reference_images(phantom, target_site, seed)
    methods = {"histogram": histogram_method(reference)}
    if histogram_field is not None and histogram_field < 1:
        methods["histogram_centre"] = histogram_method(reference, histogram_field)
    if translated is not None:
        methods["cyclegan"] = translated_tree_method(translated)
    pairs = phantom_pairs(phantom, source_tree, target_site)
    records = source_records(pairs)  # one read of the tree for every split
    patient = dict(zip((p.subject_id for p in pairs), pair_patient_ids(pairs, records)))
    return {split: harmonization_scores(chosen, methods, [patient[p.subject_id] for p in chosen])
            for split, chosen in split_subsets(pairs, splits, seed, records).items()}


FIELDS = (1.0, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)


def field_sweep(phantom: str | Path, fields: Sequence[float] = FIELDS, splits: Sequence[str] = ("val", "test"),
                source_tree: str = "montgomery", target_site: str = "shenzhen", seed: int = 0
                ) -> dict[str, dict[float, dict[str, float]]]:
    """Histogram matching's scores for each central ``field``, per source split: ``{split: {field: scores}}``.

    The honest way to pick the field is on ``val`` and to report ``test`` once (:func:`best_field`);
    the reference is the target tree's training split, as in :func:`phantom_report`.
    """
    reference = histogram_reference_images(phantom, target_site, seed)
    methods = {f: histogram_method(reference, f) for f in fields}
    pairs = phantom_pairs(phantom, source_tree, target_site)
    out: dict[str, dict[float, dict[str, float]]] = {}
    for split, chosen in split_subsets(pairs, splits, seed).items():
        sources = [load_image(p.source) for p in chosen]
        truths = [load_image(p.truth) for p in chosen]
        out[split] = {f: score_pairs(zip((m(p, src) for p, src in zip(chosen, sources)), truths))
                      for f, m in methods.items()}
    return out


def best_field(scores: dict[float, dict[str, float]], metric: str = "ssim") -> float:
    """The field with the highest ``metric`` (the widest one on a tie: the least departure from
    whole-image matching)."""
    return max(scores, key=lambda f: (scores[f][metric], f))


def examples_figure(pairs: Sequence[PhantomPair], translated: str | Path, out: str | Path,
                    tile: int = 128, caption_h: int = 14) -> Path:
    """A PNG with one row per pair: the source image, its translation (read from a translated
    copy of the source site folder) and the truth, each captioned with its SSIM to the truth,
    so a reader sees what the numbers mean. Written atomically."""
    from PIL import Image, ImageDraw

    if not pairs:
        raise ValueError("no pairs to show")
    read = translated_tree_method(translated)
    sheet = Image.new("L", (3 * tile, len(pairs) * (tile + caption_h)), 0)
    draw = ImageDraw.Draw(sheet)
    for i, pair in enumerate(pairs):
        src, truth = load_image(pair.source), load_image(pair.truth)
        y = i * (tile + caption_h)
        for j, (name, img) in enumerate((("source", src), ("translated", read(pair, src)), ("truth", truth))):
            sheet.paste(fit_tile(img, tile), (j * tile, y))
            caption = name if name == "truth" else f"{name} {ssim(img, truth):.3f}"
            draw.text((j * tile + 2, y + tile + 1), caption, fill=255)
    return save_png(sheet, out)


def format_scores(scores: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table: method, n, SSIM (± sd), PSNR, and the lung-field, central and
    border SSIMs when scored (and portrait and landscape frames apart where both occur)."""
    extra = [(key, head) for key, head in (("ssim_lung", "SSIM lung"), ("ssim_centre", "centre"),
                                            ("ssim_border", "border"), ("ssim_portrait", "portrait"),
                                            ("ssim_landscape", "landscape"))
             if all(key in s for s in scores.values())]
    if not _both_orientations(scores):
        extra = [(key, head) for key, head in extra if key not in ("ssim_portrait", "ssim_landscape")]
    w = _name_width(scores)
    ci = all("ssim_lo" in s for s in scores.values())
    lines = [f"{'method':<{w}} {'n':>4} {'SSIM':>7} {'± sd':>6}" + (f" {'95 % CI':>13}" if ci else "")
             + f" {'PSNR dB':>8}" + "".join(f" {head:>9}" for _, head in extra)]
    for name, s in scores.items():
        lines.append(f"{name:<{w}} {s['n']:>4} {s['ssim']:>7.4f} {s['ssim_std']:>6.3f}"
                     + (f" {s['ssim_lo']:>6.4f}-{s['ssim_hi']:<6.4f}" if ci else "") + f" {s['psnr']:>8.2f}"
                     + "".join(f" {s[key]:>9.4f}" for key, _ in extra))
    return "\n".join(lines)


GAINS_TITLE = "SSIM gained over each baseline on the same images (95 % paired patient-bootstrap interval)"


def format_gains(scores: dict[str, dict[str, float]]) -> str:
    """:data:`GAINS_TITLE`, then one line per method and baseline (``gain_vs_*`` of
    :func:`harmonization_scores`); empty when no method has a gain."""
    lines = []
    for name, s in scores.items():
        for base in BASELINES:
            if f"gain_vs_{base}" in s:
                g, lo, hi = (s[f"gain_vs_{base}{k}"] for k in ("", "_lo", "_hi"))
                lines.append(f"{name} - {base}: {g:+.4f} ({lo:+.4f} to {hi:+.4f})")
    return "\n".join([GAINS_TITLE, *lines]) if lines else ""


FACTORS_TITLE = "SSIM's factors: luminance (gray level) and contrast-structure (edges, texture)"


def format_factors(scores: dict[str, dict[str, float]]) -> str:
    """:data:`FACTORS_TITLE`, then SSIM's factors per method (:func:`ssim_factors`): luminance
    ``l`` and contrast-structure ``cs``, whole split and, where both occur, portrait and
    landscape frames apart."""
    frames = [""] + (["_portrait", "_landscape"] if _both_orientations(scores) else [])
    w = _name_width(scores)
    heads = "".join(f" {'l' + f:>12} {'cs' + f:>13}" for f in frames)
    lines = [FACTORS_TITLE, f"{'method':<{w}}{heads}"]
    for name, s in scores.items():
        lines.append(f"{name:<{w}}" + "".join(f" {s['luminance' + f]:>12.4f} {s['cs' + f]:>13.4f}" for f in frames))
    return "\n".join(lines)


BAND_SIGMAS = (1.0, 2.0, 4.0, 8.0)  # Gaussian σ in pixels at which a prediction is split


def band_swap(pred: np.ndarray, truth: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` with its coarse part (a Gaussian low-pass of ``sigma`` px) replaced by the truth's,
    and ``pred`` with its fine part (the rest) replaced by the truth's.

    A diagnostic, never a method (it uses the truth): how much SSIM each swap wins back says
    at which scale a prediction's error lives, gray levels and shading or edges and texture.
    """
    from scipy.ndimage import gaussian_filter

    pred = np.asarray(pred, dtype=np.float32)
    truth = np.asarray(truth, dtype=np.float32)
    if pred.shape != truth.shape:
        raise DataError("image pair", f"shapes differ: {pred.shape} vs {truth.shape}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    low_p, low_t = gaussian_filter(pred, sigma), gaussian_filter(truth, sigma)
    return pred - low_p + low_t, low_p + truth - low_t


def band_scores(pairs: Sequence[tuple[np.ndarray, np.ndarray]], sigmas: Sequence[float] = BAND_SIGMAS
                ) -> dict[str, dict[str, float]]:
    """:func:`score_pairs` of the predictions as they are (``as is``) and after each
    :func:`band_swap`: ``truth coarse σ<s>`` (the truth's content above ``s`` px put in) and
    ``truth fine σ<s>`` (the truth's detail below ``s`` px put in)."""
    pairs = [(np.asarray(p, dtype=np.float32), np.asarray(t, dtype=np.float32)) for p, t in pairs]
    out = {"as is": score_pairs(pairs)}
    for sigma in sigmas:
        swapped = [(band_swap(p, t, sigma), t) for p, t in pairs]
        out[f"truth coarse σ{sigma:g}"] = score_pairs((coarse, t) for (coarse, _), t in swapped)
        out[f"truth fine σ{sigma:g}"] = score_pairs((fine, t) for (_, fine), t in swapped)
    return out


def band_reports(phantom: str | Path, translated: str | Path, source_tree: str = "montgomery",
                 target_site: str = "shenzhen", splits: Sequence[str] = ("val", "test"), seed: int = 0,
                 sigmas: Sequence[float] = BAND_SIGMAS) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`band_scores` of a translated copy of the source site folder, per split."""
    read = translated_tree_method(translated)
    pairs = phantom_pairs(phantom, source_tree, target_site)
    return {split: band_scores([(read(p, None), load_image(p.truth)) for p in chosen], sigmas)
            for split, chosen in split_subsets(pairs, splits, seed).items()}


BANDS_TITLE = ("Where the error lives (a diagnostic with the truth): SSIM after the truth's coarse part "
               "(above σ px) or fine part (below σ px) replaces the translation's")


def format_bands(scores: dict[str, dict[str, float]]) -> str:
    """:data:`BANDS_TITLE`, then one row per swap of :func:`band_scores`: SSIM, its factors and,
    where both occur, portrait and landscape frames."""
    frames = ["ssim_portrait", "ssim_landscape"] if _both_orientations(scores) else []
    w = _name_width(scores)
    lines = [BANDS_TITLE, f"{'swap':<{w}} {'SSIM':>7} {'l':>7} {'cs':>7}"
             + "".join(f" {f[len('ssim_'):]:>9}" for f in frames)]
    for name, s in scores.items():
        lines.append(f"{name:<{w}} {s['ssim']:>7.4f} {s['luminance']:>7.4f} {s['cs']:>7.4f}"
                     + "".join(f" {s[f]:>9.4f}" for f in frames))
    return "\n".join(lines)


def _both_orientations(scores: dict[str, dict[str, float]]) -> bool:
    """Whether some method's pairs hold portrait and landscape frames both (then they are shown apart)."""
    return any(0 < s.get("n_landscape", 0) < s["n"] for s in scores.values())


def _name_width(scores: dict[str, dict[str, float]]) -> int:
    return max([14, *(len(name) for name in scores)])
