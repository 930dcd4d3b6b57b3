"""StyleGAN2 losses and regularizers: pure functions, and :class:`StyleGAN2Loss` for the phases.

With ``D`` returning logits and ``σ`` the logistic sigmoid (softplus(x) = log(1 + eˣ)):

- generator, non-saturating logistic:  ``L_G = E_z[softplus(−D(G(z, c), c))]``
- discriminator, logistic:             ``L_D = E_z[softplus(D(G(z, c), c))] + E_x[softplus(−D(x, c))]``
- R1 (Mescheder et al. 2018), lazy:    ``L_R1 = (γ/2) · E_x[‖∇ₓ D(x, c)‖²] · r1_interval``, every
  ``r1_interval`` D minibatches, scaled by the interval so its average weight stays γ/2
- path length (Karras et al. 2020):    ``a = ‖J_wᵀ y‖₂`` with ``y ~ N(0, I)/√(HW)``;
  ``ā ← ā + decay·(E[a] − ā)``;  ``L_pl = w_pl · E[(a − ā)²] · pl_interval``
- the ADA paper's γ heuristic:         ``γ = 0.0002 · res² / batch`` (:func:`auto_gamma`)
- generator EMA:                       ``β = 0.5^(batch / (1000 · ema_kimg))``
  (:func:`cxr.engine.ema.ema_beta`, with the ramp-up)

Lazy regularization changes the effective Adam hyper-parameters: a network whose regularizer
runs every k minibatches takes k + 1 steps per k, so its Adam uses ``lr·k/(k+1)`` and
``β^(k/(k+1))`` (:func:`lazy_adam`).

Precision: the caller may run ``g_main`` and ``d_main`` under bf16 autocast; their losses are
still computed in float32 from the logits. ``g_reg`` and ``d_reg`` turn autocast off and run in
float32 (NVlabs keep regularization in full precision: a double backward in bf16 loses the
small gradient norms R1 and path length penalise).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from cxr.engine.ema import ema_beta
from gan.stylegan2.config import LossConfig, auto_gamma

__all__ = [
    "StyleGAN2Loss", "auto_gamma", "d_logistic_loss", "ema_beta", "g_nonsaturating_loss", "lazy_adam",
    "path_lengths", "path_length_penalty", "r1_penalty",
]


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(−D(G(z))))`` = −log σ(D(G(z))): G maximises the log-probability D calls it real."""
    return F.softplus(-fake_logits).mean()


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(D(G(z)))) + mean(softplus(−D(x)))``: −log(1 − σ(D(G(z)))) − log σ(D(x))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖∇ₓ D(x)‖²`` (N,), differentiable again (``create_graph``) for D's update.

    ``real_images`` must require grad and ``real_logits`` be computed from it (through any
    augmentation: the gradient is taken with respect to the clean image).
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().flatten(1).sum(dim=1)


