"""VinDr-CXR detection: a torchvision Faster R-CNN for the 14 findings, on the one training loop.

Model: ``torchvision.models.detection.FasterRCNN`` with a one-channel stem (a ResNet's first
convolution takes one gray channel) over

- ``resnet50`` / ``resnet18`` + FPN (the torchvision ResNet-50-FPN detector's layout: levels
  C2..C5 and a max-pooled P6), built from ``torchvision.models.resnet50(weights=None)``: nothing
  is ever downloaded; ``model.pretrained`` loads a local weights file (a torchvision detector
  state dict or a ResNet backbone one; a three-channel first convolution is summed to one);
- ``tiny``: three residual stages of ``model.width``, 2·width and 4·width channels (strides 4, 8,
  16) with an FPN of ``model.fpn_channels`` (or, ``model.fpn=false``, the last map alone): a
  detector that trains on a CPU in minutes.

Classes: the 14 VinDr findings are labels 1..14 (background 0); "No finding" is not a class the
network predicts but a decision: an image whose best finding box scores below
``eval.no_finding_threshold`` is called "No finding" (:mod:`cxr.metrics.detection`).

Targets: every reader's boxes fused by weighted boxes fusion (:mod:`classifiers.detection_data`);
images without boxes are negatives. The loss is torchvision's sum of the RPN's objectness (BCE)
and box regression (smooth L1) and the box head's classification (cross-entropy) and regression
(smooth L1). SGD with momentum (or AdamW), a warm-up then cosine learning rate, gradients
clipped at ``optim.clip_grad``. Validation mAP at IoU 0.4 with "No finding" scored the
competition's way selects ``checkpoints/best`` (and early stopping); at the end the best weights
score the validation, held-out and test sets into ``scores_<set>.json``, beside the
"No finding"-only baseline.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from classifiers.config import Trees, _as_tree_tuple
from classifiers.detection_data import (
    DetectionSet,
    FusionConfig,
    detection_records,
    grid_to_stored,
    image_id,
    load_detection_set,
    needs_meta,
    stored_to_original,
)
from classifiers.epochs import EpochFamily, EpochResult, train_epochs
from classifiers.pretrained import read_state_dict
from cxr.data.image import load_image
from cxr.data.io import atomic_write_text
from cxr.data.preprocess import resize_square
from cxr.data.record import VINDR, Sample
from cxr.data.sources.vindr import META_CSV
from cxr.data.splits import split_records
from cxr.engine import checkpoint as ckpt_io
from cxr.engine.config import AmpMode, DataConfig
from cxr.engine.distributed import epoch_permutation, resolve_device, unwrap_model, wrap_ddp
from cxr.engine.loop import Evaluation, LoopResult, Run, best_or_latest, run_checkpoint
from cxr.engine.schedules import warmup_cosine_lr
from cxr.engine.speed import autocast_context
from cxr.errors import ConfigError, CxrError, DataError
from cxr.metrics.detection import (
    COMPETITION_IOU,
    Boxes,
    competition_scores,
    no_finding_baseline,
    no_finding_prediction,
    prediction_string,
    tune_no_finding_threshold,
)

MODEL_FAMILY = "detector"
MODULE = "detector"  # the checkpoint's module name
NUM_CLASSES = len(VINDR) + 1  # the 14 findings and the background
# gray ImageNet statistics (the mean and spread of the three channels): what a summed ImageNet
# stem expects, and close to a radiograph's own in [0, 1]
IMAGE_MEAN, IMAGE_STD = 0.449, 0.226
SUBMISSION_HEADER = ("image_id", "PredictionString")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class DetectorDataConfig(DataConfig):
    """Which VinDr trees train, validate and test (the shared keys: :class:`cxr.engine.config.DataConfig`)."""

    SIZE_RANGE: ClassVar[tuple[int, int]] = (32, 1024)

    train: Trees = ("data/vindr",)
    val: Trees = ()  # empty: the training trees' patient-level validation part
    test: Trees = ()  # extra test trees (the training trees' held-out part is always scored)
    layout: str | None = None  # force one layout for every tree; None: auto-detect (vindr)
    size: int = 256

    def __post_init__(self) -> None:
        for key in ("train", "val", "test"):
            object.__setattr__(self, key, _as_tree_tuple(getattr(self, key)))
        if not self.train:
            raise ValueError("data.train must name at least one VinDr tree")
        super().__post_init__()
        if self.fit != "pad":
            raise ValueError("data.fit must be pad for the detector (boxes map back to the whole image)")


@dataclass(frozen=True)
class DetectorModelConfig:
    """The Faster R-CNN: backbone, anchors, heads and its test-time filtering."""

    backbone: Literal["resnet50", "resnet18", "tiny"] = "resnet50"
    fpn: bool = True  # a feature pyramid (anchor_sizes: one per level); false: the last map only
    width: int = 16  # tiny: channels of its first stage (then 2x and 4x)
    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)  # pixels on the network grid
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    head_dim: int = 1024  # the box head's two fully connected layers
    rpn_batch: int = 256  # anchors sampled per image for the RPN loss
    roi_batch: int = 512  # proposals sampled per image for the box head's loss
    rpn_post_nms_train: int = 2000  # proposals kept per image in training
    rpn_post_nms_test: int = 1000  # ... and at test time
    score_thresh: float = 0.01  # detections scoring less are dropped
    nms_thresh: float = 0.5  # per-class NMS of the detections
    detections_per_img: int = 100
    pretrained: str | None = None  # a local weights file; None: random initialization

    def levels(self) -> int:
        if not self.fpn:
            return 1
        return 4 if self.backbone == "tiny" else 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor_sizes", tuple(int(a) for a in self.anchor_sizes))
        object.__setattr__(self, "aspect_ratios", tuple(float(a) for a in self.aspect_ratios))
        if self.fpn and len(self.anchor_sizes) != self.levels():
            raise ValueError(f"model.anchor_sizes needs one size per pyramid level ({self.levels()} for "
                             f"{self.backbone} with an FPN), got {len(self.anchor_sizes)}")
        if not self.anchor_sizes or min(self.anchor_sizes) < 1 or not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ValueError("model.anchor_sizes and model.aspect_ratios must be non-empty and positive")
        if min(self.width, self.fpn_channels, self.head_dim, self.rpn_batch, self.roi_batch,
               self.rpn_post_nms_train, self.rpn_post_nms_test, self.detections_per_img) < 1:
            raise ValueError("model.width, fpn_channels, head_dim, rpn_batch, roi_batch, rpn_post_nms_* and "
                             "detections_per_img must be >= 1")
        if not 0.0 <= self.score_thresh < 1.0 or not 0.0 < self.nms_thresh <= 1.0:
            raise ValueError("model.score_thresh must be in [0, 1) and model.nms_thresh in (0, 1]")


@dataclass(frozen=True)
class DetectorOptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    clip_grad: float = 10.0  # gradient norm clip; 0: none

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.clip_grad < 0:
            raise ValueError("optim.lr must be > 0; optim.weight_decay, warmup_epochs and clip_grad >= 0")


@dataclass(frozen=True)
class DetectorAugmentConfig:
    """Augmentation on the training device: horizontal flips (boxes flipped too) and gray levels."""

    enabled: bool = True
    hflip: float = 0.0  # probability; off by default, since the findings' sides are anatomical
    brightness: float = 0.1
    contrast: float = 0.1
    p: float = 0.5  # probability of the gray-level jitter

    def __post_init__(self) -> None:
        if not (0.0 <= self.hflip <= 1.0 and 0.0 <= self.p <= 1.0):
            raise ValueError("augment.hflip and augment.p are probabilities in [0, 1]")


@dataclass(frozen=True)
class DetectorTrainConfig:
    batch_size: int = 8
    epochs: int = 30
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    patience: int = 0  # validations without a better mAP before stopping; 0: never
    log_every: int = 20
    keep_last: int = 2
    amp: AmpMode = "auto"
    deterministic: bool = False
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        if min(self.batch_size, self.epochs, self.eval_every, self.eval_batch_size, self.log_every) < 1 or self.patience < 0:
            raise ValueError("train.batch_size, epochs, eval_every, eval_batch_size and log_every must be >= 1 "
                             "and train.patience >= 0")


@dataclass(frozen=True)
class DetectorEvalConfig:
    """How predictions are scored (and written by ``cxr detect``)."""

    iou_threshold: float = COMPETITION_IOU
    no_finding_threshold: float = 0.5  # an image whose best box scores less is called "No finding"
    # each validation picks the threshold (0.05, 0.10, ..., 0.95) with the best mAP, stored with the
    # checkpoint for `cxr detect`; false: no_finding_threshold throughout
    tune_no_finding: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold < 1.0 or not 0.0 <= self.no_finding_threshold <= 1.0:
            raise ValueError("eval.iou_threshold must be in (0, 1) and eval.no_finding_threshold in [0, 1]")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything a detector run depends on."""

    seed: int = 0
    device: str = "auto"
    data: DetectorDataConfig = field(default_factory=DetectorDataConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    model: DetectorModelConfig = field(default_factory=DetectorModelConfig)
    optim: DetectorOptimConfig = field(default_factory=DetectorOptimConfig)
    augment: DetectorAugmentConfig = field(default_factory=DetectorAugmentConfig)
    train: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)
    eval: DetectorEvalConfig = field(default_factory=DetectorEvalConfig)

    def replace(self, **changes: Any) -> "DetectorConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# The network


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Stage(nn.Module):
    """A residual block that halves the resolution: two 3×3 convolutions beside a strided 1×1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, 2), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class TinyBackbone(nn.Module):
    """A one-channel stem (stride 2) and three residual stages (strides 4, 8, 16)."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = _conv_bn(1, width, 2)
        self.layer1 = _Stage(width, width)
        self.layer2 = _Stage(width, 2 * width)
        self.layer3 = _Stage(2 * width, 4 * width)
        self.channels = (width, 2 * width, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


class _SingleMap(nn.Module):
    """One feature map of a backbone, named "0", with the ``out_channels`` torchvision reads."""

    def __init__(self, body: nn.Module, layer: str, channels: int):
        super().__init__()
        self.body = IntermediateLayerGetter(body, {layer: "0"})
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(x)


def _backbone(m: DetectorModelConfig) -> nn.Module:
    if m.backbone == "tiny":
        body: nn.Module = TinyBackbone(m.width)
        layers, channels = ("layer1", "layer2", "layer3"), list(body.channels)
    else:
        body = (resnet50 if m.backbone == "resnet50" else resnet18)(weights=None)  # never downloads
        body.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # one gray channel
        body.fc = nn.Identity()
        width = 256 if m.backbone == "resnet50" else 64
        layers, channels = ("layer1", "layer2", "layer3", "layer4"), [width, 2 * width, 4 * width, 8 * width]
    if not m.fpn:
        return _SingleMap(body, layers[-1], channels[-1])
    return BackboneWithFPN(body, {name: str(i) for i, name in enumerate(layers)}, channels, m.fpn_channels,
                           extra_blocks=LastLevelMaxPool())


class Detector(nn.Module):
    """Faster R-CNN over one-channel ``size × size`` images in [0, 1] (see the module docstring).

    ``forward(images, targets)`` is torchvision's: a loss dict in training, per image
    ``{"boxes", "labels", "scores"}`` (labels 1..14 = VinDr class id + 1) in evaluation.
    """

    def __init__(self, cfg: DetectorModelConfig, size: int):
        super().__init__()
        self.cfg, self.size = cfg, size
        backbone = _backbone(cfg)
        levels = cfg.levels()
        sizes = tuple((a,) for a in cfg.anchor_sizes) if cfg.fpn else (cfg.anchor_sizes,)
        anchors = AnchorGenerator(sizes, (cfg.aspect_ratios,) * levels)
        names = [str(i) for i in range(levels - 1)] if cfg.fpn else ["0"]
        roi = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
        channels = backbone.out_channels
        self.net = FasterRCNN(
            backbone, num_classes=None, min_size=size, max_size=size, image_mean=[IMAGE_MEAN], image_std=[IMAGE_STD],
            rpn_anchor_generator=anchors, box_roi_pool=roi,
            box_head=TwoMLPHead(channels * 7 * 7, cfg.head_dim), box_predictor=FastRCNNPredictor(cfg.head_dim, NUM_CLASSES),
            rpn_batch_size_per_image=cfg.rpn_batch, box_batch_size_per_image=cfg.roi_batch,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
            rpn_pre_nms_top_n_train=cfg.rpn_post_nms_train, rpn_pre_nms_top_n_test=cfg.rpn_post_nms_test,
            box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_img)

    @property
    def model_args(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.cfg), "size": self.size}

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        for x in images:
            if x.shape != (1, self.size, self.size):
                raise ValueError(f"detector input must be (1, {self.size}, {self.size}), got {tuple(x.shape)}")
        return self.net(images, targets)


