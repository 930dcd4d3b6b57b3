"""CUT / FastCUT training (Park et al. 2020): a family of the engine's one loop.

One generator G: A → B (checkpoint module ``G_ab``, so everything that applies a CycleGAN's
``a2b`` generator applies it too), one discriminator D_B (``D_b``) and the PatchNCE heads H
(``H``; :mod:`gan.cut.nce`). Per step:

1. **G phase** — D frozen. G runs once on the batch of A images (CUT: A and B images in one
   batch, which instance norm keeps independent), its tapped encoder layers kept as the
   PatchNCE keys; the encoder runs once more on the outputs for the queries. Then::

       L_G = λ_GAN · L_gan(D_B(G(a)) → real) + λ_NCE · NCE_X                     FastCUT
       L_G = λ_GAN · L_gan(D_B(G(a)) → real) + λ_NCE · ½ (NCE_X + NCE_Y)          CUT

   with NCE_X = PatchNCE(a, G(a)) and NCE_Y = PatchNCE(b, G(b)) (the identity term, as the
   reference implementation weighs it); one Adam steps G and H together.
2. **D phase** — ``½ (L_gan(D_B(b) → real) + L_gan(D_B(G(a)) → fake))`` steps Adam(D). There is
   no image pool (the paper uses none).

The keys come from G's own forward pass on the real images rather than a second encoder
pass: the same values, as they carry no gradient, for less work. Patch locations are drawn
from a private generator that the checkpoint holds, so a resumed run continues the same loss
trajectory. Data, the learning-rate schedule, run folder, checkpoints, resume, DDP, guards,
logging and image grids are the CycleGAN's (:mod:`gan.cyclegan.trainer`, :mod:`cxr.engine.loop`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cxr.configs import resolve_config
from cxr.engine.config import load_config
from cxr.engine.distributed import DistInfo, wrap_ddp
from cxr.engine.ema import WeightAverage, ema_name
from cxr.engine.loop import Run
from cxr.engine.schedules import linear_decay_lr
from cxr.engine.speed import (
    autocast_context,
    channels_last,
    fused_adam_kwargs,
    mark_step_begin,
    maybe_compile,
    to_channels_last,
    uses_cudagraphs,
)
from cxr.errors import ConfigError
from gan.cut.config import CUTConfig
from gan.cut.nce import PatchHeads, multilayer_patch_nce, sample_locations
from gan.cyclegan.trainer import (
    GRID_IMAGES,
    CycleGANFamily,
    TrainResult,
    input_contract,
    set_lr,
    train_family,
)
from gan.losses import GANLoss
from gan.networks import create_discriminator, create_generator, model_args
from gan.networks.layers import check_divisible, residual_output

MODEL_FAMILY = "cut"
DEFAULT_CONFIG = "cut_nlm"  # a shipped config (cxr.configs)


# ----------------------------------------------------------------------------------------------
# The generator's encoder layers


def encoder_depth(generator: nn.Module) -> int:
    """Layers of a ResNet generator before its decoder (the first transposed convolution)."""
    for i, layer in enumerate(generator.net):
        if isinstance(layer, nn.ConvTranspose2d):
            return i
    return len(generator.net)


def tap_channels(generator: nn.Module, layers: Sequence[int]) -> list[int]:
    """Channels of the output of the first k layers, for each k of ``layers`` (0: the input)."""
    channels, out = generator.config.in_channels, []
    for i, layer in enumerate(generator.net, start=1):
        if i > max(layers):
            break
        channels = getattr(layer, "out_channels", channels)  # norms, activations and blocks keep them
        if i in layers:
            out.append(channels)
    return ([generator.config.in_channels] if 0 in layers else []) + out


def run_layers(generator: nn.Module, x: torch.Tensor, layers: Sequence[int], full: bool = True
               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """G(x) (or, with ``full=False``, only as far as the deepest tapped layer) and the outputs of
    its first k layers for each k of ``layers``; the same arithmetic as ``generator(x)``."""
    check_divisible(x, 4, "the ResNet generator")
    taps = set(layers)
    feats = [x] if 0 in taps else []
    h = x
    depth = len(generator.net) if full else max(layers)
    for i, layer in enumerate(generator.net, start=1):
        if i > depth:
            break
        h = layer(h)
        if i in taps:
            feats.append(h)
    if not full:
        return None, feats
    return (residual_output(x, h) if generator.config.residual else h), feats


class CUTNetworks(nn.Module):
    """G and the heads H in one module: ``forward`` runs every generator pass a step needs and
    returns the translations and the PatchNCE terms, so DDP sees one forward per backward."""

    def __init__(self, g: nn.Module, heads: PatchHeads, layers: Sequence[int], num_patches: int,
                 temperature: float):
        super().__init__()
        self.g = g
        self.heads = heads
        self.layers = tuple(layers)
        self.num_patches = num_patches
        self.temperature = temperature

    def forward(self, real_a: torch.Tensor, real_b: torch.Tensor | None,
                rng: torch.Generator) -> dict[str, torch.Tensor]:
        """``fake_b`` and ``nce_x``; with ``real_b`` (CUT) also ``idt_b`` = G(b) and ``nce_y``."""
        n = real_a.shape[0]
        x = real_a if real_b is None else torch.cat([real_a, real_b])
        out, key_maps = run_layers(self.g, x, self.layers, full=True)
        _, query_maps = run_layers(self.g, out, self.layers, full=False)
        locations = sample_locations([tuple(f.shape[-2:]) for f in key_maps], self.num_patches, rng)
        queries = self.heads(query_maps, locations)
        with torch.no_grad():  # keys say what to match; they get no gradient
            keys = self.heads([f.detach() for f in key_maps], locations)
        result = {"fake_b": out[:n],
                  "nce_x": multilayer_patch_nce([q[:n] for q in queries], [k[:n] for k in keys], self.temperature)}
        if real_b is not None:
            result["idt_b"] = out[n:]
            result["nce_y"] = multilayer_patch_nce([q[n:] for q in queries], [k[n:] for k in keys], self.temperature)
        return result


# ----------------------------------------------------------------------------------------------
# Networks and what a checkpoint records about them


def build_networks(cfg: CUTConfig) -> tuple[CUTNetworks, nn.Module]:
    """G with its heads, and D_B, as the config describes (fresh weights); bad options: one line."""
    m = cfg.model
    g_kw: dict[str, Any] = {"ngf": m.ngf, "norm": m.norm, "dropout": m.dropout, "residual": m.residual}
    if m.n_blocks is not None:
        g_kw["n_blocks"] = m.n_blocks
    if m.winograd != "auto":
        g_kw["winograd"] = m.winograd
    g = create_generator(m.generator, cfg.data.size, **g_kw)
    depth = encoder_depth(g)
    if max(m.nce_layers) > depth:
        raise ConfigError(f"config key 'model.nce_layers': {max(m.nce_layers)} is past the encoder of "
                          f"{m.generator} with {g.config.n_blocks} blocks (layers 0..{depth})")
    heads = PatchHeads(tap_channels(g, m.nce_layers), m.head_channels)
    d = create_discriminator(m.discriminator, cfg.data.size, ndf=m.ndf, n_layers=m.d_layers, norm=m.d_norm or m.norm)
    return CUTNetworks(g, heads, m.nce_layers, cfg.loss.num_patches, cfg.loss.temperature), d


def check_config(cfg: CUTConfig) -> None:
    """Fail early, with one line, on options that cannot be built (shapes only, on ``meta``)."""
    with torch.device("meta"):
        build_networks(cfg)


def checkpoint_args(nets: CUTNetworks, d: nn.Module, cfg: CUTConfig) -> dict[str, dict]:
    """``model_args`` per checkpoint module: network description, input contract, mode."""
    common = {"family": MODEL_FAMILY, "mode": cfg.model.mode, "input": input_contract(cfg),
              "domains": {"a": cfg.data.a, "b": cfg.data.b}}
    heads = {"kind": "heads", "channels": list(nets.heads.channels), "width": nets.heads.width,
             "layers": list(nets.layers)}
    return {"G_ab": {**model_args(nets.g), **common, "direction": "a2b"},
            "D_b": {**model_args(d), **common, "domain": "b"},
            "H": {**heads, **common}}


class CUTSteps:
    """One process's networks and optimizers, and the two-phase training step.

    Usable alone (tests, benchmarks): ``steps = CUTSteps(cfg, device); steps.step(a, b, i)``.
    """

    def __init__(self, cfg: CUTConfig, device: torch.device | str = "cpu", info: DistInfo | None = None):
        info = info or DistInfo(device=torch.device(device))
        t = cfg.train
        self.cfg, self.device, self.info = cfg, torch.device(device), info
        self.channels_last = t.channels_last and self.device.type == "cuda"  # slower on CPU (see the CycleGAN)
        nets, d = build_networks(cfg)
        self.nets = to_channels_last(nets.to(self.device), self.channels_last)
        self.d = to_channels_last(d.to(self.device), self.channels_last)
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        fused = fused_adam_kwargs(self.device)
        self.opt_g = torch.optim.Adam(self.nets.parameters(), lr=cfg.optim.lr, betas=betas, **fused)  # G and H
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.optim.lr, betas=betas, **fused)
        # PatchNCE's locations come from their own generator (on the device), never the global RNG;
        # the same on every rank, so W processes draw what one process with the whole batch draws.
        self.patch_rng = torch.Generator(self.device).manual_seed(cfg.seed * 1019 + 31)
        self.g_step = maybe_compile(wrap_ddp(self.nets, info), t.compile, t.compile_mode)
        self.d_step = maybe_compile(wrap_ddp(self.d, info), t.compile, t.compile_mode)
        self.d_frozen = maybe_compile(self.d, t.compile, t.compile_mode) if info.distributed else self.d_step
        self.cudagraphs = uses_cudagraphs(t.compile, t.compile_mode, self.device)
        self.gan = GANLoss(cfg.loss.gan_mode)
        self.lambda_gan, self.lambda_nce, self.identity = cfg.loss.lambda_gan, cfg.lambda_nce, cfg.nce_identity
        self.amp = t.amp
        self.ema = {"G_ab": WeightAverage(self.nets.g, t.ema)} if t.ema > 0 else {}

    # -- state a checkpoint holds ---------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        return ({"G_ab": self.nets.g, "D_b": self.d, "H": self.nets.heads}
                | {ema_name(n): avg.module for n, avg in self.ema.items()})

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_g, "D": self.opt_d}

    def model_args(self) -> dict[str, dict]:
        args = checkpoint_args(self.nets, self.d, self.cfg)
        return args | {ema_name(n): {**args[n], "ema_decay": avg.decay} for n, avg in self.ema.items()}

    def extra_state(self) -> dict[str, Any]:
        return {"patch_rng": self.patch_rng.get_state(), "ema": {n: avg.state() for n, avg in self.ema.items()}}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.patch_rng.set_state(extra["patch_rng"])
        for n, avg in self.ema.items():
            avg.load_state(extra["ema"][n])

    # -- the step -------------------------------------------------------------------------------

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor, step: int
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One optimizer step of G (and H) then D on [-1, 1] batches; returns (losses, images shown)."""
        cfg = self.cfg
        mark_step_begin(self.cudagraphs)
        real_a = channels_last(real_a.to(self.device), self.channels_last)
        real_b = channels_last(real_b.to(self.device), self.channels_last)
        lr = linear_decay_lr(cfg.optim.lr, step, cfg.train.steps, cfg.optim.decay_steps)
        set_lr(self.opt_g, lr)
        set_lr(self.opt_d, lr)

        # Phase 1: generator and heads, D frozen so G's backward leaves no gradient in it.
        self.d.requires_grad_(False)
        with autocast_context(self.device, self.amp):
            out = self.g_step(real_a, real_b if self.identity else None, self.patch_rng)
            losses = {"adv": self.gan(self.d_frozen(out["fake_b"]), True, for_discriminator=False),
                      "nce_x": out["nce_x"]}
            nce = out["nce_x"]
            if self.identity:
                losses["nce_y"] = out["nce_y"]
                nce = 0.5 * (out["nce_x"] + out["nce_y"])
            losses["loss_G"] = self.lambda_gan * losses["adv"] + self.lambda_nce * nce
        self.opt_g.zero_grad(set_to_none=True)
        losses["loss_G"].backward()
        self.opt_g.step()
        for avg in self.ema.values():
            avg.update(self.nets.g)

        # Phase 2: the discriminator, on real B and the (detached) translations.
        self.d.requires_grad_(True)
        n = real_b.shape[0]
        with autocast_context(self.device, self.amp):
            scores = self.d_step(torch.cat([real_b, out["fake_b"].detach()]))
            losses["loss_D"] = 0.5 * (self.gan(scores[:n], True) + self.gan(scores[n:], False))
        self.opt_d.zero_grad(set_to_none=True)
        losses["loss_D"].backward()
        self.opt_d.step()

        shown = {"real_a": real_a, "real_b": real_b, **{k: out[k].detach() for k in ("fake_b", "idt_b") if k in out}}
        losses = {k: v.detach().float() for k, v in losses.items()}
        losses["lr"] = torch.full((), lr, device=self.device)
        return losses, shown


