"""The CycleGAN run config: one frozen dataclass tree, defaults = Zhu et al. 2017.

Domain A is the Montgomery-like tree and domain B the Shenzhen-like tree of the phantom by
default (``cxr phantom --preset nlm --out data/phantom``), so ``a2b`` harmonizes Montgomery
(CR) images towards Shenzhen (DR). Any two trees that :func:`cxr.data.layouts.load_tree`
reads can be used: ``data.a=PATH data.b=PATH``.

Paper defaults kept here: λ_cycle = 10, identity weight 0.5·λ_cycle, LSGAN, image pool of 50,
Adam(lr 2e-4, β = (0.5, 0.999)), constant learning rate for the first half then linear decay
to zero, ResNet-9 generator, 70×70 PatchGAN, instance norm, batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from cxr.engine.config import DataConfig, StepTrainConfig


@dataclass(frozen=True)
class CycleGANDataConfig(DataConfig):
    """Where the two domains come from (the shared keys: :class:`cxr.engine.config.DataConfig`)."""

    SIZE_RANGE: ClassVar[tuple[int, int]] = (32, 1024)
    SIZE_MULTIPLE: ClassVar[int] = 4  # the generators halve the image at least twice
    RETIRED_KEYS: ClassVar[dict[str, Any]] = {"zoom_out": 0.0}  # tried, not adopted

    a: str = "data/phantom/MontgomerySet"  # domain A (default: Montgomery-like CR)
    b: str = "data/phantom/ChinaSet_AllFiles"  # domain B (default: Shenzhen-like DR)
    layout_a: str | None = None  # None: auto-detect
    layout_b: str | None = None
    # an NIH label CSV kept outside domain A's / B's tree (implies layout nih; docs/data.md):
    # the patient ids of the patient-level split come from it
    labels_csv_a: str | None = None
    labels_csv_b: str | None = None
    size: int = 256  # square training resolution (64–512 in the paper's regime)
    augment: bool = False  # small random affine + brightness/contrast on the GPU (never flips)
    # "histogram": before training, domain A is histogram-matched to domain B's training split
    # (gan.cyclegan.prematch) into <run>/prematched/, and trained on from there; the generator
    # then only learns what a gray-level curve cannot. `cxr translate` applies the same match.
    prematch: Literal["histogram"] | None = None
    prematch_field: float = 1.0  # match the central fraction of each side only (cxr harmonize --field)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.a or not self.b:
            raise ValueError("data.a and data.b must name dataset folders")
        if not 0.0 < self.prematch_field <= 1.0:
            raise ValueError(f"data.prematch_field must be in (0, 1], got {self.prematch_field}")
        if self.prematch is None and self.prematch_field != 1.0:
            raise ValueError("data.prematch_field needs data.prematch (e.g. data.prematch=histogram)")
        if self.prematch is not None and self.labels_csv_a is not None:
            raise ValueError("data.prematch writes a copy of domain A's tree, which must hold its label CSV: "
                             "put the CSV into the tree (any name) instead of giving data.labels_csv_a")


@dataclass(frozen=True)
class ModelConfig:
    generator: str = "resnet9"  # resnet6, resnet9 or unet256 (see gan.networks)
    discriminator: str = "patchgan"
    ngf: int = 64  # generator filters in the first layer
    ndf: int = 64  # discriminator filters in the first layer
    n_blocks: int | None = None  # ResNet blocks; None: the generator name's (6 or 9)
    d_layers: int = 3  # PatchGAN stride-2 layers (3 → 70×70 patches)
    norm: Literal["instance", "batch", "none"] = "instance"
    d_norm: Literal["instance", "batch", "none"] | None = None  # discriminators' norm; None: ``norm``
    dropout: float = 0.0
    residual: bool = False  # generators learn a change added to their input (identity at start)
    upsample: Literal["transpose", "bilinear"] = "transpose"  # U-Net decoder; bilinear: no checkerboard
    winograd: Literal["auto", "on", "off"] = "auto"  # ResNet blocks' 3×3 convs by Winograd F(4, 3); auto: on a CPU where it pays


@dataclass(frozen=True)
class LossConfig:
    RETIRED_KEYS: ClassVar[dict[str, Any]] = {"border_sigma": 0.0}  # tried, not adopted

    gan_mode: Literal["lsgan", "vanilla", "hinge"] = "lsgan"
    lambda_cycle: float = 10.0  # λ of ‖G_BA(G_AB(a)) − a‖₁ and ‖G_AB(G_BA(b)) − b‖₁
    lambda_identity: float = 0.5  # identity weight relative to λ_cycle (0 turns it off)
    pool_size: int = 50  # history of fakes shown to the discriminators
    lambda_structure: float = 0.0  # weight of 1 - SSIM contrast-structure(input, translation), both directions; 0: off
    d_field: float = 1.0  # central fraction of each side the discriminators judge (< 1: borders and markers left out)
    d_augment: float = 0.0  # random zoom/shift (± this fraction) of every image a discriminator sees; 0: off
    lambda_border: float = 0.0  # weight of ‖translation − input‖₁ outside the judged field (needs d_field < 1); 0: off

    def __post_init__(self) -> None:
        if min(self.lambda_cycle, self.lambda_identity, self.pool_size, self.lambda_structure,
               self.lambda_border) < 0:
            raise ValueError("lambda_cycle, lambda_identity, lambda_structure, lambda_border and pool_size must be >= 0")
        if not 0.0 < self.d_field <= 1.0:
            raise ValueError(f"loss.d_field must be in (0, 1], got {self.d_field}")
        if self.lambda_border > 0 and self.d_field >= 1.0:
            raise ValueError("loss.lambda_border ties the border outside the judged field: it needs loss.d_field < 1")
        if not 0.0 <= self.d_augment < 0.5:
            raise ValueError(f"loss.d_augment must be in [0, 0.5), got {self.d_augment}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_steps: int | None = None  # linear decay over the last N steps; None: second half

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("optim.lr must be > 0 and the betas in [0, 1)")


def check_schedule(optim: OptimConfig, train: StepTrainConfig) -> None:
    """The step budget and the decay inside it (the CycleGAN's and CUT's configs share them)."""
    decay = optim.decay_steps
    if decay is not None and not 0 <= decay <= train.steps:
        raise ValueError(f"optim.decay_steps must be in 0..train.steps={train.steps}, got {decay}")
    if train.steps < 1 or train.batch_size < 1:
        raise ValueError("train.steps and train.batch_size must be >= 1")


@dataclass(frozen=True)
class CycleGANConfig:
    """Everything a CycleGAN run depends on; saved as the run's ``config.yaml``."""

    seed: int = 0
    device: str = "auto"
    data: CycleGANDataConfig = field(default_factory=CycleGANDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: StepTrainConfig = field(default_factory=lambda: StepTrainConfig(batch_size=1, steps=10_000))

    def __post_init__(self) -> None:
        check_schedule(self.optim, self.train)
