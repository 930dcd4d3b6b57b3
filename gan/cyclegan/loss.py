"""The CycleGAN objective (Zhu et al. 2017, eq. 3 and section 5.2), as one loss object.

Networks: G_AB: A → B, G_BA: B → A; D_A tells real A from G_BA(b), D_B real B from G_AB(a).
With ``L_gan`` the chosen adversarial loss (:class:`gan.losses.GANLoss`)::

    L_G = L_gan(D_B(G_AB(a)) → real) + L_gan(D_A(G_BA(b)) → real)                  adversarial
        + λ   (‖G_BA(G_AB(a)) − a‖₁ + ‖G_AB(G_BA(b)) − b‖₁)                          cycle
        + λ·μ (‖G_AB(b) − b‖₁ + ‖G_BA(a) − a‖₁)                                      identity
    L_D_B = ½ (L_gan(D_B(b) → real) + L_gan(D_B(pool_B(G_AB(a))) → fake))
    L_D_A = ½ (L_gan(D_A(a) → real) + L_gan(D_A(pool_A(G_BA(b))) → fake))

      [+ λ_s (2 − cs(a, G_AB(a)) − cs(b, G_BA(b)))                                  structure, off by default]
      [+ λ_o (‖(G_AB(a) − a)·m‖₁ + ‖(G_BA(b) − b)·m‖₁)                               border tie, off by default]

λ = ``lambda_cycle`` (10), μ = ``lambda_identity`` (0.5); ‖·‖₁ is the mean absolute error; cs is
SSIM's mean contrast-structure term (:func:`contrast_structure`) and λ_s = ``lambda_structure``, a
structure-preserving term in the spirit of structure-constrained CycleGANs for medical images
(Yang et al. 2018 used MIND features; here SSIM's own contrast-structure term). λ_o =
``lambda_border`` ties each translation to its input outside the discriminators' field (``m``:
1 outside the central ``d_field`` of each side, the mean taken over the whole image), where no
discriminator judges it and nothing else would say what to do there. The
identity term keeps a translator from shifting gray levels of images already in its target
domain (the paper's Monet → photo tint). The ½ halves D's learning rate relative to G.

Both generators run inside one module call (:class:`CycleGenerators`) and both
discriminators inside another (:class:`PairedDiscriminators`), so that DistributedDataParallel
sees exactly one forward per backward for each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxr.data.preprocess import centre_box
from cxr.metrics.ssim import contrast_structure_map
from gan.losses import GANLoss


class CycleGenerators(nn.Module):
    """G_AB and G_BA; ``forward`` runs every generator pass one training step needs."""

    def __init__(self, g_ab: nn.Module, g_ba: nn.Module):
        super().__init__()
        self.g_ab = g_ab
        self.g_ba = g_ba

    def forward(self, real_a: torch.Tensor, real_b: torch.Tensor, identity: bool = True) -> dict[str, torch.Tensor]:
        fake_b = self.g_ab(real_a)
        fake_a = self.g_ba(real_b)
        out = {"fake_b": fake_b, "rec_a": self.g_ba(fake_b), "fake_a": fake_a, "rec_b": self.g_ab(fake_a)}
        if identity:
            out["idt_b"] = self.g_ab(real_b)  # G_AB applied to what is already B
            out["idt_a"] = self.g_ba(real_a)
        return out


def border_mask(h: int, w: int, fraction: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, h, w) float mask: 1 outside the central ``fraction`` of each side, 0 inside."""
    top, left, ch, cw = centre_box(h, w, fraction)
    mask = torch.ones(1, 1, h, w, device=device)
    mask[..., top:top + ch, left:left + cw] = 0.0
    return mask


