"""Judging a generated set against the real one: ``cxr evaluate gan``.

The real tree is split by patient exactly as every trainer splits it
(:func:`cxr.data.splits.split_records`, fractions 0.7/0.1/0.2, seed 0): its *train* part is
what a generator trained on that tree saw, its *test* part (or all of ``--heldout``) is real
data it never saw. All images are read through the loaders and preprocessed to one square size
(pad, keep aspect), so trees of mixed sizes compare. Per class (the trees' labels: each present
finding, ``normal`` for an image with none) and overall:

* quality: FD(train, generated), FD(train, held-out) and their ratio, the relative FD (the
  headline), KID, precision/recall/density/coverage (:mod:`cxr.metrics.generative`), all in one
  extractor's feature space (:mod:`eval.gan_features`);
* diversity within class: LPIPS between random pairs of generated images when the `lpips`
  package's AlexNet backbone is in the local torch cache, else ``1 − MS-SSIM`` (torchmetrics),
  for the generated and the real training images alike;
* memorization: each generated image's nearest training image in feature space and by SSIM,
  and the share of generated images nearer than the 1st percentile of held-out images' own
  nearest-training distances (above the 99th percentile of their SSIM); the closest pairs drawn;
* classification accuracy score (CAS, Ravuri & Vinyals 2019): the small classifier trained on
  generated images only and tested on the held-out real images, beside the same classifier
  trained on the real training images (:func:`classifiers.trainer.train`).

Everything is written to a temporary folder beside ``--out`` and renamed when complete.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from classifiers.config import ClassifierConfig
from classifiers.data import align_labels, image_set, tag_origin
from classifiers.trainer import MODULE, build_model, train
from cxr.configs import resolve_config
from cxr.data import preprocess
from cxr.data.image import load_image
from cxr.data.io import atomic_write_text, staged_tree
from cxr.data.layouts import load_tree
from cxr.data.record import Sample
from cxr.data.rewrite import check_out
from cxr.data.splits import split_records
from cxr.data.tasks import TASKS, Task
from cxr.engine import checkpoint as ckpt_io
from cxr.engine.config import load_config
from cxr.engine.distributed import resolve_device
from cxr.errors import DataError
from cxr.metrics import generative as gm
from cxr.metrics.results import read_results
from cxr.metrics.ssim import K1, K2, SSIM_SIGMA, SSIM_WINDOW
from cxr.phantom.sheet import fit_tile, save_png
from eval.gan_features import (
    Extractor,
    inception_extractor,
    penultimate_extractor,
    resolve_kind,
    weights_hash,
    xrv_extractor,
)

NORMAL = "normal"  # the class of an image with no present finding
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # the trainers' patient-level split (cxr.data.splits)
MAX_DIVERSITY_PAIRS = 200
MEMORIZATION_PERCENTILE = 1.0
SHEET_TILE = 96
CSV_COLUMNS = ("scope", "class", "extractor", "n_train", "n_fake", "n_heldout", "fd", "fd_heldout", "relative_fd",
               "kid", "kid_std", "kid_heldout", "precision", "recall", "density", "coverage", "diversity_fake",
               "diversity_real", "diversity_measure", "memorized_share_features", "memorized_share_ssim")


@dataclass(frozen=True)
class GanEvalOptions:
    real: Path
    fake: Path
    out: Path
    heldout: Path | None = None
    extractor: str = "auto"
    size: int = 64
    seed: int = 0
    device: str = "auto"
    cas: bool = True
    classifier_config: str = "classifier_tiny"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    overwrite: bool = False
    # The SSIM nearest-neighbour search costs about 0.2 s per image on 2 CPU cores at 64²:
    # at most this many generated and held-out images (a seeded random subset) are searched by
    # SSIM; None searches them all. The feature search always covers every image.
    ssim_images: int | None = None


@dataclass
class ImageGroup:
    """Records and their preprocessed (N, S, S) images."""

    name: str
    records: list[Sample]
    images: np.ndarray
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def __len__(self) -> int:
        return len(self.records)


# ----------------------------------------------------------------------------------------------
# Inputs


def class_names(record: Sample) -> list[str]:
    """The classes a record belongs to: each present finding, or ``normal`` when none is."""
    return list(record.findings) or [NORMAL]


def class_index(records: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Class → indices of the records in it (a multi-label record is in each of its classes)."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        for c in class_names(r):
            out.setdefault(c, []).append(i)
    return {c: np.asarray(v, dtype=np.int64) for c, v in sorted(out.items())}


def task_for(records: Sequence[Sample], where: str | Path) -> Task:
    """The classifier task whose labels the tree carries (tb, nine, nih14)."""
    names = set(records[0].label_names)
    for task in TASKS.values():
        if names == set(task.label_names):
            return task
    for task in TASKS.values():
        if names & set(task.label_names):
            return task
    raise DataError(where, f"its labels ({', '.join(sorted(names)) or 'none'}) match no classifier task")


def read_images(records: Sequence[Sample], size: int) -> np.ndarray:
    """(N, size, size) float32 images in [0, 1] (pad to square, keep aspect)."""
    pre = preprocess.Preprocess(size=size, fit="pad")
    out = np.zeros((len(records), size, size), dtype=np.float32)
    for i, r in enumerate(records):
        out[i] = preprocess.apply(load_image(r.image), pre)
    return out


def _load(path: Path, role: str) -> list[Sample]:
    ds = load_tree(path)
    if not ds.records:
        raise DataError(path, f"--{role}: the tree holds no images")
    return list(ds.records)


def read_inputs(opts: GanEvalOptions) -> tuple[list[Sample], list[Sample], list[Sample], list[Sample]]:
    """(real train, real val, held-out, generated) records, checked for labels and classes."""
    real = _load(opts.real, "real")
    fake = _load(opts.fake, "fake")
    parts = split_records(real, SPLIT_FRACTIONS, seed=opts.seed)
    train_part, val_part = parts["train"], parts["val"]
    heldout = _load(opts.heldout, "heldout") if opts.heldout is not None else parts["test"]
    if len(train_part) < 2 or not heldout:
        raise DataError(opts.real, f"too few patients to split ({len(real)} images): the training part has "
                                   f"{len(train_part)}, the held-out part {len(heldout)}; pass --heldout TREE")
    if set(fake[0].label_names) != set(real[0].label_names):
        raise DataError(opts.fake, f"its labels ({', '.join(fake[0].label_names)}) differ from the real tree's "
                                   f"({', '.join(real[0].label_names)})")
    real_classes, fake_classes = class_index(train_part), class_index(fake)
    for c in real_classes:
        if c not in fake_classes:
            raise DataError(opts.fake, f"no generated image of class {c!r} (the real training split has "
                                       f"{len(real_classes[c])})")
    for c in fake_classes:
        if c not in real_classes:
            raise DataError(opts.real, f"its training split has no image of class {c!r}, which the generated "
                                       f"tree has {len(fake_classes[c])} of")
    return train_part, val_part, list(heldout), fake


# ----------------------------------------------------------------------------------------------
# Classifiers (the trained extractor and CAS)


def classifier_config(opts: GanEvalOptions, task: Task, device: str) -> ClassifierConfig:
    """The small CPU classifier config with this evaluation's size, task, seed and device."""
    cfg = load_config(ClassifierConfig, resolve_config(opts.classifier_config),
                      [f"data.size={opts.size}", f"task={task.name}", f"seed={opts.seed}", f"device={device}"])
    return cfg.replace(model=dataclasses.replace(cfg.model, pretrained=None))


