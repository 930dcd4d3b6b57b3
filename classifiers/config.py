"""The classifier run config: one frozen dataclass tree, saved as the run's ``config.yaml``.

Trees are named by path; every data key takes one path or a list (``data.train=PATH`` or
``data.train=[A,B]``). Training trees are split by patient with the same fractions and seed as
the CycleGAN trainer (:func:`cxr.data.splits.split_records`, ``split_seed=0``), so the images
a classifier is tested on were never seen by a generator trained on the same tree:

- the *train* part trains (plus the *val* part when ``data.val`` names validation trees);
- the *val* part is the validation set unless ``data.val`` is given;
- the *test* part is always held out and reported as ``heldout`` (the in-domain test set),
  and is the ``test`` set too when ``data.test`` is empty.

``data.split=all`` trains on whole trees instead (validation is then carved with the
validation fraction only; no in-domain test set).

Classifiers count in epochs (one pass over the training images), not steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from cxr.engine.config import AmpMode, CompileMode, DataConfig

Trees = str | tuple[str, ...]  # one path or several; normalized to a tuple


def _as_tree_tuple(value: Trees | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class ClassifierDataConfig(DataConfig):
    """Which trees train, validate and test, and how they mix (the shared keys:
    :class:`cxr.engine.config.DataConfig`)."""

    SIZE_RANGE: ClassVar[tuple[int, int]] = (16, 1024)

    train: Trees = ("data/phantom/ChinaSet_AllFiles",)
    val: Trees = ()  # empty: carved from the training trees (patient-level, stratified)
    test: Trees = ()  # empty: the training trees' held-out test part
    synthetic: Trees = ()  # trees written by `cxr generate`, added to training only
    synthetic_ratio: float = 0.0  # synthetic images per real training image (0.5 → 1 per 2 real)
    # copies of real training images added per real training image (a control for synthetic_ratio:
    # the same number of extra images, none new); drawn like the synthetic ones
    duplicate_ratio: float = 0.0
    harmonized: Trees = ()  # trees written by `cxr harmonize`/`cxr translate`, added to training
    layout: str | None = None  # force one layout for every tree; None: auto-detect each
    # an NIH label CSV (Data_Entry-style, any name) kept outside the trees: every tree is then
    # read as nih with it, like data.layout=nih (docs/data.md)
    labels_csv: str | None = None
    size: int = 128
    balanced: bool = False  # class-balanced sampling of training batches

    def __post_init__(self) -> None:
        for key in ("train", "val", "test", "synthetic", "harmonized"):
            object.__setattr__(self, key, _as_tree_tuple(getattr(self, key)))
        if not self.train:
            raise ValueError("data.train must name at least one dataset tree")
        super().__post_init__()
        if self.synthetic_ratio < 0:
            raise ValueError(f"data.synthetic_ratio must be >= 0, got {self.synthetic_ratio}")
        if self.duplicate_ratio < 0:
            raise ValueError(f"data.duplicate_ratio must be >= 0, got {self.duplicate_ratio}")
        if self.synthetic_ratio > 0 and not self.synthetic:
            raise ValueError("data.synthetic_ratio > 0 needs data.synthetic (trees from `cxr generate`)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small_cnn"  # small_cnn, densenet121, resnet18, resnet50, fusion (see classifiers.models)
    pretrained: str | None = None  # a weights file; None: random initialization
    pos_weight: bool = False  # BCE positive weights neg/pos from training prevalence (binary, nih14)
    options: dict[str, Any] = field(default_factory=dict)  # network keywords, e.g. {width: 8, dropout: 0.2}


@dataclass(frozen=True)
class OptimConfig:
    """AdamW; after a linear warmup the learning rate decays to zero over all epochs along a
    cosine (``schedule: cosine``) or stays at ``lr`` (``schedule: constant``)."""

    lr: float = 2e-3
    weight_decay: float = 1e-3
    warmup_epochs: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.lr must be > 0, optim.weight_decay and optim.warmup_epochs >= 0")


@dataclass(frozen=True)
class AugmentConfig:
    """GPU-side kornia augmentation (:func:`cxr.engine.data.gpu_augment`); no flips by default:
    the heart is on the left, and a flipped film is another, rare acquisition."""

    enabled: bool = True
    degrees: float = 5.0
    scale: tuple[float, float] = (0.95, 1.05)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = False
    p: float = 0.5


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """The epoch-based loop (the other keys mean what they mean in :class:`cxr.engine.config.StepTrainConfig`)."""

    batch_size: int = 16
    epochs: int = 20
    patience: int = 0  # stop after this many epochs without a better validation metric; 0: never
    # the checkpoint kept as best and tested: "best" validation metric, or the "last" epoch (a
    # fixed schedule: validation then selects nothing; needs patience 0)
    select: str = "best"
    bn_recalibrate: bool = True  # exact batch-norm statistics over the training images before each validation
    log_every: int = 20  # steps between training-loss lines
    keep_last: int = 2
    amp: AmpMode = "auto"
    compile: bool = False
    compile_mode: CompileMode = "default"  # "reduce-overhead": CUDA graphs for the training step
    channels_last: bool = True  # only applied on CUDA
    deterministic: bool = False
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or self.patience < 0 or self.eval_batch_size < 1:
            raise ValueError("train.batch_size, train.epochs and train.eval_batch_size must be >= 1 "
                             "and train.patience >= 0")
        if self.select not in ("best", "last"):
            raise ValueError(f"train.select must be best or last, got {self.select!r}")
        if self.select == "last" and self.patience:
            raise ValueError("train.select=last keeps the last epoch: it needs train.patience=0")


@dataclass(frozen=True)
class EvalConfig:
    #: The metrics ``ci_metrics`` may name: those of :mod:`cxr.metrics.classification` that get intervals.
    CI_METRICS: ClassVar[tuple[str, ...]] = ("auroc", "accuracy", "sensitivity", "specificity", "f1",
                                             "sens_at_95spec", "ece", "bce", "cross_entropy", "balanced_accuracy")

    n_boot: int = 1000  # patient-level bootstrap resamples for the 95% intervals (0: none)
    boot_seed: int = 0
    # bare metric names that get intervals (e.g. [auroc]: macro and per label; a replicate then
    # costs about a tenth on NIH-14); empty: every metric
    ci_metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_boot < 0:
            raise ValueError(f"eval.n_boot must be >= 0, got {self.n_boot}")
        unknown = [k for k in self.ci_metrics if k not in self.CI_METRICS]
        if unknown:
            raise ValueError(f"eval.ci_metrics: unknown metric {unknown[0]!r} (known: {', '.join(self.CI_METRICS)})")


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything a classifier run depends on."""

    seed: int = 0
    device: str = "auto"
    task: str = "tb"  # tb, nih14 or nine (cxr.data.tasks)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def replace(self, **changes: Any) -> "ClassifierConfig":
        return dataclasses.replace(self, **changes)
