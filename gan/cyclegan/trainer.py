"""CycleGAN training: a family of the engine's one loop, with the two phases of every step explicit.

Per step (Zhu et al. 2017, with the objective in :mod:`gan.cyclegan.loss`):

1. **G phase** — both discriminators frozen (``requires_grad`` off, called without DDP), both
   generators run once, ``loss_G`` (adversarial + λ·cycle + λ·μ·identity) steps Adam(G).
2. **D phase** — discriminators unfrozen, each fed real images and fakes drawn through its
   :class:`~gan.image_pool.ImagePool`; ``½(real + fake)`` steps Adam(D).

The learning rate of both optimizers is a pure function of the step (constant, then linear
decay to zero; :func:`cxr.engine.schedules.linear_decay_lr`). The loop is
:func:`cxr.engine.loop.run_training`, which with the rest of :mod:`cxr.engine` gives the run folder and ``run.json``, safetensors checkpoints holding optimizers,
image pools and every RNG (a resumed run continues the same loss trajectory),
``stats.jsonl``/TensorBoard with image grids, the NaN/Inf guard, graceful Ctrl-C, out-of-memory
messages, bf16 autocast, channels_last, ``torch.compile``, fused Adam and DDP.

The run folder also gets ``images_seen.txt``: every image the generators could have drawn (the
training split of each domain), one ``<domain>\\t<image>`` line each; no other image is read.
With ``data.prematch: histogram`` domain A is first matched to domain B's training images into
``<run>/prematched/`` and read from there (:mod:`gan.cyclegan.prematch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr.data.io import atomic_write_text
from cxr.engine.data import gpu_augment
from cxr.engine.distributed import DistInfo, wrap_ddp
from cxr.engine.ema import WeightAverage, ema_name
from cxr.engine.loop import Family, LoopResult, Run, main_first, run_training
from cxr.engine.schedules import linear_decay_lr
from cxr.engine.speed import (
    autocast_context,
    channels_last,
    cudagraphs_ddp_warning,
    fused_adam_kwargs,
    mark_step_begin,
    maybe_compile,
    to_channels_last,
    uses_cudagraphs,
)
from gan.cyclegan import prematch
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.data import Domain, DomainStream, load_domain, to_model_range
from gan.cyclegan.loss import CycleGANLoss, CycleGenerators, PairedDiscriminators
from gan.image_pool import ImagePool
from gan.networks import create_discriminator, create_generator, model_args

MODEL_FAMILY = "cyclegan"
SEEN_FILE = "images_seen.txt"
GRID_IMAGES = 4  # images per row of the logged grids


# ----------------------------------------------------------------------------------------------
# Networks and what a checkpoint records about them


def build_networks(cfg: CycleGANConfig) -> tuple[CycleGenerators, PairedDiscriminators]:
    """Both generators and both discriminators as the config describes (fresh weights)."""
    m = cfg.model
    g_kw: dict[str, Any] = {"ngf": m.ngf, "norm": m.norm, "dropout": m.dropout, "residual": m.residual}
    if m.n_blocks is not None:
        g_kw["n_blocks"] = m.n_blocks
    if m.upsample != "transpose":
        g_kw["upsample"] = m.upsample  # U-Net only: other generators refuse it in one line
    if m.winograd != "auto":
        g_kw["winograd"] = m.winograd  # ResNet only, likewise
    d_kw: dict[str, Any] = {"ndf": m.ndf, "n_layers": m.d_layers, "norm": m.d_norm or m.norm}
    size = cfg.data.size
    return (CycleGenerators(create_generator(m.generator, size, **g_kw), create_generator(m.generator, size, **g_kw)),
            PairedDiscriminators(create_discriminator(m.discriminator, size, **d_kw),
                                 create_discriminator(m.discriminator, size, **d_kw),
                                 field=cfg.loss.d_field, augment=cfg.loss.d_augment))


def check_config(cfg: CycleGANConfig) -> None:
    """Fail early, with one line, on network names or options that cannot be built.

    Builds the networks on the ``meta`` device: shapes only, no memory, no weights drawn.
    """
    with torch.device("meta"):
        build_networks(cfg)


def input_contract(cfg: CycleGANConfig) -> dict[str, Any]:
    """What a generator expects: the preprocessing to repeat before it and undo after it."""
    return {"size": cfg.data.size, "fit": cfg.data.fit, "channels": 1, "range": [-1.0, 1.0]}


def checkpoint_args(g: CycleGenerators, d: PairedDiscriminators, cfg: CycleGANConfig) -> dict[str, dict]:
    """``model_args`` per checkpoint module: network description, input contract, direction."""
    common = {"family": MODEL_FAMILY, "input": input_contract(cfg),
              "domains": {"a": cfg.data.a, "b": cfg.data.b}}
    return {
        "G_ab": {**model_args(g.g_ab), **common, "direction": "a2b"},
        "G_ba": {**model_args(g.g_ba), **common, "direction": "b2a"},
        "D_a": {**model_args(d.d_a), **common, "domain": "a"},
        "D_b": {**model_args(d.d_b), **common, "domain": "b"},
    }


def modules_of(g: CycleGenerators, d: PairedDiscriminators) -> dict[str, nn.Module]:
    return {"G_ab": g.g_ab, "G_ba": g.g_ba, "D_a": d.d_a, "D_b": d.d_b}


# ----------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps_done: int
    interrupted: bool
    checkpoint: Path | None
    seconds: float
    images_per_second: float  # generator-side images (A and B) per second over the steps run here


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _write_seen(run_dir: Path, domains: list[Domain]) -> None:
    lines = [f"{dom.name}\t{r.image}\n" for dom in domains for r in dom.records]
    atomic_write_text(run_dir / SEEN_FILE, "".join(lines))


def load_domains(cfg: CycleGANConfig, run_dir: Path, info: DistInfo, build: bool = True) -> list[Domain]:
    """Both domains' training images; ``build=False`` reads caches the main process filled."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    device = info.device if cfg.data.on_device else torch.device("cpu")
    a = prematch.domain_a(cfg, run_dir, build)  # data.a, or its histogram-matched copy (data.prematch)
    specs = (("a", a, cfg.data.layout_a, cfg.data.labels_csv_a), ("b", cfg.data.b, cfg.data.layout_b, cfg.data.labels_csv_b))
    workers = cfg.data.decode_workers if build else None
    return [load_domain(n, p, lay, cfg.data, cache_dir, device, build=build, workers=workers, labels_csv=csv)
            for n, p, lay, csv in specs]


