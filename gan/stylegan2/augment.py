"""Augmentations for the discriminator: ADA (Karras et al., NeurIPS 2020) and DiffAugment (Zhao et al. 2020).

Every image the discriminator sees, real or generated, passes through the same pipe, and the
pipe is differentiable in its input: the generator's gradient and the R1 penalty's double
backward both go through it. A small dataset stops being memorised by D because D never sees the
same image twice, and the generator does not learn the augmentations because with p < 1 they are
*non-leaking*: the augmented distribution still determines the clean one.

ADA pipe, for images ``x`` in [-1, 1] of shape ``[N, C, H, W]`` (one channel for chest X-rays).
Each augmentation is applied to each image independently with probability ``p``, its parameters
drawn per image from the ``torch.Generator`` passed in (never the global RNG, so a resumed run
restores the stream). Geometric ones are composed into one affine map, in pixel units about the
image centre, and applied by one bilinear ``grid_sample`` with reflection padding::

    G = T(t) · R(θ) · A(a, φ) · S(s) · Q(k) · F(f)          content moves by G
    out(q) = x(G⁻¹ q)                                        one resample

    F(f)      x-flip, f = −1                                 off by default (the heart has a side)
    Q(k)      rotation by k·90°, k ∈ {0, 1, 2, 3}            off by default
    S(s)      isotropic scaling, s = 2^𝒩(0, 0.2²)
    A(a, φ)   anisotropic scaling diag(a, 1/a) along an axis at angle φ ~ U(−π, π), a = 2^𝒩(0, 0.2²)
    R(θ)      rotation, θ ~ U(−π, π)·rotate_max
    T(t)      integer translation, t = round(U(−0.125, 0.125)·(W, H)) pixels

then, per pixel, with u = (x + 1)/2 the [0, 1] mapping::

    gamma       u ← u^γ, γ = 2^𝒩(0, 0.25²), on [10⁻³, 1]; below 10⁻³ the chord u·10⁻³^(γ−1), so
                0 stays 0 and the slope stays finite; above 1, slope 1 (values beyond [-1, 1]
                that a generator makes keep a gradient)
    contrast    x ← c·x, c = 2^𝒩(0, 0.5²)     (about mid-grey, 0)
    brightness  x ← x + b, b ~ 𝒩(0, 0.2²)
    cutout      a square of half the side, centred uniformly in the image, set to 0 (mid-grey)

The strengths are the paper's (its "bgc" pipe without hue, saturation and luma flip, which a
one-channel image does not have); gamma is added for X-ray exposure curves.

The p controller (:func:`update_p`): every ``interval`` minibatches, with r_t = E[sign(D(x_real))]
over those minibatches (the share by which D is sure of the reals: 0 when it cannot tell, 1 when
it has memorised them)::

    p ← clamp(p + sign(r_t − target) · batch·interval / (kimg·1000), 0, 1)

so p can move from 0 to 1 in ``kimg`` thousand images at the fastest (paper: target 0.6,
interval 4, 500 kimg). ``batch`` is the global batch (all processes).

DiffAugment (``mode: diffaugment``) applies its policy to every image, always (no p): ``color``
(brightness + U(−½, ½); saturation, for more than one channel, ×U(0, 2) about the channel mean;
contrast ×U(½, 3/2) about the image mean), ``translation`` (integer shift up to 1/8 of the side,
zero padding) and ``cutout`` (a square of half the side at a uniform position, zeroed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("ada", "fixed", "diffaugment", "none")
AUGMENTATIONS = ("translate", "scale", "aniso", "rotate", "brightness", "contrast", "gamma", "cutout")
DIFFAUGMENT_OPS = ("color", "translation", "cutout")
GAMMA_FLOOR = 1e-3  # u^γ above this, its chord below: the slope stays finite at black pixels


@dataclass(frozen=True)
class AugmentConfig:
    """The ``ada:`` section of a StyleGAN2 run config.

    ``mode``: ``ada`` (p adapted by :func:`update_p`, starting at ``p``), ``fixed`` (p = ``p``
    throughout), ``diffaugment`` (``policy`` on every image) or ``none``.
    """

    mode: Literal["ada", "fixed", "diffaugment", "none"] = "ada"
    p: float = 0.0  # initial p (ada) or the constant p (fixed)
    target: float = 0.6  # r_t the controller steers to
    interval: int = 4  # minibatches between two updates of p
    kimg: float = 500.0  # thousands of images for p to move by 1 at the fastest
    augment: tuple[str, ...] = AUGMENTATIONS  # which of AUGMENTATIONS the pipe applies
    xflip: bool = False  # mirror left-right (changes the side of the heart: off for chest X-rays)
    rotate90: bool = False  # rotations by multiples of 90°
    policy: str = "color,translation,cutout"  # DiffAugment's operations, comma-separated
    # strengths (the paper's defaults)
    translate_max: float = 0.125  # integer translation, fraction of the side
    scale_std: float = 0.2  # log2 of the isotropic scale
    aniso_std: float = 0.2  # log2 of the anisotropic scale
    rotate_max: float = 1.0  # rotation, fraction of π
    brightness_std: float = 0.2  # added, in [-1, 1] units
    contrast_std: float = 0.5  # log2 of the contrast factor
    gamma_std: float = 0.25  # log2 of γ
    cutout_size: float = 0.5  # side of the cutout square, fraction of the image side

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target must be in [0, 1), got {self.target}")
        if self.interval < 1:
            raise ValueError(f"interval must be at least 1 minibatch, got {self.interval}")
        if not self.kimg > 0:
            raise ValueError(f"kimg must be positive, got {self.kimg}")
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown[0]!r}: choose from {', '.join(AUGMENTATIONS)}")
        ops = diffaugment_ops(self.policy)  # raises on an unknown operation
        if self.mode == "diffaugment" and not ops:
            raise ValueError("mode diffaugment needs a policy, e.g. policy=color,translation,cutout")
        for name in ("scale_std", "aniso_std", "rotate_max", "brightness_std", "contrast_std", "gamma_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0.0 <= self.translate_max <= 0.5:
            raise ValueError(f"translate_max must be in [0, 0.5], got {self.translate_max}")
        if not 0.0 <= self.cutout_size <= 1.0:
            raise ValueError(f"cutout_size must be in [0, 1], got {self.cutout_size}")


def diffaugment_ops(policy: str) -> tuple[str, ...]:
    """The operations of a DiffAugment policy string (``"color,translation,cutout"``), checked."""
    ops = tuple(op.strip() for op in policy.split(",") if op.strip())
    for op in ops:
        if op not in DIFFAUGMENT_OPS:
            raise ValueError(f"unknown DiffAugment operation {op!r}: choose from {', '.join(DIFFAUGMENT_OPS)}")
    return ops


# ---------------------------------------------------------------------------------------------
# The p controller: pure functions


def initial_p(cfg: AugmentConfig) -> float:
    """p at the start of a run (a resumed run restores its own): ``cfg.p``, 1 for DiffAugment, 0 for none."""
    return {"diffaugment": 1.0, "none": 0.0}.get(cfg.mode, cfg.p)


def ada_step(batch_size: int, interval: int, kimg: float) -> float:
    """The most p moves in one update: ``batch_size·interval / (kimg·1000)``."""
    return batch_size * interval / (kimg * 1000.0)


def real_sign_stats(real_logits: Tensor) -> Tensor:
    """``[Σ sign(D(x_real)), count]`` of one minibatch as a float64 tensor on the logits' device.

    Add these up over ``interval`` minibatches (and all-reduce them across processes) without a
    device sync, then pass the totals to :func:`update_p`.
    """
    d = real_logits.detach().reshape(-1)
    return torch.stack([d.sign().sum(dtype=torch.float64), torch.tensor(d.numel(), dtype=torch.float64,
                                                                         device=d.device)])


def update_p(p: float, sign_sum: float, count: float, batch_size: int, cfg: AugmentConfig) -> tuple[float, float]:
    """One controller update: the new p and the measured r_t = ``sign_sum / count``.

    ``sign_sum`` and ``count`` cover the last ``cfg.interval`` minibatches of reals (global batch
    ``batch_size``). p moves by ``sign(r_t − target)·ada_step(...)``, clamped to [0, 1]; only in
    mode ``ada`` (other modes return p unchanged). With no reals counted, r_t is NaN and p stays.
    """
    if count <= 0:
        return float(p), math.nan
    rt = float(sign_sum) / float(count)
    if cfg.mode != "ada":
        return float(p), rt
    direction = (rt > cfg.target) - (rt < cfg.target)
    new_p = p + direction * ada_step(batch_size, cfg.interval, cfg.kimg)
    return float(min(max(new_p, 0.0), 1.0)), rt


# ---------------------------------------------------------------------------------------------
# The ADA pipe


@dataclass(frozen=True)
class AugmentParams:
    """One call's per-image parameters (leading dimension N); ``None`` where the pipe skips an augmentation.

    Values are those of the module docstring, identity (0 turns, 0 pixels, factor 1, size 0)
    for the images an augmentation was not drawn for.
    """

    xflip: Tensor | None = None  # [N] ±1
    rotate90: Tensor | None = None  # [N] quarter turns, int64
    translate: Tensor | None = None  # [N, 2] pixels (x, y), integers as float
    scale: Tensor | None = None  # [N]
    aniso: Tensor | None = None  # [N] factor a of diag(a, 1/a)
    aniso_angle: Tensor | None = None  # [N] radians
    rotate: Tensor | None = None  # [N] radians
    brightness: Tensor | None = None  # [N]
    contrast: Tensor | None = None  # [N]
    gamma: Tensor | None = None  # [N]
    cutout_center: Tensor | None = None  # [N, 2] (x, y) in [0, 1]
    cutout_size: Tensor | None = None  # [N] fraction of the side, 0 where not drawn

    def geometric(self) -> bool:
        return any(v is not None for v in (self.xflip, self.rotate90, self.translate, self.scale,
                                           self.aniso, self.rotate))


def sample_params(cfg: AugmentConfig, n: int, height: int, width: int, p: float,
                  generator: torch.Generator) -> AugmentParams:
    """Draw one call's parameters for ``n`` images of ``height × width`` on the generator's device.

    The draws are the same in number and order whatever ``p`` and the enabled set, so the
    generator's state after a call depends only on ``n``.
    """
    dev = generator.device
    g = generator

    def coin() -> Tensor:  # [N] bool, True with probability p (rand ∈ [0, 1): never at 0, always at 1)
        return torch.rand(n, generator=g, device=dev) < p

    def lognormal2(std: float) -> Tensor:
        return torch.exp2(torch.randn(n, generator=g, device=dev) * std)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g, device=dev)

    one = torch.ones(n, device=dev)
    zero = torch.zeros(n, device=dev)
    draws = {
        "xflip": torch.where(coin(), -one, one),
        "rotate90": torch.where(coin(), torch.randint(0, 4, (n,), generator=g, device=dev), 0),
        "translate": torch.where(coin()[:, None], torch.round(
            uniform(-cfg.translate_max, cfg.translate_max, 2) * torch.tensor([width, height], device=dev)), 0.0),
        "scale": torch.where(coin(), lognormal2(cfg.scale_std), one),
        "aniso": torch.where(coin(), lognormal2(cfg.aniso_std), one),
        "aniso_angle": uniform(-math.pi, math.pi),
        "rotate": torch.where(coin(), uniform(-math.pi, math.pi) * cfg.rotate_max, zero),
        "brightness": torch.where(coin(), torch.randn(n, generator=g, device=dev) * cfg.brightness_std, zero),
        "contrast": torch.where(coin(), lognormal2(cfg.contrast_std), one),
        "gamma": torch.where(coin(), lognormal2(cfg.gamma_std), one),
        "cutout_size": torch.where(coin(), cfg.cutout_size, zero),
        "cutout_center": uniform(0.0, 1.0, 2),
    }
    if p <= 0:
        return AugmentParams()
    on = set(cfg.augment) | {name for name, flag in (("xflip", cfg.xflip), ("rotate90", cfg.rotate90)) if flag}
    return AugmentParams(**{key: draws[key] for name in on for key in _PARAM_KEYS[name]})


# which AugmentParams fields each augmentation sets
_PARAM_KEYS = {name: (name,) for name in ("xflip", "rotate90", "translate", "scale", "rotate", "brightness",
                                          "contrast", "gamma")}
_PARAM_KEYS |= {"aniso": ("aniso", "aniso_angle"), "cutout": ("cutout_size", "cutout_center")}


def _rotation(theta: Tensor) -> Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def inverse_geometry(params: AugmentParams, n: int, device: torch.device | str) -> Tensor:
    """``G⁻¹`` as ``[N, 2, 3]`` in pixel units about the image centre (output pixel → source pixel)."""
    eye = torch.eye(2, device=device).expand(n, 2, 2)
    m = eye.clone()  # the linear part of G⁻¹ = F⁻¹ Q⁻¹ S⁻¹ A⁻¹ R⁻¹, then the translation
    if params.rotate is not None:
        m = _rotation(-params.rotate.to(device)) @ m
    if params.aniso is not None:
        a = params.aniso.to(device)
        phi = params.aniso_angle.to(device)
        inv = torch.diag_embed(torch.stack([1.0 / a, a], -1))
        m = _rotation(phi) @ inv @ _rotation(-phi) @ m
    if params.scale is not None:
        m = m / params.scale.to(device)[:, None, None]
    if params.rotate90 is not None:
        k = (-params.rotate90.to(device)) % 4  # exact quarter turns: no cos(π/2) ≈ 6e-17
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[k]
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[k]
        q = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        m = q @ m
    if params.xflip is not None:
        m = torch.diag_embed(torch.stack([params.xflip.to(device), torch.ones(n, device=device)], -1)) @ m
    t = torch.zeros(n, 2, device=device)
    if params.translate is not None:
        t = -(m @ params.translate.to(device)[:, :, None])[:, :, 0]  # G⁻¹ q = M (q − t)
    return torch.cat([m, t[:, :, None]], -1)


def apply_params(images: Tensor, params: AugmentParams) -> Tensor:
    """``images`` ``[N, C, H, W]`` augmented by ``params`` (differentiable in ``images``)."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    x = images
    dev = images.device
    if params.geometric():
        inv = inverse_geometry(params, n, dev).to(torch.float32)
        # pixel units about the centre → grid_sample's [-1, 1] (align_corners=False: pixel i sits at
        # 2(i − (W−1)/2)/W), i.e. θ = D G⁻¹ D⁻¹ with D = diag(2/W, 2/H)
        d = torch.tensor([2.0 / w, 2.0 / h], device=dev)
        theta = torch.cat([inv[:, :, :2] * d[:, None] / d[None, :], inv[:, :, 2:] * d[:, None]], -1)
        # sampled in float32 at least: a bf16 grid is off by up to a pixel at 256²
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        grid = F.affine_grid(theta.to(work.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(work, grid, mode="bilinear", padding_mode="reflection", align_corners=False).to(x.dtype)
    if params.gamma is not None:
        gamma = params.gamma.to(dev, x.dtype)[:, None, None, None]
        u = (x + 1.0) * 0.5
        uc = u.clamp(GAMMA_FLOOR, 1.0)
        # u^γ on [floor, 1]; below, the chord through 0 (so 0 stays 0); above 1, slope 1
        below = (u - GAMMA_FLOOR).clamp(max=0.0) * GAMMA_FLOOR ** (gamma - 1.0)
        x = (uc.pow(gamma) + (u - 1.0).clamp(min=0.0) + below) * 2.0 - 1.0
    if params.contrast is not None:
        x = x * params.contrast.to(dev, x.dtype)[:, None, None, None]
    if params.brightness is not None:
        x = x + params.brightness.to(dev, x.dtype)[:, None, None, None]
    if params.cutout_size is not None:
        x = x * _cutout_keep(params.cutout_center.to(dev), params.cutout_size.to(dev), h, w).to(x.dtype)
    return x


def _cutout_keep(center: Tensor, size: Tensor, h: int, w: int) -> Tensor:
    """``[N, 1, H, W]`` 1 outside, 0 inside each image's square (pixel centres at (i + ½)/side)."""
    ux = (torch.arange(w, device=center.device) + 0.5) / w
    uy = (torch.arange(h, device=center.device) + 0.5) / h
    half = size[:, None, None] / 2
    inside = ((ux[None, None, :] - center[:, None, None, 0]).abs() < half) & \
             ((uy[None, :, None] - center[:, None, None, 1]).abs() < half)
    return (~inside)[:, None].float()


# ---------------------------------------------------------------------------------------------
# DiffAugment


def diffaugment(images: Tensor, policy: str, generator: torch.Generator) -> Tensor:
    """DiffAugment's ``policy`` on every image (no p), parameters drawn from ``generator``."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    g, gdev, dev = generator, generator.device, images.device
    x = images

    def rand(*shape: int) -> Tensor:
        return torch.rand(n, *shape, generator=g, device=gdev).to(dev)

    for op in diffaugment_ops(policy):
        if op == "color":
            x = x + (rand() - 0.5).to(x.dtype)[:, None, None, None]
            if c > 1:
                mean = x.mean(dim=1, keepdim=True)
                x = (x - mean) * (rand() * 2.0).to(x.dtype)[:, None, None, None] + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (rand() + 0.5).to(x.dtype)[:, None, None, None] + mean
        elif op == "translation":
            sx, sy = int(w * 0.125 + 0.5), int(h * 0.125 + 0.5)
            # integer shifts in [−s, s] (content moves by +t), zeros where the image was not
            t = torch.floor(rand(2) * torch.tensor([2 * sx + 1, 2 * sy + 1], device=dev)).long() - \
                torch.tensor([sx, sy], device=dev)
            padded = F.pad(x, (sx, sx, sy, sy))
            ys = torch.arange(h, device=dev)[None, :, None] - t[:, 1, None, None] + sy
            xs = torch.arange(w, device=dev)[None, None, :] - t[:, 0, None, None] + sx
            x = padded[torch.arange(n, device=dev)[:, None, None], :, ys, xs].permute(0, 3, 1, 2)
        else:  # cutout: a square of half the side, its centre on a uniform pixel, zeroed
            size_x, size_y = int(w * 0.5 + 0.5), int(h * 0.5 + 0.5)
            cx = torch.floor(rand() * w).long()
            cy = torch.floor(rand() * h).long()
            ix = torch.arange(w, device=dev)[None, None, :] - (cx - size_x // 2)[:, None, None]
            iy = torch.arange(h, device=dev)[None, :, None] - (cy - size_y // 2)[:, None, None]
            inside = (ix >= 0) & (ix < size_x) & (iy >= 0) & (iy < size_y)
            x = x * (~inside)[:, None].to(x.dtype)
    return x


class AugmentPipe:
    """The augmentations of one run: ``pipe(images, p, generator)`` for every image D sees.

    ``p`` is the current probability (from :func:`initial_p`, then :func:`update_p`; the loop
    keeps it, with the generator's state, in its checkpoint); ignored by DiffAugment and none.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    @property
    def enabled(self) -> bool:
        return self.cfg.mode != "none"

    def __call__(self, images: Tensor, p: float, generator: torch.Generator) -> Tensor:
        if self.cfg.mode == "none":
            return images
        if self.cfg.mode == "diffaugment":
            return diffaugment(images, self.cfg.policy, generator)
        n, _, h, w = images.shape
        return apply_params(images, sample_params(self.cfg, n, h, w, p, generator))
