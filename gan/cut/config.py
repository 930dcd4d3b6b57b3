"""The CUT / FastCUT run config: one frozen dataclass tree, defaults = Park et al. 2020.

The data section is the CycleGAN's (:class:`gan.cyclegan.config.CycleGANDataConfig`: the two
trees, their layouts, the shared patient-level training split, ``data.prematch``), and so is
the optimizer section (Adam 2e-4, β = (0.5, 0.999), constant then linear decay). What is new
is one generator G: A → B and one discriminator D_B, and the PatchNCE objective
(:mod:`gan.cut.nce`) in place of the cycle.

``model.mode`` picks the variant (paper, section 4):

* ``cut``: λ_NCE = 1, with the identity term (PatchNCE also between each B image and G(b));
* ``fastcut``: λ_NCE = 10, no identity term: one generator pass and one encoder pass a step.

Paper defaults kept: ResNet-9 generator, 70×70 PatchGAN, instance norm, LSGAN, batch size 1,
PatchNCE on the encoder layers 0, 4, 8, 12, 16 with 256 patches each, 2-layer MLP heads of 256
channels, temperature 0.07. Left out: FastCUT's flip-equivariance augmentation (chest
radiographs are never flipped here; left and right are anatomy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cxr.engine.config import StepTrainConfig
from gan.cyclegan.config import CycleGANDataConfig, OptimConfig, check_schedule

MODES = ("cut", "fastcut")
# λ_NCE per mode when loss.lambda_nce is left unset (paper, section 4)
DEFAULT_LAMBDA_NCE = {"cut": 1.0, "fastcut": 10.0}


@dataclass(frozen=True)
class CUTModelConfig:
    mode: Literal["cut", "fastcut"] = "cut"  # cut: identity PatchNCE on B, λ_NCE 1; fastcut: none, λ_NCE 10
    generator: str = "resnet9"  # resnet6 or resnet9 (PatchNCE reads the ResNet encoder's layers)
    discriminator: str = "patchgan"
    ngf: int = 64  # generator filters in the first layer
    ndf: int = 64  # discriminator filters in the first layer
    n_blocks: int | None = None  # ResNet blocks; None: the generator name's (6 or 9)
    d_layers: int = 3  # PatchGAN stride-2 layers (3 → 70×70 patches)
    norm: Literal["instance", "batch", "none"] = "instance"
    d_norm: Literal["instance", "batch", "none"] | None = None  # discriminator's norm; None: ``norm``
    dropout: float = 0.0
    residual: bool = False  # the generator learns a change added to its input (identity at start)
    winograd: Literal["auto", "on", "off"] = "auto"  # ResNet blocks' 3×3 convs by Winograd F(4, 3)
    # the generator's layers PatchNCE compares: k = the output of its first k layers (0: the
    # input image); 4: the first stride-2 conv, 8: the second's norm, 12 / 16: the 3rd / 7th block
    nce_layers: tuple[int, ...] = (0, 4, 8, 12, 16)
    head_channels: int = 256  # width of each layer's 2-layer MLP head (and of the compared embeddings)

    def __post_init__(self) -> None:
        if not self.generator.startswith("resnet"):
            raise ValueError(f"model.generator must be a ResNet generator (resnet6, resnet9), got {self.generator!r}")
        if not self.nce_layers or list(self.nce_layers) != sorted(set(self.nce_layers)) or min(self.nce_layers) < 0:
            raise ValueError(f"model.nce_layers must be increasing layer indices >= 0, got {list(self.nce_layers)}")
        if self.head_channels < 1:
            raise ValueError(f"model.head_channels must be >= 1, got {self.head_channels}")


@dataclass(frozen=True)
class CUTLossConfig:
    gan_mode: Literal["lsgan", "vanilla", "hinge"] = "lsgan"
    lambda_gan: float = 1.0  # weight of the adversarial term
    lambda_nce: float | None = None  # weight of PatchNCE; None: the mode's (cut 1, fastcut 10)
    num_patches: int = 256  # locations sampled per layer and image (all of them when the layer has fewer)
    temperature: float = 0.07  # τ of the PatchNCE softmax

    def __post_init__(self) -> None:
        if self.lambda_gan < 0 or (self.lambda_nce is not None and self.lambda_nce < 0):
            raise ValueError("loss.lambda_gan and loss.lambda_nce must be >= 0")
        if self.num_patches < 2:
            raise ValueError(f"loss.num_patches must be >= 2 (one positive, at least one negative), got {self.num_patches}")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class CUTConfig:
    """Everything a CUT or FastCUT run depends on; saved as the run's ``config.yaml``."""

    seed: int = 0
    device: str = "auto"
    data: CycleGANDataConfig = field(default_factory=CycleGANDataConfig)
    model: CUTModelConfig = field(default_factory=CUTModelConfig)
    loss: CUTLossConfig = field(default_factory=CUTLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: StepTrainConfig = field(default_factory=lambda: StepTrainConfig(batch_size=1, steps=10_000))

    def __post_init__(self) -> None:
        check_schedule(self.optim, self.train)

    @property
    def lambda_nce(self) -> float:
        """λ_NCE in force: ``loss.lambda_nce``, or the mode's default."""
        return self.loss.lambda_nce if self.loss.lambda_nce is not None else DEFAULT_LAMBDA_NCE[self.model.mode]

    @property
    def nce_identity(self) -> bool:
        """Whether PatchNCE also runs on B images through G (CUT, not FastCUT)."""
        return self.model.mode == "cut"