class CycleGANSteps:
    """One process's networks, optimizers and image pools, and the two-phase training step.

    The loop in :func:`train` owns data, logging and checkpoints; this owns the maths. Usable
    alone (tests, benchmarks): ``steps = CycleGANSteps(cfg, device); steps.step(a, b, i)``.
    """

    def __init__(self, cfg: CycleGANConfig, device: torch.device | str = "cpu", info: DistInfo | None = None):
        info = info or DistInfo(device=torch.device(device))
        t = cfg.train
        self.cfg, self.device, self.info = cfg, torch.device(device), info
        # NHWC pays off with GPU convolution kernels; on CPU it measured slower (ResNet-9, 256²,
        # 2 threads: 30 s vs 22 s a step), so there it is left off whatever the config says.
        self.channels_last = t.channels_last and self.device.type == "cuda"
        g, d = build_networks(cfg)
        self.g = to_channels_last(g.to(self.device), self.channels_last)
        self.d = to_channels_last(d.to(self.device), self.channels_last)
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        fused = fused_adam_kwargs(self.device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.optim.lr, betas=betas, **fused)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.optim.lr, betas=betas, **fused)
        self.pool_a, self.pool_b = ImagePool(cfg.loss.pool_size), ImagePool(cfg.loss.pool_size)
        # The pools draw from their own generator (per rank), never from the global RNG.
        self.pool_rng = torch.Generator().manual_seed(cfg.seed * 1009 + 17 + info.rank)
        # The discriminators' augmentation too (loss.d_augment), on the training device.
        self.aug_rng = torch.Generator(self.device).manual_seed(cfg.seed * 1013 + 29 + info.rank)
        self.g_step = maybe_compile(wrap_ddp(self.g, info), t.compile, t.compile_mode)
        self.d_step = maybe_compile(wrap_ddp(self.d, info), t.compile, t.compile_mode)
        # The G phase calls D without its DDP wrapper: D is frozen there and has nothing to reduce.
        self.d_frozen = maybe_compile(self.d, t.compile, t.compile_mode) if info.distributed else self.d_step
        self.cudagraphs = uses_cudagraphs(t.compile, t.compile_mode, self.device)
        self.loss = CycleGANLoss(cfg.loss.gan_mode, cfg.loss.lambda_cycle, cfg.loss.lambda_identity,
                                 cfg.loss.lambda_structure, cfg.loss.lambda_border, cfg.loss.d_field)
        self.amp = t.amp
        # train.ema > 0: an EMA copy of each generator, checkpointed as G_ab_ema / G_ba_ema;
        # `cxr translate` applies it when present. It never feeds back into training.
        self.generators = {"G_ab": self.g.g_ab, "G_ba": self.g.g_ba}
        self.ema = {n: WeightAverage(net, t.ema) for n, net in self.generators.items()} if t.ema > 0 else {}

    # -- state a checkpoint holds ---------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        return modules_of(self.g, self.d) | {ema_name(n): avg.module for n, avg in self.ema.items()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_g, "D": self.opt_d}

    def model_args(self) -> dict[str, dict]:
        args = checkpoint_args(self.g, self.d, self.cfg)
        return args | {ema_name(n): {**args[n], "ema_decay": avg.decay} for n, avg in self.ema.items()}

    def extra_state(self) -> dict[str, Any]:
        return {"pool_a": self.pool_a.state_dict(), "pool_b": self.pool_b.state_dict(),
                "pool_rng": self.pool_rng.get_state(), "aug_rng": self.aug_rng.get_state(),
                "ema": {n: avg.state() for n, avg in self.ema.items()}}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.pool_a.load_state_dict(extra["pool_a"], self.device)
        self.pool_b.load_state_dict(extra["pool_b"], self.device)
        self.pool_rng.set_state(extra["pool_rng"])
        if "aug_rng" in extra:  # absent from checkpoints written before loss.d_augment existed
            self.aug_rng.set_state(extra["aug_rng"])
        for n, avg in self.ema.items():
            avg.load_state(extra["ema"][n])

    # -- the step -------------------------------------------------------------------------------

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor, step: int
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One optimizer step of G then D on [-1, 1] batches; returns (losses, images shown).

        The images shown are valid until the next call (CUDA graphs replay into the same memory).
        """
        cfg = self.cfg
        mark_step_begin(self.cudagraphs)
        real_a = channels_last(real_a.to(self.device), self.channels_last)
        real_b = channels_last(real_b.to(self.device), self.channels_last)
        lr = linear_decay_lr(cfg.optim.lr, step, cfg.train.steps, cfg.optim.decay_steps)
        set_lr(self.opt_g, lr)
        set_lr(self.opt_d, lr)

        # Phase 1: generators. D is frozen so G's backward leaves no gradient in it.
        self.d.requires_grad_(False)
        with autocast_context(self.device, self.amp):
            out = self.g_step(real_a, real_b, identity=self.loss.uses_identity)
            losses = self.loss.generator(real_a, real_b, out, self.d_frozen, self.aug_rng)
        self.opt_g.zero_grad(set_to_none=True)
        losses["loss_G"].backward()
        self.opt_g.step()
        for n, avg in self.ema.items():
            avg.update(self.generators[n])

        # Phase 2: discriminators, on real images and fakes drawn through the history pools.
        self.d.requires_grad_(True)
        fake_a = self.pool_a.query(out["fake_a"].detach().float(), self.pool_rng)
        fake_b = self.pool_b.query(out["fake_b"].detach().float(), self.pool_rng)
        with autocast_context(self.device, self.amp):
            losses.update(self.loss.discriminator(real_a, real_b, fake_a, fake_b, self.d_step, self.aug_rng))
        self.opt_d.zero_grad(set_to_none=True)
        losses["loss_D"].backward()
        self.opt_d.step()

        shown = {"real_a": real_a, "real_b": real_b, **{k: v.detach() for k, v in out.items()}}
        losses = {k: v.detach().float() for k, v in losses.items()}
        losses["lr"] = torch.full((), lr, device=self.device)  # a fill kernel: no host-to-GPU copy, no sync
        return losses, shown


class CycleGANFamily(Family):
    """The CycleGAN on :func:`cxr.engine.loop.run_training`: data streams, :class:`CycleGANSteps`
    for the maths, image grids; no evaluation points (the paired scores come after training).
    CUT's family (:mod:`gan.cut.trainer`) is this one with its own checks, steps and grids."""

    name = MODEL_FAMILY
    check = staticmethod(check_config)
    steps_class: type = CycleGANSteps

    def __init__(self, cfg: CycleGANConfig):
        t = cfg.train
        self.cfg = cfg
        self.total_steps, self.log_every, self.ckpt_every = t.steps, t.log_every, t.ckpt_every
        self.batch_size, self.image_size = t.batch_size, cfg.data.size
        self.images_per_step = 2 * t.batch_size

    def setup(self, run: Run) -> dict[str, Any]:
        cfg, info, device = self.cfg, run.info, run.device
        self.check(cfg)
        self.run = run
        dom_a, dom_b = main_first(info, lambda build: load_domains(cfg, run.run_dir, info, build))
        if info.is_main:
            _write_seen(run.run_dir, [dom_a, dom_b])
            for d in (dom_a, dom_b):
                run.log.text(f"domain {d.name}: {d.root} ({d.layout}), {len(d)} of {d.n_tree} images used for training")
                for p in d.problems:
                    run.log.text(f"skipped: {p}")
        self.streams = (DomainStream(dom_a, cfg.train.batch_size, info, seed=cfg.seed),
                        DomainStream(dom_b, cfg.train.batch_size, info, seed=cfg.seed + 1))
        self.augment = gpu_augment().to(device) if cfg.data.augment else None
        self.steps = self.steps_class(cfg, device, info)
        self.prematch = prematch.contract(cfg, run.run_dir)  # recorded for `cxr translate`
        if (note := cudagraphs_ddp_warning(self.steps.cudagraphs, info.world_size)) is not None:
            run.say(note)
        return {"domains": {d.name: {"path": str(d.root), "layout": d.layout, "images_in_tree": d.n_tree,
                                     "training_images": len(d)} for d in (dom_a, dom_b)}}

    def modules(self) -> dict[str, nn.Module]:
        return self.steps.modules()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.steps.optimizers()

    def model_args(self) -> dict[str, dict]:
        return prematch.with_contract(self.steps.model_args(), self.prematch)

    def state(self) -> dict[str, Any]:
        return self.steps.extra_state()

    def load_state(self, extra: dict[str, Any]) -> None:
        self.steps.load_extra_state(extra)

    def _batch(self, stream: DomainStream, step: int) -> torch.Tensor:
        images = stream.batch(step).to(self.run.device, non_blocking=True).float()
        return to_model_range(self.augment(images) if self.augment is not None else images)

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        stream_a, stream_b = self.streams
        losses, self.shown = self.steps.step(self._batch(stream_a, step), self._batch(stream_b, step), step)
        return losses

    def log_values(self, step: int, means: dict[str, float], seconds: float, steps_here: int) -> dict[str, Any]:
        return means | {"images_per_s": self.images_per_step * steps_here / max(seconds, 1e-9)}

    def postfix(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss_G": f"{means['loss_G']:.3f}", "loss_D": f"{means['loss_D']:.3f}"}

    def after_step(self, step: int, run: Run) -> None:
        every = self.cfg.train.image_every
        if every > 0 and step % every == 0 and run.info.is_main:
            shown = self.shown
            k = min(GRID_IMAGES, shown["real_a"].shape[0])
            run.log.images(step, "a2b/real_fake_rec", torch.cat([shown[n][:k] for n in ("real_a", "fake_b", "rec_a")]), nrow=k)
            run.log.images(step, "b2a/real_fake_rec", torch.cat([shown[n][:k] for n in ("real_b", "fake_a", "rec_b")]), nrow=k)

    def final_row(self, result: LoopResult) -> dict[str, Any]:
        return {"steps": result.steps_done, "seconds": round(result.seconds, 2), "interrupted": result.interrupted,
                "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else ""}


def train(cfg: CycleGANConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train (or, with ``resume``, continue) a CycleGAN in ``run_dir``; see the module docstring."""
    return train_family(CycleGANFamily(cfg), run_dir, resume)


def train_family(family: CycleGANFamily, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Run ``family`` (the CycleGAN's or CUT's) in ``run_dir`` and sum it up, images a second included."""
    r = run_training(family.cfg, run_dir, family, resume=resume)
    steps_here = r.steps_done - r.start_step
    rate = family.images_per_step * steps_here / r.seconds if r.seconds > 0 and steps_here > 0 else math.nan
    return TrainResult(r.run_dir, r.steps_done, r.interrupted, r.last_checkpoint, r.seconds, rate)