def build_detector(args: dict[str, Any]) -> Detector:
    """Rebuild a detector from its checkpoint's ``model_args["model"]``."""
    cfg = dict(args["config"])
    cfg["anchor_sizes"] = tuple(cfg["anchor_sizes"])
    cfg["aspect_ratios"] = tuple(cfg["aspect_ratios"])
    return Detector(DetectorModelConfig(**cfg), int(args["size"]))


def load_weights(det: Detector, path: str | Path) -> dict[str, int]:
    """Local pretrained weights into ``det``: a torchvision Faster R-CNN state dict (keys
    ``backbone.…``, ``rpn.…``, ``roi_heads.…``) or a ResNet's (``conv1.…``, ``layer1.…``; its ``fc``
    dropped). A three-channel first convolution is summed to one channel; the class predictor
    and the RPN head are skipped when their shapes differ (another class count or anchor set);
    any other mismatch is one line naming the file."""
    state = read_state_dict(Path(path).expanduser())
    if not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    expected = det.net.state_dict()
    conv = "backbone.body.conv1.weight"
    if conv in state and state[conv].ndim == 4 and state[conv].shape[1] == 3:
        state[conv] = state[conv].sum(dim=1, keepdim=True)
    loaded, skipped = {}, 0
    for k, v in state.items():
        if k not in expected:
            raise CxrError(f"{path}: weights of another architecture for the {det.cfg.backbone} detector: "
                           f"unexpected key '{k}'")
        if tuple(v.shape) != tuple(expected[k].shape):
            if k.startswith(("roi_heads.box_predictor.", "rpn.head.")):
                skipped += 1
                continue
            raise CxrError(f"{path}: weights of another architecture for the {det.cfg.backbone} detector: "
                           f"'{k}' has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}")
        loaded[k] = v.to(expected[k].dtype)
    det.net.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "skipped": skipped}