def centre_crop(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The central ``fraction`` of each side of an (N, C, H, W) batch (all of it at 1.0)."""
    if fraction >= 1.0:
        return x
    top, left, ch, cw = centre_box(*x.shape[-2:], fraction)
    return x[..., top:top + ch, left:left + cw]


def random_framing(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Each image of an (N, C, H, W) batch zoomed by a factor in ``1 ± strength`` and shifted by
    up to ``strength`` of its side, independently, edges repeated; differentiable in ``x``.

    Shown to a discriminator on real and fake images alike (as DiffAugment does with
    translations), it hides where anatomy sits in the frame and how large it is: two sites
    that frame their exposures differently then cannot be told apart by framing, which a
    translator could only "fix" by painting anatomy where the other site has it.
    """
    n = x.shape[0]
    u = torch.rand(n, 3, generator=generator, device=generator.device) * 2 - 1
    theta = torch.zeros(n, 2, 3, dtype=torch.float32, device=generator.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 + strength * u[:, 0]
    theta[:, :, 2] = 2.0 * strength * u[:, 1:]  # normalised coordinates span 2 per side
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


class PairedDiscriminators(nn.Module):
    """D_A and D_B; ``forward(x_a, x_b)`` → (D_A(x_a), D_B(x_b)).

    With ``field < 1`` both judge only the central ``field`` of each side, real and fake alike:
    collimation borders and burnt-in side markers, which belong to one site's exposures and
    which the other site never shows, then play no part in the adversarial game, and the
    cycle and identity losses alone decide what happens to them. With ``augment > 0`` every
    image is first re-framed at random (:func:`random_framing`, drawn from the ``generator``
    the caller passes), so that neither discriminator can judge framing.
    """

    def __init__(self, d_a: nn.Module, d_b: nn.Module, field: float = 1.0, augment: float = 0.0):
        super().__init__()
        if not 0.0 < field <= 1.0:
            raise ValueError(f"discriminator field must be in (0, 1], got {field}")
        if not 0.0 <= augment < 0.5:
            raise ValueError(f"discriminator augmentation strength must be in [0, 0.5), got {augment}")
        self.d_a = d_a
        self.d_b = d_b
        self.field = field
        self.augment = augment

    def _view(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.augment > 0:
            if generator is None:
                raise ValueError("discriminator augmentation needs a torch.Generator")
            x = random_framing(x, self.augment, generator)
        return centre_crop(x, self.field)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d_a(self._view(x_a, generator)), self.d_b(self._view(x_b, generator))


def contrast_structure(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM without its luminance term (the "cs" of multi-scale SSIM) at every pixel:
    ``(2 σ_xy + C2) / (σ_x² + σ_y² + C2)`` in SSIM's Gaussian window
    (:func:`cxr.metrics.ssim.contrast_structure_map`, fp32 even under autocast); (N, C, H, W) in
    [-1, 1] → same shape, in [-1, 1]. Blind to local
    brightness, so it asks a translator to keep where edges and textures are while leaving gray
    levels free; unlike the correlation alone it also charges for flattening a textured region
    into a uniform one."""
    return contrast_structure_map(x, y, value_range=2.0)


class CycleGANLoss:
    """Computes the generator and discriminator objectives; every term comes back in a dict."""

    def __init__(self, gan_mode: str = "lsgan", lambda_cycle: float = 10.0, lambda_identity: float = 0.5,
                 lambda_structure: float = 0.0, lambda_border: float = 0.0, field: float = 1.0):
        self.gan = GANLoss(gan_mode)
        if lambda_border > 0 and field >= 1.0:
            raise ValueError("a border tie needs a discriminator field < 1 (there is no border otherwise)")
        self.lambda_border = lambda_border
        self.field = field
        self.lambda_cycle = lambda_cycle
        self.lambda_identity = lambda_identity
        self.lambda_structure = lambda_structure

    @property
    def uses_identity(self) -> bool:
        return self.lambda_identity > 0

    def generator(self, real_a: torch.Tensor, real_b: torch.Tensor, out: dict[str, torch.Tensor],
                  discriminators: PairedDiscriminators, rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``loss_G`` and its parts; ``out`` is :class:`CycleGenerators` output.

        ``discriminators`` is the plain module (not the DDP wrapper) with gradients switched
        off: G's step must not accumulate gradients into D. ``rng`` draws their augmentation.
        """
        score_a, score_b = discriminators(out["fake_a"], out["fake_b"], generator=rng)
        losses = {
            "adv_ab": self.gan(score_b, True, for_discriminator=False),
            "adv_ba": self.gan(score_a, True, for_discriminator=False),
            "cycle_a": F.l1_loss(out["rec_a"].float(), real_a.float()),
            "cycle_b": F.l1_loss(out["rec_b"].float(), real_b.float()),
        }
        total = losses["adv_ab"] + losses["adv_ba"] + self.lambda_cycle * (losses["cycle_a"] + losses["cycle_b"])
        if self.uses_identity:
            losses["idt_a"] = F.l1_loss(out["idt_a"].float(), real_a.float())
            losses["idt_b"] = F.l1_loss(out["idt_b"].float(), real_b.float())
            total = total + self.lambda_cycle * self.lambda_identity * (losses["idt_a"] + losses["idt_b"])
        if self.lambda_structure > 0:
            losses["struct_ab"] = 1.0 - contrast_structure(real_a, out["fake_b"]).mean()
            losses["struct_ba"] = 1.0 - contrast_structure(real_b, out["fake_a"]).mean()
            total = total + self.lambda_structure * (losses["struct_ab"] + losses["struct_ba"])
        if self.lambda_border > 0:
            mask = border_mask(*real_a.shape[-2:], self.field, real_a.device)
            for key, fake, real in (("border_ab", out["fake_b"], real_a), ("border_ba", out["fake_a"], real_b)):
                losses[key] = ((fake.float() - real.float()).abs() * mask).mean()
            total = total + self.lambda_border * (losses["border_ab"] + losses["border_ba"])
        losses["loss_G"] = total
        return losses

    def discriminator(self, real_a: torch.Tensor, real_b: torch.Tensor, fake_a: torch.Tensor,
                      fake_b: torch.Tensor, discriminators: nn.Module,
                      rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``loss_D`` (= ``loss_D_a + loss_D_b``) on real images and pooled, detached fakes.

        Real and fake images go through each discriminator in one batch; with instance norm
        (each image normalized alone) that is the same as two separate calls.
        """
        n_a, n_b = real_a.shape[0], real_b.shape[0]
        score_a, score_b = discriminators(torch.cat([real_a, fake_a.detach()]),
                                          torch.cat([real_b, fake_b.detach()]), generator=rng)
        loss_a = 0.5 * (self.gan(score_a[:n_a], True) + self.gan(score_a[n_a:], False))
        loss_b = 0.5 * (self.gan(score_b[:n_b], True) + self.gan(score_b[n_b:], False))
        return {"loss_D_a": loss_a, "loss_D_b": loss_b, "loss_D": loss_a + loss_b}