# ----------------------------------------------------------------------------------------------
# The run


class CUTFamily(CycleGANFamily):
    """CUT / FastCUT on :func:`cxr.engine.loop.run_training`: the CycleGAN's family (data streams,
    checkpoints, logging) with :class:`CUTSteps` for the maths and CUT's own grids; no evaluation points."""

    name = MODEL_FAMILY
    check = staticmethod(check_config)
    steps_class = CUTSteps

    def setup(self, run: Run) -> dict[str, Any]:
        return {"mode": self.cfg.model.mode, **super().setup(run)}

    def postfix(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss_G": f"{means['loss_G']:.3f}", "nce_x": f"{means['nce_x']:.3f}", "loss_D": f"{means['loss_D']:.3f}"}

    def after_step(self, step: int, run: Run) -> None:
        every = self.cfg.train.image_every
        if every > 0 and step % every == 0 and run.info.is_main:
            shown = self.shown
            k = min(GRID_IMAGES, shown["real_a"].shape[0])
            run.log.images(step, "a2b/real_fake", torch.cat([shown[n][:k] for n in ("real_a", "fake_b")]), nrow=k)
            if "idt_b" in shown:
                run.log.images(step, "b2b/real_idt", torch.cat([shown[n][:k] for n in ("real_b", "idt_b")]), nrow=k)


def train(cfg: CUTConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train (or, with ``resume``, continue) CUT or FastCUT in ``run_dir``; see the module docstring."""
    return train_family(CUTFamily(cfg), run_dir, resume)


def train_cut(a: str | Path, b: str | Path, run_dir: str | Path, overrides: Sequence[str] = (),
              config: str | Path = DEFAULT_CONFIG, resume: bool = False) -> TrainResult:
    """Train CUT or FastCUT from tree ``a`` to tree ``b`` into ``run_dir``: the library face of
    ``cxr train-gan cut --config CONFIG data.a=A data.b=B OVERRIDES``.

    ``config``: a shipped config's name (``cut_nlm``, ``fastcut_nlm``, ``cut_tiny``) or a YAML
    file; ``overrides``: ``key=value`` strings (``model.mode=fastcut``, ``train.steps=500``).
    Translate with it afterwards: :func:`gan.cyclegan.translate.translate_run`.
    """
    cfg = load_config(CUTConfig, resolve_config(config), [f"data.a={a}", f"data.b={b}", *overrides])
    check_config(cfg)
    return train(cfg, run_dir, resume=resume)