# ----------------------------------------------------------------------------------------------
# Prediction on the grid


def predict_grid(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                 amp: str = "off") -> list[Boxes]:
    """Detections per image on the ``size × size`` grid, VinDr class ids 0..13, in evaluation mode."""
    was = model.training
    model.eval()
    out: list[Boxes] = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            batch = images[s:s + batch_size].to(device).float()
            with autocast_context(device, amp):
                found = model(list(batch))
            for d in found:
                out.append(Boxes.make(d["boxes"].float().cpu().numpy(), (d["labels"] - 1).cpu().numpy(),
                                      d["scores"].float().cpu().numpy()))
    model.train(was)
    return out


def truth_grid(s: DetectionSet) -> list[Boxes]:
    return [Boxes.make(b.numpy(), lab.numpy()) for b, lab in zip(s.boxes, s.labels)]


def score_set(preds: Sequence[Boxes], truths: Sequence[Boxes], threshold: float,
              iou_threshold: float = COMPETITION_IOU) -> dict[str, Any]:
    """mAP with and without "No finding", and the "No finding"-only baseline's, on one set."""
    got = competition_scores(preds, truths, threshold, iou_threshold)
    base = competition_scores(no_finding_baseline(len(truths)), truths, threshold, iou_threshold)
    return {**got, "baseline_map": base["map"], "baseline_map_findings": base["map_findings"]}


