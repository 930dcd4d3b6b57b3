"""StyleGAN2-ADA training: a family of the engine's one loop, with the four phases of a step explicit.

Per step (Karras et al. 2020, the ADA paper's schedule), ``k`` counting steps from 0:

1. **G main** — D frozen; ``L_G`` on fresh latents and labels drawn from the training labels;
   Adam(G) steps.
2. **G reg** — path length, when ``loss.pl_weight > 0`` and ``k % pl_interval == 0``; its own
   Adam(G) step (lazy regularization).
3. **D main** — ``L_D`` on the reals of the step and fakes of another latent batch, every image
   through the ADA pipe; Adam(D) steps. D's signs on the reals add to the ADA statistics.
4. **D reg** — R1 through the pipe, when ``loss.r1_gamma > 0`` and ``k % r1_interval == 0``; its
   own Adam(D) step.

Then every ``ada.interval`` steps p moves (:func:`gan.stylegan2.augment.update_p`), and G_ema
moves toward G with ``β = ema_beta(batch, ema_kimg, ema_rampup, cur_nimg)``. A network with a
lazy regularizer takes ``interval + 1`` optimizer steps per ``interval`` minibatches, so its Adam
runs with :func:`gan.stylegan2.loss.lazy_adam`'s ``lr`` and ``betas``.

Gradients are averaged over the processes by hand (one flat all-reduce per phase, as NVlabs'
code does) rather than through DDP, whose hooks see neither the generator's separate mapping
and synthesis calls nor a double backward. Rank 0's initial weights are broadcast to the others.

Labels come from the tree's loader (:func:`label_space`): a one-label tree (Tuberculosis) gives
two classes, ``normal`` and the label, one-hot; the nine-class tree one-hot over its nine; any
other label set (NIH 14, VinDr) multi-hot, a missing label counting as absent. Only the
patient-level training split is used unless ``data.split=all``; ``images_seen.txt`` lists it.

FID snapshots: every ``train.fid_every`` steps (or ``train.fid_kimg``) and at the last step the
loop asks the family to evaluate; it hands an injected ``metrics_fn`` a :class:`Snapshot` (a
sampler of ``train.fid_images`` G_ema images with fixed latents and labels drawn as the
training labels) and returns the FD as the loop's metric with ``higher_is_better=False``, so
the loop keeps the lowest-FD checkpoint as ``best/``. The feature extractors live in ``eval/``,
a higher layer; ``cxr train-gan stylegan2`` passes :func:`eval.gan_snapshots.fid_metrics`.

A checkpoint holds ``G``, ``D`` and ``G_ema`` (``model_args``: the network's own plus
``family``, ``label_names``, ``label_kind``, ``c_dim`` and the ``input`` contract), both
optimizers, and as family state p, the ADA statistics, the latent, augmentation and loss
generators' states, the path-length mean, ``cur_nimg`` and the EMA's update count; the loop
adds every global RNG. A resumed run continues kimg, p, the EMA and every stream exactly.

Speed (:mod:`cxr.engine.speed`): ``train.amp`` (auto: bf16 on a GPU with bf16 in hardware,
float32 on a CPU) runs the G main and D main forward passes under bf16 autocast, their losses
in float32 from the logits; path length, R1, the EMA update and the ADA statistics stay float32.
``train.compile`` compiles the synthesis network and D for the main phases only; the
regularizers' double backward runs through the eager modules (the same parameters), and the
checkpoints hold the eager modules. Adam is fused on CUDA.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cxr.data.io import atomic_write_text
from cxr.data.record import NINE, Sample, relabel
from cxr.engine import checkpoint as ckpt_io
from cxr.engine.checkpoint import read_meta
from cxr.engine.config import DataConfig, StepTrainConfig
from cxr.engine.distributed import DistInfo
from cxr.engine.ema import WeightAverage, ema_beta
from cxr.engine.loop import Evaluation, Family, LoopResult, Run, main_first, run_training
from cxr.engine.speed import CUDAGRAPH_MODES, autocast_context, fused_adam_kwargs, maybe_compile
from cxr.errors import ConfigError
from gan.cyclegan.data import Domain, DomainStream, load_domain, to_model_range
from gan.stylegan2.augment import AugmentConfig, AugmentPipe, initial_p, real_sign_stats, update_p
from gan.stylegan2.config import PRESETS, LossConfig, preset
from gan.stylegan2.loss import StyleGAN2Loss, lazy_adam
from gan.stylegan2.networks import Discriminator, Generator, model_args

MODEL_FAMILY = "stylegan2"
SEEN_FILE = "images_seen.txt"
NORMAL = "normal"  # the class of a one-label tree's negatives
MAX_GRID_ROWS = 16  # classes shown in the logged grids
FID_EXTRACTORS = ("auto", "inception", "xrv", "trained")  # eval.gan_features.EXTRACTORS (a higher layer)
FID_BATCH = 64  # G_ema images per forward pass at a snapshot


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class StyleGAN2DataConfig(DataConfig):
    """The training tree (the shared keys: :class:`cxr.engine.config.DataConfig`)."""

    SIZE_RANGE: ClassVar[tuple[int, int]] = (32, 1024)

    train: str = "data/phantom/ChinaSet_AllFiles"  # a tree any loader reads (cxr datasets inspect)
    layout: str | None = None  # None: auto-detect
    labels_csv: str | None = None  # an NIH label CSV kept outside the tree (docs/data.md)
    size: int = 256  # the generator's resolution: a power of two in 32–1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size & (self.size - 1):
            raise ValueError(f"data.size must be a power of two in 32..1024 (the generator's resolution), "
                             f"got {self.size}")
        if not self.train:
            raise ValueError("data.train must name a dataset folder")


@dataclass(frozen=True)
class StyleGAN2ModelConfig:
    """The networks: a preset (:func:`gan.stylegan2.config.preset`) and what overrides it."""

    preset: Literal["stylegan2", "auto", "tiny"] = "auto"
    conditional: bool = True  # label-conditional G (mapping embedding) and projection D
    z_dim: int | None = None  # None: the preset's
    w_dim: int | None = None
    mapping_layers: int | None = None
    channel_base: int | None = None
    channel_max: int | None = None
    mbstd_group_size: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in ("z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max", "mbstd_group_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.{name} must be ≥ 1 (or null: the preset's), got {value}")


@dataclass(frozen=True)
class StyleGAN2LossSection:
    """The ``loss:`` section (:class:`gan.stylegan2.config.LossConfig`); null: the preset's."""

    r1_gamma: float | None = None  # null: the preset's (auto: 0.0002·res²/batch)
    r1_interval: int = 16
    style_mixing_prob: float = 0.9
    pl_weight: float | None = None  # null: the preset's (2 for stylegan2, 0 for auto and tiny)
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2

    def __post_init__(self) -> None:
        for name in ("r1_gamma", "pl_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"loss.{name} must be ≥ 0 (or null: the preset's), got {value}")
        if min(self.r1_interval, self.pl_interval, self.pl_batch_shrink) < 1:
            raise ValueError("loss.r1_interval, loss.pl_interval and loss.pl_batch_shrink must be ≥ 1")
        if not 0.0 <= self.style_mixing_prob <= 1.0:
            raise ValueError(f"loss.style_mixing_prob must be in [0, 1], got {self.style_mixing_prob}")
        if not 0.0 < self.pl_decay <= 1.0:
            raise ValueError(f"loss.pl_decay must be in (0, 1], got {self.pl_decay}")


@dataclass(frozen=True)
class StyleGAN2OptimConfig:
    lr: float | None = None  # null: the preset's (0.0025 for auto at 256², 0.002 for stylegan2)
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if (self.lr is not None and self.lr <= 0) or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("optim.lr must be > 0 (or null: the preset's) and the betas in [0, 1)")


@dataclass(frozen=True)
class StyleGAN2TrainConfig(StepTrainConfig):
    """Step keys (:class:`cxr.engine.config.StepTrainConfig`) plus NVlabs' kimg-based ones.

    ``kimg`` (thousands of real images shown) replaces ``steps`` when set; ``tick_kimg``
    replaces ``log_every`` and ``snapshot_ticks`` (ticks between checkpoints) ``ckpt_every``.
    """

    batch_size: int = 16
    kimg: float | None = None  # total length in thousands of images; null: train.steps
    tick_kimg: float | None = None  # log interval in thousands of images; null: train.log_every
    snapshot_ticks: int | None = None  # checkpoint every this many ticks; null: train.ckpt_every
    ema_kimg: float | None = None  # G_ema half-life in thousands of images; null: the preset's
    ema_rampup: float | None = None  # half-life ≤ ema_rampup·cur_nimg; null: the preset's; 0: none
    grid_columns: int = 4  # fixed latents per class in the logged image grids
    fid_every: int = 0  # steps between FID snapshots of G_ema (0: none); the lowest FD is kept as best/
    fid_kimg: float | None = None  # the same in thousands of images; null: train.fid_every
    fid_images: int = 1000  # generated images per snapshot
    fid_extractor: str = "auto"  # feature space, as `cxr evaluate gan --extractor`
    fid_size: int = 64  # side the real and generated images are compared at

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ema:
            raise ValueError("train.ema is a fixed decay; the stylegan2 trainer keeps G_ema by "
                             "train.ema_kimg (a half-life in thousands of images)")
        for name in ("kimg", "tick_kimg", "ema_kimg"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"train.{name} must be > 0 (or null), got {value}")
        if self.snapshot_ticks is not None and self.snapshot_ticks < 0:
            raise ValueError(f"train.snapshot_ticks must be ≥ 0, got {self.snapshot_ticks}")
        if self.ema_rampup is not None and self.ema_rampup < 0:
            raise ValueError(f"train.ema_rampup must be ≥ 0 (0: no ramp-up), got {self.ema_rampup}")
        if self.grid_columns < 1:
            raise ValueError(f"train.grid_columns must be ≥ 1, got {self.grid_columns}")
        if self.fid_every < 0:
            raise ValueError(f"train.fid_every must be ≥ 0 (0: no FID snapshots), got {self.fid_every}")
        if self.fid_kimg is not None and not self.fid_kimg > 0:
            raise ValueError(f"train.fid_kimg must be > 0 (or null: train.fid_every), got {self.fid_kimg}")
        if self.fid_images < 2:
            raise ValueError(f"train.fid_images must be ≥ 2 (a covariance needs two images), got {self.fid_images}")
        if self.fid_extractor not in FID_EXTRACTORS:
            raise ValueError(f"train.fid_extractor must be one of {', '.join(FID_EXTRACTORS)}, "
                             f"got {self.fid_extractor!r}")
        if self.fid_size < 16:
            raise ValueError(f"train.fid_size must be ≥ 16 pixels, got {self.fid_size}")
        if self.compile and self.compile_mode in CUDAGRAPH_MODES:
            raise ValueError(f"train.compile_mode={self.compile_mode} replays CUDA graphs, which the stylegan2 trainer "
                             "does not support (D runs several times per step, the regularizers eagerly between); "
                             "use default or max-autotune-no-cudagraphs")

    def images_to_steps(self, kimg: float) -> int:
        return max(1, math.ceil(kimg * 1000 / self.batch_size))

    @property
    def total_steps(self) -> int:
        return self.images_to_steps(self.kimg) if self.kimg is not None else self.steps

    @property
    def log_interval(self) -> int:
        return self.images_to_steps(self.tick_kimg) if self.tick_kimg is not None else self.log_every

    @property
    def ckpt_interval(self) -> int:
        return self.snapshot_ticks * self.log_interval if self.snapshot_ticks is not None else self.ckpt_every

    @property
    def fid_interval(self) -> int:
        """Steps between FID snapshots (0: none)."""
        return self.images_to_steps(self.fid_kimg) if self.fid_kimg is not None else self.fid_every


@dataclass(frozen=True)
class StyleGAN2Config:
    """Everything a StyleGAN2-ADA run depends on; saved as the run's ``config.yaml``."""

    seed: int = 0
    device: str = "auto"
    data: StyleGAN2DataConfig = field(default_factory=StyleGAN2DataConfig)
    model: StyleGAN2ModelConfig = field(default_factory=StyleGAN2ModelConfig)
    loss: StyleGAN2LossSection = field(default_factory=StyleGAN2LossSection)
    ada: AugmentConfig = field(default_factory=AugmentConfig)
    optim: StyleGAN2OptimConfig = field(default_factory=StyleGAN2OptimConfig)
    train: StyleGAN2TrainConfig = field(default_factory=StyleGAN2TrainConfig)

    def __post_init__(self) -> None:
        if self.train.steps < 1 or self.train.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be >= 1")


# ----------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True)
class LabelSpace:
    """What the conditioning vector means: class names, one-hot (single) or multi-hot (multi)."""

    names: tuple[str, ...]
    kind: Literal["single", "multi", "none"]
    c: np.ndarray  # (N, c_dim) float32 rows of the training images (c_dim 0 when unconditional)

    @property
    def c_dim(self) -> int:
        return len(self.names) if self.kind != "none" else 0

    def grid_rows(self) -> list[tuple[str, np.ndarray]]:
        """(name, c) per class shown in the image grids: each class; for multi-hot each label
        present in training, then the all-absent row."""
        if self.kind == "none":
            return [("all", np.zeros(0, np.float32))]
        eye = np.eye(self.c_dim, dtype=np.float32)
        if self.kind == "single":
            return [(n, eye[i]) for i, n in enumerate(self.names)][:MAX_GRID_ROWS]
        present = [(n, eye[i]) for i, n in enumerate(self.names) if self.c[:, i].any()]
        return (present + [("No Finding", np.zeros(self.c_dim, np.float32))])[:MAX_GRID_ROWS]


def _label_matrix(records: list[Sample]) -> tuple[tuple[str, ...], np.ndarray]:
    names = records[0].label_names
    rows = [(r if r.label_names == names else relabel(r, names)).labels for r in records]
    return names, np.stack(rows).astype(np.float32) if rows else np.zeros((0, len(names)), np.float32)


def label_space(records: list[Sample], conditional: bool, where: str) -> LabelSpace:
    """The conditioning labels of the training ``records`` (see the module docstring).

    A conditional run needs at least two distinct label vectors in the training split; one class
    is a :class:`ConfigError` naming the tree.
    """
    n = len(records)
    if not conditional:
        return LabelSpace((), "none", np.zeros((n, 0), np.float32))
    names, labels = _label_matrix(records)
    if len(names) == 1:
        known = ~np.isnan(labels[:, 0])
        if not known.all():
            bad = records[int(np.flatnonzero(~known)[0])].image
            raise ConfigError(f"{where}: {int((~known).sum())} training image(s) have no {names[0]} label "
                              f"(first: {bad}); a conditional run needs every label (or model.conditional=false)")
        space = LabelSpace((NORMAL, names[0]), "single", np.eye(2, dtype=np.float32)[(labels[:, 0] == 1).astype(int)])
    elif tuple(names) == NINE:
        present = labels == 1
        bad = np.flatnonzero(present.sum(1) != 1)
        if bad.size:
            raise ConfigError(f"{where}: the nine-class tree is single-label, but {bad.size} training image(s) "
                              f"have {int(present[bad[0]].sum())} present labels (first: {records[int(bad[0])].image})")
        space = LabelSpace(tuple(names), "single", present.astype(np.float32))
    else:
        space = LabelSpace(tuple(names), "multi", np.nan_to_num(labels, nan=0.0).clip(0, 1).astype(np.float32))
    distinct = np.unique(space.c, axis=0) if n else space.c
    if len(distinct) < 2:
        only = (", ".join(n for n, v in zip(space.names, distinct[0]) if v) or "no finding") if n else "none"
        raise ConfigError(f"{where}: a conditional run needs at least two classes, but every training image "
                          f"is of one class ({only}); train it with model.conditional=false")
    return space


# ----------------------------------------------------------------------------------------------
# Networks


@dataclass(frozen=True)
class Resolved:
    """The preset with the config's overrides: both networks' configs, loss, EMA and lr."""

    g: Any
    d: Any
    loss: LossConfig
    ema_kimg: float
    ema_rampup: float | None
    lr: float


def resolve(cfg: StyleGAN2Config, c_dim: int) -> Resolved:
    """Fill the preset for ``data.size`` and ``train.batch_size``, then apply the overrides."""
    m, ls, t = cfg.model, cfg.loss, cfg.train
    p = preset(m.preset, cfg.data.size, t.batch_size, c_dim)
    g_over = {k: getattr(m, k) for k in ("z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max")
              if getattr(m, k) is not None}
    d_over = {k: getattr(m, k) for k in ("channel_base", "channel_max", "mbstd_group_size") if getattr(m, k) is not None}
    loss = LossConfig(r1_gamma=p.loss.r1_gamma if ls.r1_gamma is None else ls.r1_gamma, r1_interval=ls.r1_interval,
                      style_mixing_prob=ls.style_mixing_prob,
                      pl_weight=p.loss.pl_weight if ls.pl_weight is None else ls.pl_weight,
                      pl_interval=ls.pl_interval, pl_decay=ls.pl_decay, pl_batch_shrink=ls.pl_batch_shrink)
    rampup = p.ema_rampup if t.ema_rampup is None else (t.ema_rampup or None)
    return Resolved(dataclasses.replace(p.generator, **g_over), dataclasses.replace(p.discriminator, **d_over), loss,
                    p.ema_kimg if t.ema_kimg is None else t.ema_kimg, rampup,
                    p.learning_rate if cfg.optim.lr is None else cfg.optim.lr)


def check_config(cfg: StyleGAN2Config) -> None:
    """Fail early, with one line, on network options the configs refuse (no weights drawn)."""
    resolve(cfg, 2 if cfg.model.conditional else 0)


def input_contract(cfg: StyleGAN2Config) -> dict[str, Any]:
    """What G's output is: the preprocessing of the images it learnt from."""
    return {"size": cfg.data.size, "fit": cfg.data.fit, "channels": 1, "range": [-1.0, 1.0]}


def _reduce_grads(params: list[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients over the processes in one flat all-reduce (missing ones as zeros)."""
    if not info.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _broadcast(module: nn.Module, info: DistInfo) -> None:
    """Rank 0's parameters and buffers on every process (each rank seeded its own)."""
    if not info.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------------------------
# FID snapshots


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot's metrics function is given: where the run is and how to draw G_ema's images."""

    step: int
    kimg: float
    run_dir: Path
    device: torch.device
    n_images: int  # train.fid_images
    sample: Callable[[int], torch.Tensor]  # n -> (n, 1, R, R) G_ema images in [0, 1], the same latents every time


MetricsFn = Callable[[Snapshot], dict[str, Any]]  # must return "fd" (lower is better) and "extractor" (its name)


# ----------------------------------------------------------------------------------------------
# The family


def _write_seen(run_dir: Path, domain: Domain, space: LabelSpace) -> None:
    lines = []
    for r, c in zip(domain.records, space.c):
        label = (",".join(n for n, v in zip(space.names, c) if v) or "No Finding") if space.kind != "none" else "-"
        lines.append(f"{r.image}\t{label}\n")
    atomic_write_text(run_dir / SEEN_FILE, "".join(lines))


class StyleGAN2Family(Family):
    """StyleGAN2-ADA on :func:`cxr.engine.loop.run_training`: the four phases, ADA's p, G_ema,
    image grids of fixed latents per class; with ``metrics_fn``, a FID snapshot every
    ``train.fid_every`` steps as the loop's evaluation (lower FD is better, so ``best/`` is the
    snapshot with the lowest FD)."""

    name = MODEL_FAMILY

    def __init__(self, cfg: StyleGAN2Config, metrics_fn: MetricsFn | None = None):
        t = cfg.train
        self.cfg = cfg
        self.total_steps, self.log_every, self.ckpt_every = t.total_steps, t.log_interval, t.ckpt_interval
        self.batch_size, self.image_size = t.batch_size, cfg.data.size
        self.fid_interval = t.fid_interval
        if self.fid_interval and metrics_fn is None:
            raise ConfigError("train.fid_every/train.fid_kimg: FID snapshots need a metrics function (`cxr train-gan "
                              "stylegan2` builds one: eval.gan_snapshots.fid_metrics); or set train.fid_every=0")
        self.metrics_fn = metrics_fn
        self.fid_extractor = ""  # the extractor's name, once the first snapshot has run

    # -- set-up ---------------------------------------------------------------------------------

    def _load(self, run: Run, build: bool) -> Domain:
        cfg, info = self.cfg, run.info
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run.run_dir / "cache"
        device = info.device if cfg.data.on_device else torch.device("cpu")
        return load_domain("train", cfg.data.train, cfg.data.layout, cfg.data, cache_dir, device, build=build,
                           workers=cfg.data.decode_workers if build else None, labels_csv=cfg.data.labels_csv)

    def setup(self, run: Run) -> dict[str, Any]:
        cfg, info, device = self.cfg, run.info, run.device
        self.run, self.info, self.device = run, info, device
        check_config(cfg)
        domain = main_first(info, lambda build: self._load(run, build))
        self.space = label_space(domain.records, cfg.model.conditional, f"data.train={domain.root}")
        if info.is_main:
            _write_seen(run.run_dir, domain, self.space)
            run.log.text(f"training tree: {domain.root} ({domain.layout}), {len(domain)} of {domain.n_tree} "
                         f"images used; labels: {self.space.kind} {list(self.space.names)}")
            for p in domain.problems:
                run.log.text(f"skipped: {p}")
        self.domain = domain
        self.stream = DomainStream(domain, cfg.train.batch_size, info, seed=cfg.seed)
        self.labels = torch.from_numpy(self.space.c).to(domain.images.device)
        self.local_batch = cfg.train.batch_size // info.world_size

        r = resolve(cfg, self.space.c_dim)
        self.resolved = r
        self.G = Generator(r.g).to(device)
        self.D = Discriminator(r.d).to(device)
        _broadcast(self.G, info)
        _broadcast(self.D, info)
        self.G_ema = WeightAverage(self.G, 0.999)  # the decay is passed per step (ema_beta)
        self.g_reg = r.loss.pl_weight > 0
        self.d_reg = r.loss.r1_gamma > 0
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        g_lr, g_betas = lazy_adam(r.lr, betas, r.loss.pl_interval) if self.g_reg else (r.lr, betas)
        d_lr, d_betas = lazy_adam(r.lr, betas, r.loss.r1_interval) if self.d_reg else (r.lr, betas)
        fused = fused_adam_kwargs(device)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=g_lr, betas=g_betas, eps=cfg.optim.eps, **fused)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=d_lr, betas=d_betas, eps=cfg.optim.eps, **fused)

        # Private streams, each checkpointed: latents and fake labels (CPU, global batches),
        # and per process style mixing and path-length noise (CPU, the loss's) and the
        # augmentations (device).
        seed = cfg.seed * 1009 + info.rank
        self.z_gen = torch.Generator().manual_seed(cfg.seed * 1009 + 11)  # the same on every rank
        self.loss_gen = torch.Generator().manual_seed(seed + 23)
        self.aug_gen = torch.Generator(device).manual_seed(seed + 37)
        self.pipe = AugmentPipe(cfg.ada)
        self.p = initial_p(cfg.ada)
        self.ada_stats = torch.zeros(2, dtype=torch.float64, device=device)
        self.loss = StyleGAN2Loss(self.G, self.D, r.loss, generator=self.loss_gen)
        if self.pipe.enabled:
            self.loss.augment = lambda x: self.pipe(x, self.p, self.aug_gen)
        # Compiled wrappers for the main phases only (sharing G's and D's parameters): R1 and path
        # length take a double backward, which compiled graphs do not support, so they stay eager;
        # modules() hands the eager G and D to the checkpoints.
        self.loss.synthesis_main = maybe_compile(self.G.synthesis, cfg.train.compile, cfg.train.compile_mode)
        self.loss.D_main = maybe_compile(self.D, cfg.train.compile, cfg.train.compile_mode)
        self.cur_nimg = 0
        self.last_reg = {"loss/pl_penalty": 0.0, "loss/r1_penalty": 0.0}

        # The grids' fixed latents: their own generator, drawn once, nothing else consumed.
        rows = self.space.grid_rows()
        cols = cfg.train.grid_columns
        grid_gen = torch.Generator().manual_seed(cfg.seed + 7919)
        self.grid_names = [n for n, _ in rows]
        self.grid_z = torch.randn(len(rows) * cols, r.g.z_dim, generator=grid_gen).to(device)
        self.grid_c = (torch.from_numpy(np.repeat(np.stack([c for _, c in rows]), cols, axis=0)).to(device)
                       if self.space.c_dim else None)
        if info.is_main:
            run.log.text(f"G: {r.g}; D: {r.d}; loss: {r.loss}; lr {r.lr}, ema_kimg {r.ema_kimg}, "
                         f"ema_rampup {r.ema_rampup}; {self.total_steps} steps of {cfg.train.batch_size} "
                         f"({self.total_steps * cfg.train.batch_size / 1000:g} kimg)")
        return {"training_tree": {"path": str(domain.root), "layout": domain.layout, "images_in_tree": domain.n_tree,
                                  "training_images": len(domain)},
                "labels": {"kind": self.space.kind, "names": list(self.space.names)},
                "resolved": {"r1_gamma": r.loss.r1_gamma, "pl_weight": r.loss.pl_weight, "lr": r.lr,
                             "ema_kimg": r.ema_kimg, "ema_rampup": r.ema_rampup}}

    # -- what a checkpoint holds ----------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D, "G_ema": self.G_ema.module}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_G, "D": self.opt_D}

    def model_args(self) -> dict[str, dict]:
        common = {"family": MODEL_FAMILY, "label_names": list(self.space.names), "label_kind": self.space.kind,
                  "c_dim": self.space.c_dim, "input": input_contract(self.cfg)}
        return {"G": {**model_args(self.G), **common}, "D": {**model_args(self.D), **common},
                "G_ema": {**model_args(self.G_ema.module), **common, "ema_kimg": self.resolved.ema_kimg}}

    def state(self) -> dict[str, Any]:
        return {"p": float(self.p), "ada_stats": self.ada_stats.detach().cpu(), "cur_nimg": int(self.cur_nimg),
                "z_gen": self.z_gen.get_state(), "loss_gen": self.loss_gen.get_state(),
                "aug_gen": self.aug_gen.get_state(), "loss": self.loss.state(), "ema": self.G_ema.state(),
                "last_reg": {k: float(v) for k, v in self.last_reg.items()}}

    def load_state(self, extra: dict[str, Any]) -> None:
        self.p = float(extra["p"])
        self.ada_stats = extra["ada_stats"].to(self.device, torch.float64)
        self.cur_nimg = int(extra["cur_nimg"])
        self.z_gen.set_state(extra["z_gen"])
        self.loss_gen.set_state(extra["loss_gen"])
        self.aug_gen.set_state(extra["aug_gen"])
        self.loss.load_state(extra["loss"])
        self.G_ema.load_state(extra["ema"])
        self.last_reg = {k: float(v) for k, v in extra["last_reg"].items()}

    # -- the step -------------------------------------------------------------------------------

    def _latents(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's share of a global batch of z and of labels drawn from the training
        labels (the global batch is drawn on every rank alike, so N processes use the latents
        one process would)."""
        n, at = self.local_batch, self.info.rank * self.local_batch
        z = torch.randn(self.cfg.train.batch_size, self.resolved.g.z_dim, generator=self.z_gen)[at:at + n]
        idx = torch.randint(len(self.labels), (self.cfg.train.batch_size,), generator=self.z_gen)[at:at + n]
        if not self.space.c_dim:
            return z.to(self.device), None
        return z.to(self.device), self.labels.index_select(0, idx.to(self.labels.device)).to(self.device)

    def _opt_step(self, opt: torch.optim.Optimizer, net: nn.Module, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _reduce_grads(list(net.parameters()), self.info)
        opt.step()

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, r, amp = self.cfg, self.resolved, self.cfg.train.amp
        idx = torch.tensor(self.stream.indices(step)).to(self.domain.images.device)
        real = to_model_range(self.domain.images.index_select(0, idx).to(self.device))
        real_c = self.labels.index_select(0, idx).to(self.device) if self.space.c_dim else None
        z_g, c_g = self._latents()
        z_d, c_d = self._latents()
        out: dict[str, torch.Tensor] = {}

        # G main, then G reg (path length, lazy): D frozen.
        self.D.requires_grad_(False)
        self.G.requires_grad_(True)
        with autocast_context(self.device, amp):  # bf16 forward; the loss itself in float32 (StyleGAN2Loss)
            loss_g, stats = self.loss.g_main(z_g, c_g)
        self._opt_step(self.opt_G, self.G, loss_g)
        out["loss/G"], out["scores/fake_G"] = stats["loss/G"], stats["scores/fake"]
        if self.g_reg and step % r.loss.pl_interval == 0:
            loss_pl, stats = self.loss.g_reg(z_g, c_g)  # float32, eager: no autocast here
            self._opt_step(self.opt_G, self.G, loss_pl)
            self.last_reg["loss/pl_penalty"] = stats["loss/pl_penalty"]

        # D main, then D reg (R1, lazy): G frozen.
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        with autocast_context(self.device, amp):
            loss_d, stats = self.loss.d_main(real, real_c, z_d, c_d)
        self._opt_step(self.opt_D, self.D, loss_d)
        out.update({k: stats[k] for k in ("loss/D", "scores/real", "scores/fake")})
        out["ada/r_t"] = stats["scores/real_sign"]  # this step's E[sign D(x_real)]; a window's mean is r_t
        self.ada_stats += real_sign_stats(self.loss.real_logits)
        if self.d_reg and step % r.loss.r1_interval == 0:
            loss_r1, stats = self.loss.d_reg(real, real_c)  # float32, eager: no autocast here
            self._opt_step(self.opt_D, self.D, loss_r1)
            self.last_reg["loss/r1_penalty"] = stats["loss/r1_penalty"]
        self.G.requires_grad_(True)

        # ADA's p, from the reals' signs of the last `interval` minibatches of every process.
        if (step + 1) % cfg.ada.interval == 0:
            if self.info.distributed:
                dist.all_reduce(self.ada_stats)
            self.p, _ = update_p(self.p, float(self.ada_stats[0]), float(self.ada_stats[1]),
                                 cfg.train.batch_size, cfg.ada)
            self.ada_stats.zero_()

        # G_ema, with the half-life in images and its ramp-up.
        beta = ema_beta(cfg.train.batch_size, r.ema_kimg, r.ema_rampup, self.cur_nimg)
        self.G_ema.update(self.G, beta)
        self.cur_nimg += cfg.train.batch_size

        for k, v in self.last_reg.items():
            out[k] = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
        out["ada/p"] = torch.full((), self.p, device=self.device)
        out["pl_mean"] = self.loss.pl_mean.detach().float().to(self.device)
        return {k: v.detach().float() for k, v in out.items()}

    # -- logging --------------------------------------------------------------------------------

    def log_values(self, step: int, means: dict[str, float], seconds: float, steps_here: int) -> dict[str, Any]:
        kimg_here = steps_here * self.cfg.train.batch_size / 1000
        return means | {"kimg": step * self.cfg.train.batch_size / 1000, "ada/p": float(self.p),
                        "s_per_kimg": seconds / kimg_here if kimg_here > 0 else math.nan}

    def postfix(self, means: dict[str, float]) -> dict[str, str]:
        return {"G": f"{means['loss/G']:.3f}", "D": f"{means['loss/D']:.3f}", "p": f"{self.p:.3f}"}

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """G_ema's images of the fixed latents, a row of ``train.grid_columns`` per class."""
        return self.G_ema.module(self.grid_z, self.grid_c, noise_mode="const").float()

    def after_step(self, step: int, run: Run) -> None:
        every = self.cfg.train.image_every
        if every > 0 and step % every == 0 and run.info.is_main:
            images, cols = self.grid(), self.cfg.train.grid_columns
            run.log.images(step, "fakes/all", images, nrow=cols)
            for i, name in enumerate(self.grid_names):
                run.log.images(step, f"fakes/{name}", images[i * cols:(i + 1) * cols], nrow=cols)

    # -- FID snapshots (the loop's evaluation points) ------------------------------------------

    def evaluation_due(self, step: int) -> bool:
        return self.fid_interval > 0 and (step % self.fid_interval == 0 or step == self.total_steps)

    @torch.no_grad()
    def sample_fid(self, n: int) -> torch.Tensor:
        """``n`` G_ema images in [0, 1], labels drawn from the training labels; the same latents and
        labels at every snapshot (their own generator), constant noise, no truncation, so the FD
        of two snapshots differs by the weights only. Draws nothing from the training streams."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1009 + 4111)
        g, out = self.G_ema.module, []
        for at in range(0, n, FID_BATCH):
            m = min(FID_BATCH, n - at)
            z = torch.randn(m, self.resolved.g.z_dim, generator=gen).to(self.device)
            idx = torch.randint(len(self.space.c), (m,), generator=gen)
            c = torch.from_numpy(self.space.c[idx.numpy()]).to(self.device) if self.space.c_dim else None
            with autocast_context(self.device, self.cfg.train.amp):
                img = g(z, c, noise_mode="const")
            out.append(((img.float().clamp(-1, 1) + 1) / 2).cpu())
        return torch.cat(out)

    def evaluate(self, step: int, train_means: dict[str, float]) -> Evaluation:
        """A FID snapshot: the metrics function on the main process, its FD shared with the others."""
        t0, kimg = time.perf_counter(), step * self.cfg.train.batch_size / 1000
        values: dict[str, Any] = {}
        fd = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        if self.info.is_main:
            assert self.metrics_fn is not None
            values = self.metrics_fn(Snapshot(step, kimg, self.run.run_dir, self.device, self.cfg.train.fid_images,
                                              self.sample_fid))
            fd.fill_(float(values["fd"]))
            self.fid_extractor = str(values.get("extractor", ""))
        if self.info.distributed:
            dist.broadcast(fd, src=0)
        value, seconds = float(fd), time.perf_counter() - t0
        extra = {k: v for k, v in values.items() if k not in ("fd", "extractor") and isinstance(v, (int, float))}
        row = {"steps": step, "kimg": kimg, "p": float(self.p), "fd": value, "extractor": self.fid_extractor,
               "fid_images": self.cfg.train.fid_images, "seconds": round(seconds, 2), "interrupted": "",
               "checkpoint": ""}
        return Evaluation(value, higher_is_better=False,
                          scalars={"fid/fd": value, "fid/seconds": seconds, **{f"fid/{k}": v for k, v in extra.items()}},
                          row=row, message=f"FID snapshot at {kimg:g} kimg: FD {value:.4g} ({self.fid_extractor}, "
                                           f"{self.cfg.train.fid_images} images, {seconds:.1f} s)")

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"selection": f"lowest FD ({self.fid_extractor})"} if self.fid_interval else {}

    def final_row(self, result: LoopResult) -> dict[str, Any]:
        return {"steps": result.steps_done, "kimg": result.steps_done * self.cfg.train.batch_size / 1000,
                "p": float(self.p), "seconds": round(result.seconds, 2), "interrupted": result.interrupted,
                "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else ""}


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps_done: int
    kimg: float
    p: float
    interrupted: bool
    checkpoint: Path | None
    seconds: float
    best: Path | None = None  # the lowest-FD snapshot's checkpoint (FID snapshots only)
    best_fd: float | None = None
    fid_extractor: str = ""


def train(cfg: StyleGAN2Config, run_dir: str | Path, resume: bool = False,
          metrics_fn: MetricsFn | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) a StyleGAN2-ADA in ``run_dir``; see the module docstring.

    ``metrics_fn``: the FID snapshots' metrics (needed when ``train.fid_every`` or ``fid_kimg`` is
    set; :func:`eval.gan_snapshots.fid_metrics` builds the one the CLI uses)."""
    family = StyleGAN2Family(cfg, metrics_fn)
    r = run_training(cfg, run_dir, family, resume=resume)
    best = Path(run_dir) / "checkpoints" / ckpt_io.BEST
    best_fd = read_meta(best).get("metric") if family.fid_interval and ckpt_io.is_complete(best) else None
    return TrainResult(r.run_dir, r.steps_done, r.steps_done * cfg.train.batch_size / 1000, float(family.p),
                       r.interrupted, r.last_checkpoint, r.seconds, best if best_fd is not None else None,
                       None if best_fd is None else float(best_fd), family.fid_extractor)