def path_lengths(fake_images: torch.Tensor, ws: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample ``‖J_wᵀ y‖₂`` averaged over the styles, ``y ~ N(0, I)/√(H·W)``: (N,).

    ``fake_images`` must be computed from ``ws`` (N, num_ws, w_dim); the graph is kept so the
    penalty trains G (double backward through the modulated convolutions).
    """
    h, w = fake_images.shape[-2:]
    y = torch.randn(fake_images.shape, generator=generator).to(fake_images) / math.sqrt(h * w)
    (grad,) = torch.autograd.grad((fake_images * y).sum(), ws, create_graph=True)
    return grad.square().sum(dim=2).mean(dim=1).sqrt()


def path_length_penalty(lengths: torch.Tensor, pl_mean: torch.Tensor,
                        decay: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[(a − ā')²], ā')`` with ``ā' = ā + decay·(E[a] − ā)``, the running target (detached)."""
    new_mean = pl_mean.lerp(lengths.detach().mean().to(pl_mean), decay)
    return (lengths - new_mean).square().mean(), new_mean


def lazy_adam(lr: float, betas: tuple[float, float], interval: int) -> tuple[float, tuple[float, float]]:
    """Adam's ``lr`` and ``betas`` for a network regularized every ``interval`` minibatches.

    ``k = interval / (interval + 1)``: ``lr·k`` and ``(β₁ᵏ, β₂ᵏ)`` (Karras et al. 2020, B).
    """
    if interval < 1:
        raise ValueError(f"interval must be ≥ 1, got {interval}")
    k = interval / (interval + 1)
    return lr * k, (betas[0] ** k, betas[1] ** k)


class StyleGAN2Loss:
    """The four phases of a StyleGAN2 step, each returning ``(loss, stats)`` for the loop to
    back-propagate: ``g_main``, ``g_reg`` (path length, when ``pl_weight > 0``), ``d_main`` and
    ``d_reg`` (R1). ``augment`` (default: identity) is applied to every image D sees, real
    and generated, and must be differentiable in its input (the ADA pipe). The loop decides
    when a lazy phase is due (``step % interval == 0``) and freezes the other network.

    Stats are detached 0-d tensors (no device sync; the loop averages them). After
    ``d_main``, :attr:`real_logits` holds D's detached outputs on the reals, what ADA's
    ``real_sign_stats`` reads. State to checkpoint: :meth:`state` (the path-length running mean).

    ``synthesis_main`` and ``D_main`` (default: ``G.synthesis`` and ``D``) are what the main
    phases call: the trainer sets them to ``torch.compile``d wrappers of the same modules. The
    regularizers always call the eager modules (a double backward through a compiled graph is
    not supported by ``torch.compile``'s autograd).
    """

    def __init__(self, G: nn.Module, D: nn.Module, cfg: LossConfig,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 generator: torch.Generator | None = None):
        self.G, self.D, self.cfg = G, D, cfg
        self.augment = augment
        self.generator = generator  # CPU stream for style-mixing draws and path-length noise
        self.pl_mean = torch.zeros(())
        self.real_logits: torch.Tensor | None = None
        self.synthesis_main: Callable[[torch.Tensor], torch.Tensor] = G.synthesis
        self.D_main: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = D

    def run_D(self, images: torch.Tensor, c: torch.Tensor | None, main: bool = False) -> torch.Tensor:
        if self.augment is not None:
            images = self.augment(images)
        return (self.D_main if main else self.D)(images, c)

    def run_G(self, z: torch.Tensor, c: torch.Tensor | None, update_w_avg: bool = True,
              main: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and the styles (with style mixing) that made them."""
        ws = self.G.sample_ws(z, c, self.cfg.style_mixing_prob, update_w_avg=update_w_avg, generator=self.generator)
        return (self.synthesis_main if main else self.G.synthesis)(ws), ws

    def g_main(self, z: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_G``; D's parameters should not require grad meanwhile."""
        fake, _ = self.run_G(z, c, main=True)
        logits = self.run_D(fake, c, main=True).float()
        loss = g_nonsaturating_loss(logits)
        return loss, {"loss/G": loss.detach(), "scores/fake": logits.detach().mean()}

    def g_reg(self, z: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_pl`` on a batch shrunk by ``pl_batch_shrink``, scaled by ``pl_interval``."""
        n = max(1, z.shape[0] // self.cfg.pl_batch_shrink)
        with _full_precision(z):
            return self._g_reg(z, c, n)

    def _g_reg(self, z: torch.Tensor, c: torch.Tensor | None, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fake, ws = self.run_G(z[:n], None if c is None else c[:n], update_w_avg=False)
        lengths = path_lengths(fake, ws, self.generator)
        penalty, self.pl_mean = path_length_penalty(lengths, self.pl_mean.to(lengths.device), self.cfg.pl_decay)
        loss = penalty * self.cfg.pl_weight * self.cfg.pl_interval
        return loss, {"loss/pl_penalty": penalty.detach(), "pl_mean": self.pl_mean}

    def d_main(self, real: torch.Tensor, c: torch.Tensor | None, z: torch.Tensor,
               fake_c: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_D`` on real images and fakes of labels ``fake_c`` (G run without a graph)."""
        with torch.no_grad():
            fake, _ = self.run_G(z, fake_c, update_w_avg=False, main=True)
        fake_logits = self.run_D(fake, fake_c, main=True).float()
        real_logits = self.run_D(real, c, main=True).float()
        loss = d_logistic_loss(real_logits, fake_logits)
        self.real_logits = real_logits.detach()
        return loss, {"loss/D": loss.detach(), "scores/real": self.real_logits.mean(),
                      "scores/fake": fake_logits.detach().mean(),
                      "scores/real_sign": self.real_logits.sign().mean()}  # ADA's overfitting heuristic r_t

    def d_reg(self, real: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_R1 = (γ/2)·E‖∇ₓD(x)‖²·r1_interval`` through the augmentations."""
        with _full_precision(real):
            real = real.detach().float().requires_grad_(True)
            penalty = r1_penalty(self.run_D(real, c), real)
        loss = penalty.mean() * (self.cfg.r1_gamma / 2) * self.cfg.r1_interval
        return loss, {"loss/r1_penalty": penalty.detach().mean()}

    def state(self) -> dict[str, float]:
        return {"pl_mean": float(self.pl_mean)}

    def load_state(self, state: dict[str, float]) -> None:
        self.pl_mean = torch.tensor(float(state["pl_mean"]))


def _full_precision(like: torch.Tensor) -> ContextManager:
    """Autocast off on ``like``'s device (a no-op context where autocast is not running)."""
    dev = like.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()