def checkpoint_threshold(ckpt: Path, default: float) -> float:
    """The "No finding" threshold the checkpoint's validation chose (``default`` when it has none)."""
    value = ckpt_io.load_state(ckpt).get("extra", {}).get("no_finding_threshold")
    return default if value is None else float(value)


# ----------------------------------------------------------------------------------------------
# Data assembly


def assemble(cfg: DetectorDataConfig) -> dict[str, list[Sample]]:
    """train / val / heldout (/ test) records: the shared patient-level split of the training trees."""
    out: dict[str, list[Sample]] = {"train": [], "val": [], "heldout": [], "test": []}
    for tree in cfg.train:
        parts = split_records(detection_records(tree, cfg.layout, cfg.skip_bad), cfg.split_fractions, cfg.split_seed)
        out["train"] += parts["train"]
        out["val" if not cfg.val else "train"] += parts["val"]
        out["heldout" if cfg.split == "train" else "train"] += parts["test"]
    for tree in cfg.val:
        out["val"] += detection_records(tree, cfg.layout, cfg.skip_bad)
    for tree in cfg.test:
        out["test"] += detection_records(tree, cfg.layout, cfg.skip_bad)
    return out


# ----------------------------------------------------------------------------------------------
# The run


def checkpoint_args(model: nn.Module, cfg: DetectorConfig) -> dict[str, Any]:
    return {"family": MODEL_FAMILY, "model": dict(unwrap_model(model).model_args), "classes": list(VINDR),
            "input": {"size": cfg.data.size, "fit": "pad", "channels": 1, "range": [0.0, 1.0]},
            "fusion": dataclasses.asdict(cfg.fusion), "eval": dataclasses.asdict(cfg.eval)}