def _image_set(name: str, group: ImageGroup, task: Task, origin: str):
    records = align_labels(tag_origin(group.records, origin, group.name), task, f"{name} set ({group.name})")
    return image_set(name, records, torch.from_numpy(group.images[:, None]).to(torch.float16), task)


def train_classifier(cfg: ClassifierConfig, task: Task, train_group: ImageGroup, val_group: ImageGroup,
                     test_group: ImageGroup, run_dir: Path, origin: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the small classifier on prepared sets; (best model, test metrics with intervals)."""
    sets = {"train": _image_set("train", train_group, task, origin),
            "val": _image_set("val", val_group, task, origin),
            "test": _image_set("test", test_group, task, "real")}
    result = train(cfg, run_dir, sets=sets)
    model = build_model(cfg, task)
    ckpt_io.load_module(result.best, MODULE, model)
    metrics, intervals, _ = read_results(run_dir / "test.json") if (run_dir / "test.json").is_file() else ({}, {}, {})
    summary: dict[str, Any] = {"n_train": len(train_group), "n_val": len(val_group), "n_test": len(test_group),
                               "metrics": metrics, "intervals": {k: list(v) for k, v in intervals.items()},
                               "notes": list(dict.fromkeys(result.notes))}
    return model.eval(), summary


def split_generated(fake: ImageGroup, seed: int) -> tuple[ImageGroup, ImageGroup]:
    """Train/validation parts of the generated set (patient-level, 0.8/0.2) for CAS."""
    parts = split_records(fake.records, (0.8, 0.2, 0.0), seed=seed, use_official=False)
    index = {r.image: i for i, r in enumerate(fake.records)}

    def take(recs: list[Sample]) -> ImageGroup:
        idx = np.asarray([index[r.image] for r in recs], dtype=np.int64)
        return ImageGroup(fake.name, recs, fake.images[idx])

    return take(parts["train"]), take(parts["val"])


# ----------------------------------------------------------------------------------------------
# Diversity and memorization


def lpips_available() -> bool:
    """Whether the lpips package and torchvision's AlexNet weights are local (nothing downloads)."""
    try:
        import lpips  # noqa: F401
        from torchvision.models import AlexNet_Weights
    except ImportError:
        return False
    name = os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def ms_ssim_betas(size: int) -> tuple[float, ...]:
    """MS-SSIM's scale weights (Wang et al. 2003), as many scales as an 11-pixel window fits."""
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    n = max(1, min(len(betas), int(math.floor(math.log2(size / 11))) + 1))
    while n > 1 and size <= 10 * 2 ** (n - 1):
        n -= 1
    kept = betas[:n]
    return tuple(b / sum(kept) for b in kept)


class PairDissimilarity:
    """LPIPS (AlexNet) when local, else 1 − MS-SSIM, between image pairs."""

    def __init__(self, size: int, device: torch.device):
        self.device = device
        self.size = size
        if lpips_available():
            import lpips

            self.measure = "lpips-alex"
            self.net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
            self.note = None
        else:
            self.measure = "1-ms-ssim"
            self.net = None
            self.betas = ms_ssim_betas(size)
            self.note = ("LPIPS not computed: torchvision's AlexNet weights are not in the local torch cache; "
                         f"diversity is 1 − MS-SSIM ({len(self.betas)} scales at {size}²)")

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(a, dtype=torch.float32)[:, None].to(self.device)
        y = torch.as_tensor(b, dtype=torch.float32)[:, None].to(self.device)
        if self.net is not None:
            if x.shape[-1] < 64:  # AlexNet's strides need a larger picture
                x, y = (torch.nn.functional.interpolate(t, size=64, mode="bilinear", align_corners=False)
                        for t in (x, y))
            d = self.net(x.repeat(1, 3, 1, 1) * 2 - 1, y.repeat(1, 3, 1, 1) * 2 - 1)
            return d.flatten().cpu().numpy().astype(np.float64)
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

        s = ms_ssim(x, y, data_range=1.0, kernel_size=11, betas=self.betas, reduction="none", normalize="relu")
        return 1.0 - s.flatten().cpu().numpy().astype(np.float64)


def diversity(images: np.ndarray, measure: PairDissimilarity, seed: int) -> float:
    """Mean dissimilarity over random distinct pairs; NaN with fewer than 2 images."""
    pairs = gm.pair_indices(len(images), MAX_DIVERSITY_PAIRS, seed)
    if not len(pairs):
        return float("nan")
    values = np.concatenate([measure(images[pairs[i:i + 64, 0]], images[pairs[i:i + 64, 1]])
                             for i in range(0, len(pairs), 64)])
    return float(values.mean())


def _ssim_blur(t: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """SSIM's separable Gaussian window over (N, 1, H, W), reflected borders (as kornia's)."""
    r = kernel.numel() // 2
    t = torch.nn.functional.pad(t, (r, r, r, r), mode="reflect")
    t = torch.nn.functional.conv2d(t, kernel.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(t, kernel.view(1, 1, -1, 1))


@torch.no_grad()
def nearest_by_ssim(query: np.ndarray, reference: np.ndarray, budget: int = 1 << 24,
                    device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, the highest mean SSIM (:mod:`cxr.metrics.ssim`'s window and
    constants, [0, 1] images) to a reference image, and that image's index.

    The reference's local means and variances are computed once; per query only the local
    covariance with every reference image is new, for ``budget`` pixels at a time (about 0.8 s
    per query against 463 images of 64² on a loaded 2-core CPU; pass a GPU ``device``).
    """
    x = torch.as_tensor(query, dtype=torch.float32)[:, None]
    y = torch.as_tensor(reference, dtype=torch.float32, device=device)[:, None]
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=y.device) - SSIM_WINDOW // 2
    kernel = torch.exp(-(offsets ** 2) / (2 * SSIM_SIGMA ** 2))
    kernel = kernel / kernel.sum()
    c1, c2 = K1 ** 2, K2 ** 2
    my = _ssim_blur(y, kernel)[:, 0]
    vy = _ssim_blur(y * y, kernel)[:, 0] - my * my
    best = np.zeros(len(query))
    idx = np.zeros(len(query), dtype=np.int64)
    step = max(1, budget // max(1, y[0].numel() * len(y)))
    for start in range(0, len(x), step):
        q = x[start:start + step].to(y.device)
        mx = _ssim_blur(q, kernel)[:, 0]
        vx = _ssim_blur(q * q, kernel)[:, 0] - mx * mx
        mxy = mx[:, None] * my[None]
        cxy = _ssim_blur((q[:, None] * y[None]).flatten(0, 1), kernel).view(mxy.shape) - mxy
        lum = (2.0 * mxy + c1) / (mx[:, None] ** 2 + my[None] ** 2 + c1)
        cs = (2.0 * cxy + c2) / (vx[:, None] + vy[None] + c2)
        s = (lum * cs).mean(dim=(2, 3))
        val, arg = s.max(dim=1)
        best[start:start + len(q)] = val.cpu().numpy()
        idx[start:start + len(q)] = arg.cpu().numpy()
    return best, idx


# ----------------------------------------------------------------------------------------------
# The evaluation


def _safe(fn: Callable[[], Any], notes: list[str], what: str) -> Any:
    """``fn()``, or None with a note when the set is too small for it."""
    try:
        return fn()
    except ValueError as e:
        notes.append(f"{what}: not computed ({e})")
        return None


def quality(train: np.ndarray, fake: np.ndarray, heldout: np.ndarray, opts: GanEvalOptions, where: str,
            notes: list[str]) -> dict[str, Any]:
    """FD, relative FD, KID and PRDC of one scope's feature arrays."""
    if min(len(train), len(fake), len(heldout) or len(train)) <= train.shape[1]:
        notes.append(f"{where}: no more images than the {train.shape[1]} feature dimensions, so the FD covariances "
                     "are singular and FD is approximate; compare relative FD only")
    fd = _safe(lambda: gm.frechet_distance(train, fake), notes, f"{where} FD")
    fd_held = _safe(lambda: gm.frechet_distance(train, heldout), notes, f"{where} held-out FD")
    kid = _safe(lambda: gm.kernel_distance(train, fake, opts.kid_subsets, opts.kid_subset_size, opts.seed), notes,
                f"{where} KID")
    kid_held = _safe(lambda: gm.kernel_distance(train, heldout, opts.kid_subsets, opts.kid_subset_size, opts.seed),
                     notes, f"{where} held-out KID")
    prdc = _safe(lambda: gm.prdc(train, fake, gm.PRDC_K), notes, f"{where} precision/recall") or {}
    return {"n_train": len(train), "n_fake": len(fake), "n_heldout": len(heldout), "fd": fd, "fd_heldout": fd_held,
            "relative_fd": gm.relative_fd(fd, fd_held) if fd is not None and fd_held is not None else None,
            "kid": kid[0] if kid else None, "kid_std": kid[1] if kid else None,
            "kid_heldout": kid_held[0] if kid_held else None,
            **{k: prdc.get(k) for k in ("precision", "recall", "density", "coverage")}}


def memorization(train: ImageGroup, fake: ImageGroup, heldout: ImageGroup,
                 device: torch.device | None = None, ssim_images: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Nearest training image of every generated (and held-out) image, in features and by SSIM
    (by SSIM for at most ``ssim_images`` of each, a seeded random subset; the others get NaN)."""
    d_fake, i_fake = gm.nearest_neighbours(fake.features, train.features)
    d_held, _ = gm.nearest_neighbours(heldout.features, train.features)
    share, threshold = gm.memorization_share(d_fake, d_held, MEMORIZATION_PERCENTILE)
    rng = np.random.default_rng(seed)

    def subset(n: int) -> np.ndarray:
        return np.arange(n) if ssim_images is None or n <= ssim_images else np.sort(rng.choice(n, ssim_images, False))

    fi, hi = subset(len(fake)), subset(len(heldout))
    s_sub, j_sub = nearest_by_ssim(fake.images[fi], train.images, device=device)
    s_held, _ = nearest_by_ssim(heldout.images[hi], train.images, device=device)
    s_fake, j_fake = np.full(len(fake), np.nan), np.full(len(fake), -1, dtype=np.int64)
    s_fake[fi], j_fake[fi] = s_sub, j_sub
    s_share, s_threshold = gm.memorization_share(s_sub, s_held, MEMORIZATION_PERCENTILE, higher_is_closer=True)
    rows = [{"fake": fake.records[k].image, "nearest_train_features": train.records[i_fake[k]].image,
             "feature_distance": float(d_fake[k]),
             "nearest_train_ssim": train.records[j_fake[k]].image if j_fake[k] >= 0 else None,
             "ssim": float(s_fake[k])} for k in range(len(fake))]
    return {"percentile": MEMORIZATION_PERCENTILE,
            "features": {"share": share, "threshold": threshold, "min_distance": float(d_fake.min()),
                         "heldout_min_distance": float(d_held.min())},
            "ssim": {"share": s_share, "threshold": s_threshold, "max_ssim": float(s_sub.max()),
                     "heldout_max_ssim": float(s_held.max()), "searched": len(fi), "heldout_searched": len(hi)},
            "rows": rows, "order": np.argsort(d_fake), "i_features": i_fake, "i_ssim": j_fake}


def examples_sheet(train: ImageGroup, fake: ImageGroup, per_row: int = 6) -> Any:
    """One row per class (its name at the left): ``per_row`` real training images, a gap, then
    ``per_row`` generated ones."""
    from PIL import Image, ImageDraw

    real_idx, fake_idx = class_index(train.records), class_index(fake.records)
    classes = list(real_idx)
    t, gap = SHEET_TILE, SHEET_TILE // 4
    sheet = Image.new("L", (2 * per_row * t + gap, max(1, len(classes)) * t), 0)
    for row, c in enumerate(classes):
        for col, k in enumerate(real_idx[c][:per_row]):
            sheet.paste(fit_tile(train.images[k], t), (col * t, row * t))
        for col, k in enumerate(fake_idx[c][:per_row]):
            sheet.paste(fit_tile(fake.images[k], t), (per_row * t + gap + col * t, row * t))
        ImageDraw.Draw(sheet).text((2, row * t + 2), c, fill=255)
    return sheet


def closest_pairs_sheet(train: ImageGroup, fake: ImageGroup, mem: dict[str, Any], rows: int = 8) -> Any:
    """The generated images nearest the training set: generated | nearest in features | by SSIM."""
    from PIL import Image

    t = SHEET_TILE
    picked = list(mem["order"][:rows])
    sheet = Image.new("L", (3 * t, max(1, len(picked)) * t), 0)
    for row, k in enumerate(picked):
        by_ssim = train.images[mem["i_ssim"][k]] if mem["i_ssim"][k] >= 0 else np.zeros_like(fake.images[k])
        for col, img in enumerate((fake.images[k], train.images[mem["i_features"][k]], by_ssim)):
            sheet.paste(fit_tile(img, t), (col * t, row * t))
    return sheet


def _csv_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def build_extractor(kind: str, opts: GanEvalOptions, task: Task, device: torch.device, groups: dict[str, ImageGroup],
                    run_dir: Path) -> tuple[Extractor, dict[str, Any] | None]:
    """The extractor ``kind``; for ``trained``, also the real-trained classifier's CAS summary."""
    if kind == "inception":
        return inception_extractor(device), None
    if kind == "xrv":
        return xrv_extractor(device), None
    cfg = classifier_config(opts, task, device.type)
    model, summary = train_classifier(cfg, task, groups["train"], groups["val"], groups["heldout"], run_dir, "real")
    name = f"trained-{cfg.model.name}-{weights_hash(model, [r.image for r in groups['train'].records])}"
    ext = penultimate_extractor(model, name, device)
    ext.notes.append(f"trained on the real tree's training split ({len(groups['train'])} images, "
                     f"{cfg.train.epochs} epochs, config {opts.classifier_config}); its run folder: runs/real")
    return ext, summary


def evaluate_gan(opts: GanEvalOptions, echo: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the whole evaluation and write it into ``opts.out`` (see the module docstring)."""
    for src in (opts.real, opts.fake, *([opts.heldout] if opts.heldout else [])):
        check_out(src, opts.out, opts.overwrite)
    if opts.size < 16:
        raise DataError("--size", f"must be at least 16 pixels, got {opts.size}")
    if opts.kid_subsets < 1 or opts.kid_subset_size < 2:
        raise DataError("--kid-subsets/--kid-subset-size", f"need at least 1 subset of at least 2 images, got "
                                                           f"{opts.kid_subsets} of {opts.kid_subset_size}")
    if opts.ssim_images is not None and opts.ssim_images < 2:
        raise DataError("--ssim-images", f"must be at least 2 (or left out to search every image), got {opts.ssim_images}")
    kind = resolve_kind(opts.extractor)
    train_recs, val_recs, held_recs, fake_recs = read_inputs(opts)
    task = task_for(train_recs, opts.real)
    device = resolve_device(opts.device)
    echo(f"reading images at {opts.size}²: {len(train_recs)} train, {len(held_recs)} held-out, "
         f"{len(fake_recs)} generated")
    groups = {"train": ImageGroup(str(opts.real), train_recs, read_images(train_recs, opts.size)),
              "val": ImageGroup(str(opts.real), val_recs, read_images(val_recs, opts.size)),
              "heldout": ImageGroup(str(opts.heldout or opts.real), held_recs, read_images(held_recs, opts.size)),
              "fake": ImageGroup(str(opts.fake), fake_recs, read_images(fake_recs, opts.size))}
    if opts.cas or kind == "trained":
        if not groups["val"].records:
            raise DataError(opts.real, "its validation part is empty: too few patients to train the classifier")

    with staged_tree(opts.out) as tmp:
        report = _evaluate(opts, kind, task, device, groups, tmp, echo)
    return report




def _evaluate(opts: GanEvalOptions, kind: str, task: Task, device: torch.device, groups: dict[str, ImageGroup],
              tmp: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    notes: list[str] = []
    echo(f"feature extractor: {kind}")
    extractor, cas_real = build_extractor(kind, opts, task, device, groups, tmp / "runs" / "real")
    notes += extractor.notes
    for g in groups.values():
        g.features = extractor.embed(g.images)
    train, fake, held = groups["train"], groups["fake"], groups["heldout"]

    echo("quality, diversity and memorization")
    measure = PairDissimilarity(opts.size, torch.device("cpu"))
    if measure.note:
        notes.append(measure.note)
    overall = quality(train.features, fake.features, held.features, opts, "overall", notes)
    overall.update(diversity_fake=diversity(fake.images, measure, opts.seed),
                   diversity_real=diversity(train.images, measure, opts.seed))
    classes: dict[str, dict[str, Any]] = {}
    tr_idx, fk_idx, hd_idx = class_index(train.records), class_index(fake.records), class_index(held.records)
    for c in tr_idx:
        h = hd_idx.get(c, np.zeros(0, dtype=np.int64))
        if not len(h):
            notes.append(f"class {c!r}: no held-out real image, so no held-out FD or relative FD")
        row = quality(train.features[tr_idx[c]], fake.features[fk_idx[c]], held.features[h], opts, f"class {c!r}",
                      notes)
        row.update(diversity_fake=diversity(fake.images[fk_idx[c]], measure, opts.seed),
                   diversity_real=diversity(train.images[tr_idx[c]], measure, opts.seed))
        classes[c] = row
    mem = memorization(train, fake, held, device, opts.ssim_images, opts.seed)
    for c, row in classes.items():
        row["memorized_share_features"] = float(np.mean(
            np.asarray([mem["rows"][k]["feature_distance"] for k in fk_idx[c]]) < mem["features"]["threshold"]))
        searched = np.asarray([mem["rows"][k]["ssim"] for k in fk_idx[c]])
        searched = searched[np.isfinite(searched)]
        row["memorized_share_ssim"] = float(np.mean(searched > mem["ssim"]["threshold"])) if len(searched) else None
    overall["memorized_share_features"] = mem["features"]["share"]
    overall["memorized_share_ssim"] = mem["ssim"]["share"]

    cas: dict[str, Any] | None = None
    if opts.cas:
        echo("classification accuracy score: training on generated images")
        cfg = classifier_config(opts, task, device.type)
        fk_train, fk_val = split_generated(fake, opts.seed)
        _, synthetic = train_classifier(cfg, task, fk_train, fk_val, held, tmp / "runs" / "synthetic", "synthetic")
        if cas_real is None:
            echo("classification accuracy score: training on real images")
            _, cas_real = train_classifier(cfg, task, train, groups["val"], held, tmp / "runs" / "real", "real")
        cas = {"task": task.name, "config": opts.classifier_config, "test": "held-out real images",
               "synthetic": synthetic, "real": cas_real}

    report = {
        "extractor": {"name": extractor.name, "kind": kind, "dims": extractor.dims},
        "inputs": {"real": str(opts.real), "fake": str(opts.fake), "heldout": str(opts.heldout) if opts.heldout
                   else f"{opts.real} (patient-level test part, seed {opts.seed})", "size": opts.size,
                   "split_fractions": list(SPLIT_FRACTIONS), "seed": opts.seed},
        "diversity_measure": measure.measure,
        "overall": overall,
        "classes": classes,
        "memorization": {k: v for k, v in mem.items() if k in ("percentile", "features", "ssim")},
        "cas": cas,
        "notes": list(dict.fromkeys(notes)),
    }
    report = _jsonable(report)
    atomic_write_text(tmp / "metrics.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(tmp / "metrics.csv", _metrics_csv(report))
    atomic_write_text(tmp / "memorization.csv", _rows_csv(mem["rows"]))
    save_png(examples_sheet(train, fake), tmp / "examples.png")
    save_png(closest_pairs_sheet(train, fake, mem), tmp / "closest_pairs.png")
    return report


def _metrics_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    scopes = [("overall", "", report["overall"])] + [("class", c, r) for c, r in report["classes"].items()]
    for scope, c, row in scopes:
        full = {**row, "scope": scope, "class": c, "extractor": report["extractor"]["name"],
                "diversity_measure": report["diversity_measure"]}
        w.writerow([_csv_cell(full.get(k)) for k in CSV_COLUMNS])
    return buf.getvalue()


def _rows_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = ("fake", "nearest_train_features", "feature_distance", "nearest_train_ssim", "ssim")
    w.writerow(keys)
    for r in rows:
        w.writerow([_csv_cell(r[k]) for k in keys])
    return buf.getvalue()


def ssim_searched(memorization: dict[str, Any], n_fake: int) -> str:
    """`` (the SSIM search on N of M generated images)`` when ``ssim_images`` limited it, else ``""``."""
    n = memorization["ssim"].get("searched", n_fake)
    return "" if n >= n_fake else f" (searched on {n} of the {n_fake} generated images)"


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal: the headline per scope, memorization, CAS."""
    lines = [f"extractor: {report['extractor']['name']}"]

    def num(v: Any, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    for name, row in [("overall", report["overall"]), *report["classes"].items()]:
        lines.append(f"{name}: relative FD {num(row['relative_fd'])} (FD {num(row['fd'], '.4g')} vs held-out "
                     f"{num(row['fd_heldout'], '.4g')}), KID {num(row['kid'], '.4g')}, precision "
                     f"{num(row['precision'])}, recall {num(row['recall'])}, density {num(row['density'])}, coverage "
                     f"{num(row['coverage'])}, diversity {num(row['diversity_fake'])} (real {num(row['diversity_real'])})")
    m = report["memorization"]
    lines.append(f"memorization: {m['features']['share']:.1%} of generated images nearer a training image than the "
                 f"{m['percentile']:g}st percentile of held-out images (features), {m['ssim']['share']:.1%} by SSIM"
                 + ssim_searched(m, report["overall"]["n_fake"]))
    if report["cas"]:
        for origin in ("synthetic", "real"):
            met, ci = report["cas"][origin]["metrics"], report["cas"][origin]["intervals"]
            key = "auroc" if "auroc" in met else next(iter(met), None)
            if key is not None:
                lo, hi = ci.get(key, [None, None])
                lines.append(f"CAS trained on {origin}: {key} {num(met[key])} [{num(lo)}, {num(hi)}]")
    return "\n".join(lines)
