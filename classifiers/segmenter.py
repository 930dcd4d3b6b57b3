"""Lung segmentation: a U-Net (:mod:`classifiers.unet`) trained on left and right lung masks.

Data: every image with both lung masks (``Sample.masks`` ``lung_image_left``/``lung_image_right``:
a Montgomery ``ManualMask`` folder, the phantom's Montgomery site, any tree whose records carry
them) of the ``data.train`` trees, split by patient like every trainer
(:func:`cxr.data.splits.split_records`): the *train* part trains, the *val* part validates
(unless ``data.val`` names trees), the *test* part is held out and scored at the end as
``heldout`` (``data.test`` trees as ``test``). Images and masks are resized keeping the aspect
and padded to ``data.size`` (``fit: pad``), so a prediction maps back to each image's own size
exactly (the padding cropped off, then resized). A mask of another size than its image is one
line naming the mask file.

Loss per batch, with ``p = σ(z)`` the predicted probability and ``y`` the true mask, for each lung
``c`` summed over the batch's pixels ``i``:

    L = BCE(z, y) + 1 − (1/C) Σ_c (2 Σ_i p_ci y_ci + ε) / (Σ_i p_ci + Σ_i y_ci + ε),   ε = 1

(mean binary cross-entropy plus one minus the mean soft Dice). AdamW with a cosine learning
rate, optional GPU-side augmentation applied to image and masks together (a small random
rotation, scale and shift; brightness and contrast on the image only). Validation Dice
(thresholded at 0.5, at the network's size, mean of both lungs) after every epoch chooses
``checkpoints/best`` and early stopping (``train.patience``). At the end the best weights score
the validation and held-out sets at each image's own size (:mod:`cxr.metrics.segmentation`:
Dice, IoU and HD95 per lung) into ``scores_<set>.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classifiers.config import Trees, _as_tree_tuple
from classifiers.epochs import EpochFamily, EpochResult, train_epochs
from classifiers.unet import UNet, UNetConfig, build_unet
from cxr.data.image import load_image
from cxr.data.io import atomic_write, atomic_write_text, split_ref
from cxr.data.layouts import load_tree
from cxr.data.lungcrop import register_mask_predictor
from cxr.data.masks import (
    IMAGE_LEFT,
    IMAGE_RIGHT,
    LUNG_IMAGE_LEFT,
    LungLabels,
    has_lung_mask,
    load_lung_mask,
    read_label_mask,
)
from cxr.data.preprocess import fit_geometry, resize_square
from cxr.data.record import Sample
from cxr.data.splits import split_records
from cxr.engine import checkpoint as ckpt_io
from cxr.engine.config import AmpMode, DataConfig
from cxr.engine.distributed import epoch_permutation, resolve_device, unwrap_model, wrap_ddp
from cxr.engine.loop import Evaluation, LoopResult, Run, best_or_latest, run_checkpoint
from cxr.engine.schedules import warmup_cosine_lr
from cxr.engine.speed import autocast_context
from cxr.errors import ConfigError, DataError
from cxr.metrics.segmentation import lung_scores, mean_scores

MODEL_FAMILY = "segmenter"
MODULE = "unet"  # the checkpoint's module name
MASK_DIRS = ("leftMask", "rightMask")  # the Montgomery ManualMask folders, image-left lung first
TRUTH_LABELS = "truth_lung_labels"  # a record's phantom-truth lung label file (Sample.extra)


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class SegmenterDataConfig(DataConfig):
    """Which trees train, validate and test (the shared keys: :class:`cxr.engine.config.DataConfig`)."""

    SIZE_RANGE: ClassVar[tuple[int, int]] = (16, 1024)

    train: Trees = ("data/phantom/MontgomerySet",)
    val: Trees = ()  # empty: the training trees' patient-level validation part
    test: Trees = ()  # extra test trees (the training trees' held-out part is always scored)
    layout: str | None = None  # force one layout for every tree; None: auto-detect each
    size: int = 256

    def __post_init__(self) -> None:
        for key in ("train", "val", "test"):
            object.__setattr__(self, key, _as_tree_tuple(getattr(self, key)))
        if not self.train:
            raise ValueError("data.train must name at least one tree with lung masks")
        super().__post_init__()
        if self.fit != "pad":
            raise ValueError("data.fit must be pad for the segmenter (a prediction maps back to the whole image)")
        if self.lung_crop is not None:
            raise ValueError("data.lung_crop does not apply to the segmenter (it finds the lungs itself)")


@dataclass(frozen=True)
class SegmenterAugmentConfig:
    """Joint augmentation of image and masks on the training device."""

    enabled: bool = True
    degrees: float = 5.0
    scale: tuple[float, float] = (0.95, 1.05)
    translate: float = 0.05  # fraction of the side
    brightness: float = 0.1
    contrast: float = 0.1
    p: float = 0.5


@dataclass(frozen=True)
class SegmenterOptimConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.lr must be > 0, optim.weight_decay and optim.warmup_epochs >= 0")


@dataclass(frozen=True)
class SegmenterTrainConfig:
    batch_size: int = 8
    epochs: int = 40
    patience: int = 0  # epochs without a better validation Dice before stopping; 0: never
    log_every: int = 20
    keep_last: int = 2
    amp: AmpMode = "auto"
    deterministic: bool = False
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or self.patience < 0 or self.eval_batch_size < 1:
            raise ValueError("train.batch_size, train.epochs and train.eval_batch_size must be >= 1 "
                             "and train.patience >= 0")


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything a segmenter run depends on."""

    seed: int = 0
    device: str = "auto"
    data: SegmenterDataConfig = field(default_factory=SegmenterDataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    optim: SegmenterOptimConfig = field(default_factory=SegmenterOptimConfig)
    augment: SegmenterAugmentConfig = field(default_factory=SegmenterAugmentConfig)
    train: SegmenterTrainConfig = field(default_factory=SegmenterTrainConfig)

    def replace(self, **changes: Any) -> "SegmenterConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Pure pieces: loss, augmentation, masks ↔ network grid


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean BCE plus one minus the mean soft Dice over the lungs (equation: module docstring).

    ``logits`` and ``target`` are (N, C, H, W); the soft Dice of each lung sums over the batch.
    """
    z, y = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(z, y)
    p = torch.sigmoid(z)
    inter = (p * y).sum(dim=(0, 2, 3))
    total = p.sum(dim=(0, 2, 3)) + y.sum(dim=(0, 2, 3))
    return bce + 1.0 - ((2.0 * inter + eps) / (total + eps)).mean()


def joint_augment(x: torch.Tensor, y: torch.Tensor, a: SegmenterAugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One random affine warp per image (probability ``a.p``) applied to image and masks alike
    (masks re-thresholded at 0.5), then brightness and contrast on the image only."""
    n, dev = x.shape[0], x.device
    on = (torch.rand(n, device=dev) < a.p).float()
    angle = (torch.rand(n, device=dev) * 2 - 1) * math.radians(a.degrees) * on
    lo, hi = a.scale
    s = 1.0 + (lo + (hi - lo) * torch.rand(n, device=dev) - 1.0) * on
    t = (torch.rand(n, 2, device=dev) * 2 - 1) * 2 * a.translate * on[:, None]
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    b = (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * a.brightness * on[:, None, None, None]
    c = 1.0 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * a.contrast * on[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp(0.0, 1.0), y


def to_grid(img: np.ndarray, labels: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """An image (and its label image) resized keeping the aspect and padded to ``size × size``:
    float32 (size, size) and float32 (2, size, size) masks (image-left, image-right)."""
    x = resize_square(img, size, "pad")
    if labels is None:
        return x, None
    m = np.stack([resize_square((labels == v).astype(np.float32), size, "pad") > 0.5
                  for v in (IMAGE_LEFT, IMAGE_RIGHT)]).astype(np.float32)
    return x, m


def probs_to_labels(p: np.ndarray) -> np.ndarray:
    """(2, H, W) lung probabilities → uint8 label image: a pixel over 0.5 in either goes to the
    more probable lung (1 image-left, 2 image-right), else 0."""
    left, right = p[0], p[1]
    out = np.zeros(left.shape, dtype=np.uint8)
    out[(left > 0.5) & (left >= right)] = IMAGE_LEFT
    out[(right > 0.5) & (right > left)] = IMAGE_RIGHT
    return out


def from_grid(p: torch.Tensor, h: int, w: int) -> np.ndarray:
    """(2, size, size) probabilities on the padded grid → (2, h, w) at the image's own size."""
    size = p.shape[-1]
    nh, nw, oy, ox = fit_geometry(h, w, size, "pad")
    crop = p[None, :, oy:oy + nh, ox:ox + nw].float()
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class MaskSet:
    """Images and their lung masks on the network grid, with the records they came from."""

    records: list[Sample]
    images: torch.Tensor  # (N, 1, S, S) float in [0, 1]
    masks: torch.Tensor  # (N, 2, S, S) float {0, 1}

    def __len__(self) -> int:
        return len(self.records)


def read_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The sample's image and label image (its masks, else its phantom truth's lung labels, see
    :func:`masked_records`); a mask of another size is one line naming the mask."""
    img = load_image(sample.image)
    truth = sample.extra.get(TRUTH_LABELS)
    labels = read_label_mask(truth) if truth and not has_lung_mask(sample) else load_lung_mask(sample)
    if labels.shape != img.shape:
        where = sample.masks[LUNG_IMAGE_LEFT] if has_lung_mask(sample) else truth
        raise DataError(where, f"mask size {labels.shape[1]}x{labels.shape[0]} differs from "
                                                       f"image size {img.shape[1]}x{img.shape[0]} of {sample.image}")
    return img, labels


def load_set(records: Sequence[Sample], size: int) -> MaskSet:
    xs, ms = [], []
    for r in records:
        x, m = to_grid(*read_pair(r), size)
        xs.append(x[None])
        ms.append(m)
    if not xs:
        return MaskSet([], torch.zeros(0, 1, size, size), torch.zeros(0, 2, size, size))
    return MaskSet(list(records), torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ms)))


def masked_records(tree: str, layout: str | None, skip_bad: bool) -> list[Sample]:
    """The tree's images that carry both lung masks, or whose phantom truth has their lung labels
    (a phantom's Shenzhen-like tree; the file goes to ``extra["truth_lung_labels"]``); none is
    one line naming the tree."""
    if not Path(tree).exists():
        raise DataError(tree, "no such folder or archive")
    ds = load_tree(tree, layout=layout, skip_bad=skip_bad)
    truth = LungLabels()
    records = []
    for r in ds.records:
        if not has_lung_mask(r) and (ref := truth.truth_file(r.image)) is not None:
            r.extra[TRUTH_LABELS] = ref
        if has_lung_mask(r) or TRUTH_LABELS in r.extra:
            records.append(r)
    if not records:
        raise DataError(tree, f"no image with lung masks among {len(ds.records)} (a tree with "
                              "ManualMask/{leftMask,rightMask}, e.g. Montgomery, is needed)")
    return records


def assemble(cfg: SegmenterDataConfig) -> dict[str, list[Sample]]:
    """train / val / heldout (/ test) records: the shared patient-level split of the training trees."""
    out: dict[str, list[Sample]] = {"train": [], "val": [], "heldout": [], "test": []}
    for tree in cfg.train:
        parts = split_records(masked_records(tree, cfg.layout, cfg.skip_bad), cfg.split_fractions, cfg.split_seed)
        out["train"] += parts["train"]
        out["val" if not cfg.val else "train"] += parts["val"]
        out["heldout" if cfg.split == "train" else "train"] += parts["test"]
    for tree in cfg.val:
        out["val"] += masked_records(tree, cfg.layout, cfg.skip_bad)
    for tree in cfg.test:
        out["test"] += masked_records(tree, cfg.layout, cfg.skip_bad)
    return out


# ----------------------------------------------------------------------------------------------
# Prediction


def predict_probs(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                  amp: str = "off") -> torch.Tensor:
    """Lung probabilities (N, 2, S, S), float32 on the CPU, in evaluation mode."""
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            with autocast_context(device, amp):
                z = model(images[s:s + batch_size].to(device).float())
            out.append(torch.sigmoid(z.float()).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2, *images.shape[-2:])


def segment_image(model: nn.Module, img: np.ndarray, size: int, device: torch.device) -> np.ndarray:
    """The label image (0, 1 image-left, 2 image-right) of one decoded image, at its own size."""
    x, _ = to_grid(img, None, size)
    p = predict_probs(model, torch.from_numpy(x)[None, None], 1, device)[0]
    return probs_to_labels(from_grid(p, *img.shape))


def score_records(model: nn.Module, records: Sequence[Sample], size: int, device: torch.device) -> dict[str, Any]:
    """Dice, IoU and HD95 per lung at each image's own size, averaged; ``n`` images."""
    rows = []
    for r in records:
        img, truth = read_pair(r)
        rows.append(lung_scores(segment_image(model, img, size, device), truth))
    return {"n": len(rows), **mean_scores(rows)}


# ----------------------------------------------------------------------------------------------
# The run


def checkpoint_args(model: nn.Module, cfg: SegmenterConfig) -> dict[str, Any]:
    return {"family": MODEL_FAMILY, "model": dict(unwrap_model(model).model_args),
            "outputs": ["lung_image_left", "lung_image_right"],
            "input": {"size": cfg.data.size, "fit": "pad", "channels": 1, "range": [0.0, 1.0]}}


SegmenterResult = EpochResult  # history: validation Dice per epoch; results: scores at each image's own size


class SegmenterFamily(EpochFamily):
    """The U-Net on :func:`cxr.engine.loop.run_training`: an evaluation at every epoch's end."""

    name = MODEL_FAMILY
    module = MODULE

    def setup(self, run: Run) -> dict[str, Any]:
        cfg, t, info = self.cfg, self.cfg.train, run.info
        device = info.device
        self.run = run
        parts = assemble(cfg.data)
        data_device = device if cfg.data.on_device else torch.device("cpu")
        self.sets = {k: load_set(v, cfg.data.size) for k, v in parts.items() if v or k in ("train", "val")}
        for s in self.sets.values():
            s.images, s.masks = s.images.to(data_device), s.masks.to(data_device)
        train_set, val_set = self.sets["train"], self.sets["val"]
        if not len(val_set):
            raise ConfigError("data.val: the validation set is empty (too few patients with masks in "
                              "data.train; name validation trees with data.val=PATH)")
        b = t.batch_size
        if b % info.world_size:
            raise ConfigError(f"config key 'train.batch_size': {b} does not split evenly over {info.world_size} processes")
        if len(train_set) < b:
            raise ConfigError(f"config key 'train.batch_size': {b} is larger than the training set "
                              f"({len(train_set)} images with masks)")
        for k, s in self.sets.items():
            run.say(f"{k}: {len(s)} images, {len({r.patient_id for r in s.records})} patients")
        self.net = UNet(cfg.model).to(device)
        self.model = wrap_ddp(self.net, info)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.spe = len(train_set) // b
        self.total_steps = self.spe * t.epochs
        self.warmup = int(round(cfg.optim.warmup_epochs * self.spe))
        self.lr = cfg.optim.lr
        self.args = checkpoint_args(self.net, cfg)
        self.t0 = time.perf_counter()
        return {"sets": {k: {"images": len(s), "patients": len({r.patient_id for r in s.records})}
                         for k, s in self.sets.items()}}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"selection": "val_dice"}

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, info, device = self.cfg, self.run.info, self.run.device
        train_set, b = self.sets["train"], cfg.train.batch_size
        epoch, offset = divmod(step, self.spe)
        if epoch != self._epoch:  # a pure function of (seed, epoch): every rank and a resume agree
            self._epoch = epoch
            self.order = epoch_permutation(len(train_set), cfg.seed, epoch)
            self.model.train()
        idx = self.order[offset * b:(offset + 1) * b][info.rank::info.world_size].to(train_set.images.device)
        x = train_set.images.index_select(0, idx).to(device).float()
        y = train_set.masks.index_select(0, idx).to(device).float()
        if cfg.augment.enabled:
            x, y = joint_augment(x, y, cfg.augment)
        self.lr = warmup_cosine_lr(cfg.optim.lr, step, self.total_steps, self.warmup)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        with autocast_context(device, cfg.train.amp):
            loss = dice_bce_loss(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}

    def log_values(self, step: int, means: dict[str, float], seconds: float, steps_here: int) -> dict[str, Any]:
        return {"train/loss": means["loss"], "lr": self.lr}

    def evaluation_due(self, step: int) -> bool:
        return step % self.spe == 0

    def evaluate(self, step: int, train_means: dict[str, float]) -> Evaluation:
        """Validation loss and Dice per lung on the network grid (thresholded at 0.5)."""
        t, device = self.cfg.train, self.run.device
        val = self.sets["val"]
        probs = predict_probs(self.net, val.images, t.eval_batch_size, device, t.amp)
        truth = val.masks.cpu()
        val_loss = float(dice_bce_loss(torch.logit(probs.clamp(1e-6, 1 - 1e-6)), truth))
        pred = probs > 0.5
        rows = [{"dice_left": _dice_t(pred[i, 0], truth[i, 0]), "dice_right": _dice_t(pred[i, 1], truth[i, 1])}
                for i in range(len(val))]
        scores = mean_scores(rows)
        value = scores["dice"]
        self.history.append(value)
        epoch = step // self.spe
        train_loss = train_means.get("loss", 0.0)
        row = {"epoch": epoch, "step": step, "train_loss": train_loss, "val_loss": val_loss,
               **{f"val_{k}": v for k, v in scores.items()}, "lr": self.lr,
               "seconds": round(time.perf_counter() - self.t0, 2)}
        return Evaluation(value, True, scalars={"val/loss": val_loss, **{f"val/{k}": v for k, v in scores.items()}},
                          row=row, message=f"epoch {epoch}/{t.epochs}: train loss {train_loss:.4f}, "
                                           f"val loss {val_loss:.4f}, val dice {value:.4f}")

    def early_stop_message(self) -> str:
        return f"early stop: no better validation Dice for {self.patience} epochs"

    def finish(self, result: LoopResult, run: Run) -> None:
        self.best = best_or_latest(run.checkpoints)
        if result.interrupted or not run.info.is_main or self.best is None:
            return
        ckpt_io.load_module(self.best, MODULE, self.net)
        for name, s in self.sets.items():
            if name == "train" or not len(s):
                continue
            scores = score_records(self.net, s.records, self.cfg.data.size, run.device)
            self.results[name] = scores
            payload = {"set": name, "checkpoint": str(self.best), "size": "each image's own", **scores}
            # strict JSON: an infinite HD95 (a lung missed entirely in some image) is written as null
            payload = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in payload.items()}
            atomic_write_text(run.run_dir / f"scores_{name}.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
            run.say(f"{name}: dice left {scores['dice_left']:.4f}, right {scores['dice_right']:.4f}; "
                    f"hd95 left {scores['hd95_left']:.2f}, right {scores['hd95_right']:.2f} px")


def _dice_t(p: torch.Tensor, t: torch.Tensor) -> float:
    total = float(p.sum() + t.sum())
    return 1.0 if total == 0 else 2.0 * float((p & (t > 0.5)).sum()) / total


def train(cfg: SegmenterConfig, run_dir: str | Path, resume: bool = False,
          echo: Callable[[str], None] | None = None) -> SegmenterResult:
    """Train (or, with ``resume``, continue) a segmenter in ``run_dir``; see the module docstring."""
    return train_epochs(SegmenterFamily(cfg), run_dir, resume, echo)


# ----------------------------------------------------------------------------------------------
# `cxr segment`: masks in the Montgomery layout


def load_segmenter(checkpoint: str | Path, device: torch.device) -> tuple[UNet, dict[str, Any], Path]:
    """The U-Net of a run folder or checkpoint (``best`` when there is one), its ``model_args``
    and the checkpoint folder; a checkpoint of another family is one line."""
    ckpt = run_checkpoint(checkpoint)
    args = ckpt_io.read_model_args(ckpt, MODULE)
    ckpt_io.check_family(ckpt, args, MODEL_FAMILY, "segmenter")
    net = build_unet(args["model"])
    ckpt_io.load_module(ckpt, MODULE, net)
    return net.to(device).eval(), args, ckpt


def mask_name(image_ref: str) -> str:
    """The Montgomery mask file name of an image: its own name, as PNG."""
    member = split_ref(image_ref)[1] or image_ref
    return Path(member.replace("\\", "/")).with_suffix(".png").name


def _write_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray((mask.astype(np.uint8) * 255), mode="L").save(f, format="PNG"))


def segment_trees(checkpoint: str | Path, trees: Sequence[str], out: str | Path, device: str = "auto",
                  layout: str | None = None, skip_bad: bool = False,
                  echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``out/ManualMask/{leftMask,rightMask}/<image>.png`` (0/255, each image's own size)
    for every image of ``trees``. All masks go to a temporary folder renamed to ``out`` at the
    end: a failure leaves nothing. ``out`` must not exist, or be an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(out, "--out exists and is not an empty folder; choose another")
    dev = resolve_device(device, 0, what="--device")
    net, args, ckpt = load_segmenter(checkpoint, dev)
    size = int(args["input"]["size"])
    records: list[Sample] = []
    for tree in trees:
        if not Path(tree).exists():
            raise DataError(tree, "no such folder or archive")
        records += load_tree(tree, layout=layout, skip_bad=skip_bad).records
    names: dict[str, str] = {}
    for r in records:
        n = mask_name(r.image)
        if n in names:
            raise DataError(r.image, f"two images would write the same mask name {n} (also {names[n]})")
        names[n] = r.image
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for d in MASK_DIRS:
            (tmp / "ManualMask" / d).mkdir(parents=True)
        for i, r in enumerate(records):
            labels = segment_image(net, load_image(r.image), size, dev)
            for d, v in zip(MASK_DIRS, (IMAGE_LEFT, IMAGE_RIGHT)):
                _write_png(tmp / "ManualMask" / d / mask_name(r.image), labels == v)
            if echo is not None and (i + 1) % 50 == 0:
                echo(f"{i + 1}/{len(records)} images")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"images": len(records), "checkpoint": str(ckpt), "out": str(out)}


# ----------------------------------------------------------------------------------------------
# The lung crop's predicted masks (``data.lung_crop=RUN`` in any trainer, cxr.data.lungcrop)


def is_segmenter_run(path: Path) -> bool:
    """A run folder of this family (its ``run.json`` says so, and it holds checkpoints)."""
    try:
        return (path / "checkpoints").is_dir() and json.loads((path / "run.json").read_text()).get("family") == MODEL_FAMILY
    except (OSError, json.JSONDecodeError):
        return False


class LungPredictor:
    """A segmenter run's network as a :class:`cxr.data.lungcrop.MaskPredictor`: an image's label
    image at its own size; ``key`` is the SHA-256 of the weights, so new weights predict anew."""

    def __init__(self, run: Path, device: str = "auto"):
        self.device = resolve_device(device, 0, what="data.lung_crop")
        self.net, args, ckpt = load_segmenter(run, self.device)
        self.size = int(args["input"]["size"])
        self.key = hashlib.sha256((Path(ckpt) / f"{MODULE}.safetensors").read_bytes()).hexdigest()[:16]

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return segment_image(self.net, img, self.size, self.device)


register_mask_predictor(is_segmenter_run, LungPredictor)