DetectorResult = EpochResult  # history: validation mAP@0.4 with "No finding", per validation


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


class DetectorFamily(EpochFamily):
    """The Faster R-CNN on :func:`cxr.engine.loop.run_training`: validation every ``eval_every`` epochs."""

    name = MODEL_FAMILY
    module = MODULE

    def __init__(self, cfg: DetectorConfig):
        super().__init__(cfg)
        self.threshold = cfg.eval.no_finding_threshold  # the last validation's "No finding" threshold

    def setup(self, run: Run) -> dict[str, Any]:
        cfg, t, info = self.cfg, self.cfg.train, run.info
        device = info.device
        self.run = run
        parts = assemble(cfg.data)
        data_device = device if cfg.data.on_device else torch.device("cpu")
        self.sets = {k: load_detection_set(v, cfg.data.size, cfg.fusion)
                     for k, v in parts.items() if v or k in ("train", "val")}
        for s in self.sets.values():
            s.images = s.images.to(data_device)
        train_set, val_set = self.sets["train"], self.sets["val"]
        if not len(val_set):
            raise ConfigError("data.val: the validation set is empty (too few patients in data.train; "
                              "name validation trees with data.val=PATH)")
        if not sum(len(b) for b in train_set.boxes):
            raise DataError(cfg.data.train[0], "no finding box in the training split: nothing to detect")
        b = t.batch_size
        if b % info.world_size:
            raise ConfigError(f"config key 'train.batch_size': {b} does not split evenly over {info.world_size} processes")
        if len(train_set) < b:
            raise ConfigError(f"config key 'train.batch_size': {b} is larger than the training set ({len(train_set)} images)")
        for k, s in self.sets.items():
            n_boxes = sum(len(x) for x in s.boxes)
            negatives = sum(1 for x in s.boxes if not len(x))
            run.say(f"{k}: {len(s)} images ({negatives} without findings), {n_boxes} fused boxes, "
                    f"{len({r.patient_id for r in s.records})} patients")
        clipped = sum(s.clipped for s in self.sets.values())
        if clipped:
            run.say(f"{clipped} reader boxes reached past their image and were clipped to it")
        self.net = Detector(cfg.model, cfg.data.size)
        if cfg.model.pretrained and run.resume_from is None:
            report = load_weights(self.net, cfg.model.pretrained)
            run.say(f"pretrained: {report['loaded']} tensors from {cfg.model.pretrained} "
                    f"({report['skipped']} skipped: another class count or anchor set)")
        self.net.to(device)
        self.model = wrap_ddp(self.net, info)
        o = cfg.optim
        params = [p for p in self.net.parameters() if p.requires_grad]
        if o.name == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        self.spe = len(train_set) // b
        self.total_steps = self.spe * t.epochs
        self.warmup = int(round(o.warmup_epochs * self.spe))
        self.lr = o.lr
        self.args = checkpoint_args(self.net, cfg)
        self.t0 = time.perf_counter()
        return {"sets": {k: {"images": len(s), "patients": len({r.patient_id for r in s.records}),
                             "boxes": sum(len(x) for x in s.boxes)} for k, s in self.sets.items()}}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"selection": "val_map40", "no_finding_threshold": self.threshold}

    def state(self) -> dict[str, Any]:
        return {"no_finding_threshold": self.threshold}

    def load_state(self, extra: dict[str, Any]) -> None:
        self.threshold = float(extra.get("no_finding_threshold", self.threshold))

    def _batch(self, idx: list[int], device: torch.device) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        s, size, a = self.sets["train"], self.cfg.data.size, self.cfg.augment
        x = s.images.index_select(0, torch.tensor(idx, device=s.images.device)).to(device).float()
        boxes = [s.boxes[i].to(device).clone() for i in idx]
        if a.enabled:
            n = x.shape[0]
            flip = (torch.rand(n, device=device) < a.hflip).tolist()
            for k, f in enumerate(flip):
                if f:
                    x[k] = x[k].flip(-1)
                    boxes[k] = torch.stack([size - boxes[k][:, 2], boxes[k][:, 1], size - boxes[k][:, 0],
                                            boxes[k][:, 3]], 1)
            on = (torch.rand(n, 1, 1, 1, device=device) < a.p).float()
            bright = (torch.rand(n, 1, 1, 1, device=device) * 2 - 1) * a.brightness * on
            contrast = 1.0 + (torch.rand(n, 1, 1, 1, device=device) * 2 - 1) * a.contrast * on
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean + bright).clamp(0.0, 1.0)
        targets = [{"boxes": b.reshape(-1, 4), "labels": s.labels[i].to(device) + 1} for b, i in zip(boxes, idx)]
        return x, targets

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, info, device = self.cfg, self.run.info, self.run.device
        b = cfg.train.batch_size
        epoch, offset = divmod(step, self.spe)
        if epoch != self._epoch:  # a pure function of (seed, epoch): every rank and a resume agree
            self._epoch = epoch
            self.order = epoch_permutation(len(self.sets["train"]), cfg.seed, epoch)
            self.model.train()
        idx = self.order[offset * b:(offset + 1) * b][info.rank::info.world_size].tolist()
        x, targets = self._batch(idx, device)
        self.lr = warmup_cosine_lr(cfg.optim.lr, step, self.total_steps, self.warmup)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        with autocast_context(device, cfg.train.amp):
            parts = self.model(list(x), targets)
        loss = sum(v.float() for v in parts.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.optim.clip_grad)
        self.opt.step()
        return {"loss": loss.detach(), **{k.removeprefix("loss_"): v.detach().float() for k, v in parts.items()}}

    def log_values(self, step: int, means: dict[str, float], seconds: float, steps_here: int) -> dict[str, Any]:
        return {**{f"train/{k}": v for k, v in means.items()}, "lr": self.lr}

    def postfix(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{means.get('loss', float('nan')):.3f}"}

    def evaluation_due(self, step: int) -> bool:
        epoch = step // self.spe
        return step % self.spe == 0 and (epoch % self.cfg.train.eval_every == 0 or step == self.total_steps)

    def evaluate(self, step: int, train_means: dict[str, float]) -> Evaluation:
        """mAP@IoU (0.4) on the validation set with "No finding" the competition's way (at the
        threshold tuned on it, ``eval.tune_no_finding``), and without it."""
        t, ev, device = self.cfg.train, self.cfg.eval, self.run.device
        val = self.sets["val"]
        preds, truths = predict_grid(self.net, val.images, t.eval_batch_size, device, t.amp), truth_grid(val)
        if ev.tune_no_finding:
            self.threshold, _ = tune_no_finding_threshold(preds, truths, ev.no_finding_threshold, ev.iou_threshold)
        scores = competition_scores(preds, truths, self.threshold, ev.iou_threshold)
        value = scores["map"] if math.isfinite(scores["map"]) else 0.0
        self.history.append(value)
        epoch = step // self.spe
        train_loss = train_means.get("loss", 0.0)
        row = {"epoch": epoch, "step": step, "train_loss": train_loss, "val_map40": scores["map"],
               "val_map40_findings": scores["map_findings"], "val_called_no_finding": scores["called_no_finding"],
               "no_finding_threshold": self.threshold,
               "lr": self.lr, "seconds": round(time.perf_counter() - self.t0, 2)}
        return Evaluation(value, True, scalars={"val/map40": scores["map"], "val/map40_findings": scores["map_findings"]},
                          row=row, message=f"epoch {epoch}/{t.epochs}: train loss {train_loss:.4f}, val mAP@"
                                           f"{self.cfg.eval.iou_threshold:g} {scores['map']:.4f} (findings only "
                                           f"{scores['map_findings']:.4f})")

    def early_stop_message(self) -> str:
        return f"early stop: no better validation mAP for {self.patience} validations"

    def finish(self, result: LoopResult, run: Run) -> None:
        self.best = best_or_latest(run.checkpoints)
        if result.interrupted or not run.info.is_main or self.best is None:
            return
        ckpt_io.load_module(self.best, MODULE, self.net)
        t = self.cfg.train
        threshold = checkpoint_threshold(self.best, self.cfg.eval.no_finding_threshold)
        for name, s in self.sets.items():
            if name == "train" or not len(s):
                continue
            scores = score_set(predict_grid(self.net, s.images, t.eval_batch_size, run.device, t.amp),
                               truth_grid(s), threshold, self.cfg.eval.iou_threshold)
            self.results[name] = scores
            payload = {"set": name, "checkpoint": str(self.best), "iou_threshold": self.cfg.eval.iou_threshold,
                       "no_finding_threshold": threshold, **scores}
            atomic_write_text(run.run_dir / f"scores_{name}.json",
                              json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
            run.say(f"{name}: mAP@{self.cfg.eval.iou_threshold:g} {scores['map']:.4f} (findings only "
                    f"{scores['map_findings']:.4f}); 'No finding'-only baseline {scores['baseline_map']:.4f}")


def train(cfg: DetectorConfig, run_dir: str | Path, resume: bool = False,
          echo: Callable[[str], None] | None = None) -> DetectorResult:
    """Train (or, with ``resume``, continue) a detector in ``run_dir``; see the module docstring."""
    return train_epochs(DetectorFamily(cfg), run_dir, resume, echo)


# ----------------------------------------------------------------------------------------------
# `cxr detect`: the competition's submission file


def load_detector(checkpoint: str | Path, device: torch.device) -> tuple[Detector, dict[str, Any], Path]:
    """The detector of a run folder or checkpoint (``best`` when there is one), its ``model_args``
    and the checkpoint folder; a checkpoint of another family is one line."""
    ckpt = run_checkpoint(checkpoint)
    try:
        args = ckpt_io.read_model_args(ckpt, MODULE)
    except ckpt_io.CheckpointError:
        raise ckpt_io.CheckpointError(f"{ckpt}: not a detector checkpoint (no '{MODULE}' network)") from None
    ckpt_io.check_family(ckpt, args, MODEL_FAMILY, "detector")
    net = build_detector(args["model"])
    ckpt_io.load_module(ckpt, MODULE, net)
    return net.to(device).eval(), args, ckpt


def detect_records(net: nn.Module, records: Sequence[Sample], size: int, device: torch.device,
                   threshold: float, batch_size: int = 8, check_meta: bool = False,
                   echo: Callable[[str], None] | None = None) -> list[tuple[str, Boxes]]:
    """(image id, detections in the image's original pixels, "No finding" applied) per record.

    ``check_meta``: the tree ships ``train_meta.csv``, so a PNG without a row there cannot be
    mapped to its original pixels (one line naming it)."""
    out: list[tuple[str, Boxes]] = []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        imgs, shapes = [], []
        for r in chunk:
            if check_meta and r.original_size is None and r.image.lower().endswith(".png"):
                raise DataError(r.image, f"no row for {image_id(r)!r} in {META_CSV}, so its boxes cannot be "
                                         "mapped to the original pixels")
            img = load_image(r.image)
            shapes.append(img.shape)
            imgs.append(resize_square(img, size, "pad")[None])
        found = predict_grid(net, torch.from_numpy(np.stack(imgs)), batch_size, device)
        for r, (h, w), g in zip(chunk, shapes, found):
            boxes = stored_to_original(grid_to_stored(g.boxes, h, w, size), h, w, r.original_size)
            inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # not wholly in the padding
            found_here = Boxes(boxes, g.labels, g.scores).select(inside)
            out.append((image_id(r), no_finding_prediction(found_here, threshold)))
        if echo is not None and (s // batch_size) % 10 == 9:
            echo(f"{len(out)}/{len(records)} images")
    return out


def submission_text(rows: Sequence[tuple[str, Boxes]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUBMISSION_HEADER)
    for ident, boxes in rows:
        writer.writerow([ident, prediction_string(boxes)])
    return buf.getvalue()


def detect_tree(checkpoint: str | Path, tree: str | Path, out: str | Path, device: str = "auto",
                threshold: float | None = None, layout: str | None = None, skip_bad: bool = False,
                overwrite: bool = False, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``out`` (``image_id,PredictionString``, boxes in each image's original pixels) for every
    annotated image of a VinDr tree, atomically; an existing ``out`` needs ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(out, "--out exists; pass --overwrite to replace it")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--no-finding-threshold must be in [0, 1], got {threshold}")
    dev = resolve_device(device, 0, what="--device")
    net, args, ckpt = load_detector(checkpoint, dev)
    size = int(args["input"]["size"])
    nf = checkpoint_threshold(ckpt, float(args["eval"]["no_finding_threshold"])) if threshold is None else threshold
    records = detection_records(tree, layout, skip_bad)
    rows = detect_records(net, records, size, dev, nf, check_meta=needs_meta(tree), echo=echo)
    atomic_write_text(out, submission_text(rows))
    called = sum(1 for _, b in rows if len(b) == 1 and b.labels[0] == len(VINDR))
    return {"images": len(rows), "no_finding": called, "threshold": nf, "checkpoint": str(ckpt), "out": str(out)}
