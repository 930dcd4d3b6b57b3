"""StyleGAN2 generator and residual discriminator in plain PyTorch (Karras et al., CVPR 2020),
class-conditional, without a custom CUDA extension.

Generator ``G(z, c)``:

- mapping ``w = f([z / rms(z), e(c) / rms(e(c))])``, an MLP of ``mapping_layers`` fully connected
  layers with leaky ReLU; ``e`` is a linear label embedding, so one-hot (single label) and
  multi-hot (NIH 14) labels both work; its learning rate is ``mapping_lr_mult`` (0.01) times D's;
- truncation ``w' = w̄ + ψ (w − w̄)`` toward the tracked average ``w̄`` (or a class centre,
  :meth:`Generator.class_w_avg`) for the first ``cutoff`` styles;
- synthesis from a learned constant 4×4 input: per resolution a modulated 3×3 convolution with
  2× upsampling, a second one, and a 1×1 toRGB whose outputs are summed across resolutions
  (skip architecture). Modulation ``w'_ijk = s_i · w_ijk``, demodulation
  ``w''_ijk = w'_ijk / sqrt(Σ_ik w'_ijk² + ε)``, applied per sample as one grouped convolution
  (groups = batch); per-pixel noise ``x + β·n`` with a learned strength ``β`` per layer.

Discriminator ``D(x, c)``: fromRGB at full resolution, residual blocks halving the resolution
(``(conv3×3 → conv3×3↓ + conv1×1↓) / √2``), minibatch standard deviation at 4², a 3×3 conv and
two fully connected layers; with labels a projection term (Miyato & Koyama 2018)
``D(x, c) = ψ(φ(x)) + ⟨E c, φ(x)⟩ / √dim φ``.

Every weight is stored as N(0, 1) and scaled at run time by ``lr_mult / sqrt(fan_in)``
(equalized learning rate), so Adam's per-parameter step sizes act alike on every layer.
Resampling uses the separable [1, 3, 3, 1] filter as depthwise (transposed) convolutions, so
every operation has a double backward in plain PyTorch (R1 and path-length regularization).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxr.errors import ConfigError
from gan.networks.layers import assert_shape
from gan.stylegan2.config import NOISE_MODES, DiscriminatorConfig, GeneratorConfig

FAMILY = "stylegan2"
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the activations' second moment through a leaky ReLU


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU (slope 0.2) times √2."""
    return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """``x / sqrt(mean(x²) + ε)`` along ``dim`` (z and the label embedding enter the mapping so)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def fir_kernel() -> torch.Tensor:
    """The separable [1, 3, 3, 1] ⊗ [1, 3, 3, 1] low-pass filter, summing to 1."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum()


def upsample2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2× upsampling: zero insertion then the FIR filter (gain 4), as one transposed convolution."""
    c = x.shape[1]
    w = (kernel * 4).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv_transpose2d(x, w, stride=2, padding=1, groups=c)


def blur2d(x: torch.Tensor, kernel: torch.Tensor, pad: int) -> torch.Tensor:
    """The FIR filter as a depthwise convolution after zero padding ``pad`` on every side."""
    c = x.shape[1]
    w = kernel.to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(F.pad(x, [pad] * 4), w, groups=c)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     padding: int = 0, eps: float = 1e-8, grouped: bool = True) -> torch.Tensor:
    """One convolution per sample with its own weights.

    ``x`` (N, I, H, W), ``weight`` (O, I, k, k), ``styles`` (N, I). Sample n convolves with
    ``w_n = weight · s_n`` (scaled per input channel), divided per output channel by
    ``d_n = sqrt(Σ w_n² + ε)`` when ``demodulate``.

    ``grouped``: the batch is folded into the channels (1, N·I, H, W) and convolved with the N
    per-sample weights as one grouped convolution. Otherwise the same numbers come from one
    ordinary batched convolution of the scaled input, ``conv(x · s_n, weight) / d_n`` (the
    scales commute with the convolution), which some backends run faster. Both have a double
    backward in autograd.
    """
    n, cin, h, w = x.shape
    cout, cin_w, kh, kw = weight.shape
    if cin_w != cin:
        raise ValueError(f"input has {cin} channels, the weight expects {cin_w}")
    assert_shape(styles, (n, cin), "styles")
    if not grouped:
        out = F.conv2d(x * styles.reshape(n, cin, 1, 1), weight, padding=padding)
        if demodulate:
            # Σ_ik (w_oik s_i)² = Σ_i s_i² Σ_k w_oik²
            d = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + eps).rsqrt()  # (N, O)
            out = out * d.reshape(n, cout, 1, 1)
        return out
    wn = weight.unsqueeze(0) * styles.reshape(n, 1, cin, 1, 1)  # (N, O, I, k, k)
    if demodulate:
        wn = wn * (wn.square().sum(dim=(2, 3, 4), keepdim=True) + eps).rsqrt()
    out = F.conv2d(x.reshape(1, n * cin, h, w), wn.reshape(n * cout, cin, kh, kw), padding=padding, groups=n)
    return out.reshape(n, cout, *out.shape[2:])


class EqualLinear(nn.Module):
    """Fully connected layer with equalized learning rate: ``y = x (g·W)ᵀ + lr_mult·b``.

    ``W`` is stored as N(0, 1)/lr_mult and used times ``g = lr_mult / sqrt(fan_in)``; the bias
    is stored as bias_init/lr_mult, so a smaller ``lr_mult`` slows the layer's learning only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mult: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_mult)) if bias else None
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.lr_mult = lr_mult
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias * self.lr_mult
        x = F.linear(x, self.weight * self.weight_gain, b)
        return lrelu(x) if self.activation else x


class EqualConv2d(nn.Module):
    """Convolution with equalized learning rate; ``down`` blurs then strides by 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: bool = False, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.activation = activation
        self.down = down
        self.kernel_size = kernel_size
        if down:
            self.register_buffer("kernel", fir_kernel(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        if self.down:
            # pad (k + 1)/2 then a 4-tap blur then stride 2: H → H/2 for k = 1 and k = 3
            x = blur2d(x, self.kernel, (self.kernel_size + 1) // 2)
            x = F.conv2d(x, w, self.bias, stride=2)
        else:
            x = F.conv2d(x, w, self.bias, padding=self.kernel_size // 2)
        return lrelu(x) if self.activation else x


# --------------------------------------------------------------------------------------------
# Generator


class MappingNetwork(nn.Module):
    """``(z, c) → w``; tracks ``w_avg``, the running mean of w, for truncation."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        embed = cfg.embed_features or cfg.w_dim
        self.embed = EqualLinear(cfg.c_dim, embed) if cfg.c_dim else None
        widths = [cfg.z_dim + (embed if cfg.c_dim else 0)] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.Sequential(*[EqualLinear(a, b, lr_mult=cfg.mapping_lr_mult, activation=True)
                                      for a, b in zip(widths[:-1], widths[1:])])
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, update_w_avg: bool = False) -> torch.Tensor:
        """(N, z_dim), (N, c_dim) → w (N, w_dim)."""
        assert_shape(z, (None, self.cfg.z_dim), "z")
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            if c is None:
                raise ValueError(f"a conditional generator needs labels c of shape (N, {self.cfg.c_dim})")
            assert_shape(c, (z.shape[0], self.cfg.c_dim), "c")
            x = torch.cat([x, normalize_2nd_moment(self.embed(c.to(x.dtype)))], dim=1)
        w = self.layers(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.cfg.w_avg_beta))
        return w


class SynthesisLayer(nn.Module):
    """Modulated 3×3 convolution (optionally after 2× upsampling), noise, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool,
                 grouped: bool = True):
        super().__init__()
        self.grouped = grouped
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)  # styles start at 1
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.resolution = resolution
        self.up = up
        if up:
            self.register_buffer("kernel", fir_kernel(), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        if self.up:
            x = upsample2d(x, self.kernel)
        x = modulated_conv2d(x, self.weight, self.affine(w), demodulate=True, padding=1, grouped=self.grouped)
        if noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device,
                                dtype=x.dtype) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        return lrelu(x + self.bias.view(1, -1, 1, 1))


class ToRGB(nn.Module):
    """Modulated 1×1 convolution to the image channels, not demodulated, linear."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, grouped: bool = True):
        super().__init__()
        self.grouped = grouped
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        out = modulated_conv2d(x, self.weight, styles, demodulate=False, grouped=self.grouped)
        return out + self.bias.view(1, -1, 1, 1)


class SynthesisBlock(nn.Module):
    """One resolution: (constant | upsampling conv), conv, toRGB added to the upsampled image."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 grouped: bool = True):
        super().__init__()
        self.resolution = resolution
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True, grouped=grouped)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, up=False, grouped=grouped)
        self.torgb = ToRGB(out_channels, img_channels, w_dim, grouped=grouped)
        self.num_conv = 1 if resolution == 4 else 2
        if resolution > 4:
            self.register_buffer("kernel", fir_kernel(), persistent=False)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``ws`` (N, num_conv + 1, w_dim): one style per convolution, then the toRGB's."""
        if self.conv0 is None:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1).to(ws.dtype)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode)
        y = self.torgb(x, ws[:, self.num_conv])
        img = y if img is None else upsample2d(img, self.kernel) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim) → image (N, img_channels, R, R)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        resolutions = [2**k for k in range(2, int(math.log2(cfg.resolution)) + 1)]
        self.blocks = nn.ModuleList(
            SynthesisBlock(cfg.channels(max(r // 2, 4)), cfg.channels(r), cfg.w_dim, r, cfg.img_channels,
                           grouped=cfg.modconv == "grouped")
            for r in resolutions)
        self.num_ws = cfg.num_ws

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        assert_shape(ws, (None, self.num_ws, self.cfg.w_dim), "ws")
        x = img = None
        i = 0
        for block in self.blocks:
            # consecutive blocks share one w: a block's toRGB style is the next block's first conv's
            x, img = block(x, img, ws[:, i:i + block.num_conv + 1], noise_mode)
            i += block.num_conv
        return img


class Generator(nn.Module):
    """Class-conditional StyleGAN2 generator: ``G(z, c) → image`` in about [−1, 1]."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.mapping = MappingNetwork(config)
        self.synthesis = SynthesisNetwork(config)
        self.num_ws = config.num_ws

    def truncate(self, w: torch.Tensor, psi: float = 1.0, cutoff: int | None = None,
                 w_center: torch.Tensor | None = None) -> torch.Tensor:
        """Broadcast w (N, w_dim) to ws (N, num_ws, w_dim), pulled toward the centre by ``psi``.

        ``w' = c + ψ (w − c)`` for the first ``cutoff`` styles (all by default); ``c`` is the
        tracked ``w_avg`` or ``w_center`` ((w_dim,) or (N, w_dim), e.g. :meth:`class_w_avg`).
        """
        if not 0.0 <= psi <= 1.0:
            raise ValueError(f"truncation psi must be in [0, 1], got {psi}")
        ws = w.unsqueeze(1).expand(-1, self.num_ws, -1)
        if psi == 1.0:
            return ws
        center = self.mapping.w_avg if w_center is None else w_center
        center = center.to(w.dtype).reshape(-1, 1, w.shape[1])
        cut = self.num_ws if cutoff is None else max(0, min(cutoff, self.num_ws))
        head = center.lerp(ws[:, :cut], psi).expand(w.shape[0], -1, -1)
        return torch.cat([head, ws[:, cut:]], dim=1)

    @torch.no_grad()
    def class_w_avg(self, c: torch.Tensor, n: int = 1000, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean w of ``n`` latents under each label row of ``c`` (K, c_dim) → (K, w_dim).

        The truncation centre for one class: ``w_avg`` averages over the training labels, so
        truncating toward it with ψ → 0 also erases the class.
        """
        device = self.mapping.w_avg.device
        out = []
        for row in c.to(device):
            z = torch.randn(n, self.config.z_dim, generator=generator).to(device)
            out.append(self.mapping(z, row.expand(n, -1)).mean(0))
        return torch.stack(out)

    def sample_ws(self, z: torch.Tensor, c: torch.Tensor | None, mixing_prob: float = 0.0,
                  update_w_avg: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training styles, with style mixing regularization.

        With probability ``mixing_prob`` (drawn once per batch on the CPU: no device sync), a
        second latent with the same labels takes over from a cutoff drawn uniformly in
        [1, num_ws): ``ws[:, :k] = w(z₁, c)``, ``ws[:, k:] = w(z₂, c)``. The draws and z₂ come
        from ``generator`` (a CPU ``torch.Generator``; the global one when ``None``).
        """
        ws = self.truncate(self.mapping(z, c, update_w_avg=update_w_avg))
        if mixing_prob > 0 and torch.rand((), generator=generator).item() < mixing_prob:
            k = int(torch.randint(1, self.num_ws, (), generator=generator).item())
            z2 = torch.randn(z.shape, generator=generator).to(z)  # the same stream: a resume redraws it
            ws2 = self.truncate(self.mapping(z2, c))
            ws = torch.cat([ws[:, :k], ws2[:, k:]], dim=1)
        return ws

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, psi: float = 1.0, cutoff: int | None = None,
                noise_mode: str = "random", w_center: torch.Tensor | None = None,
                update_w_avg: bool = False) -> torch.Tensor:
        """(N, z_dim), (N, c_dim) → (N, img_channels, R, R)."""
        w = self.mapping(z, c, update_w_avg=update_w_avg)
        return self.synthesis(self.truncate(w, psi, cutoff, w_center), noise_mode=noise_mode)


# --------------------------------------------------------------------------------------------
# Discriminator


def minibatch_stddev(x: torch.Tensor, group_size: int, num_channels: int) -> torch.Tensor:
    """Append ``num_channels`` feature maps holding the standard deviation across a group.

    The batch splits into groups of ``g = min(group_size, N)`` samples (g shrinks until it
    divides N); within a group the per-position std of each channel slice is averaged into one
    number per slice, broadcast over H × W to every member: D sees how varied a batch is, which
    penalises a collapsed generator (Karras et al. 2018).
    """
    if num_channels == 0:
        return x
    n, c, h, w = x.shape
    g = min(group_size, n)
    while n % g:
        g -= 1
    y = x.reshape(g, n // g, num_channels, c // num_channels, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean(dim=(2, 3, 4))  # (N/g, F)
    y = y.reshape(n // g, num_channels, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block: ``(conv3×3 → conv3×3 ↓2  +  conv1×1 ↓2) · √½``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation=True)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation=True, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator, projection-conditioned: ``D(x, c) → (N, 1)`` logits."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        cfg = config
        top = cfg.resolution
        self.fromrgb = EqualConv2d(cfg.img_channels, cfg.channels(top), 1, activation=True)
        resolutions = [2**k for k in range(int(math.log2(top)), 2, -1)]  # R … 8
        self.blocks = nn.ModuleList(DiscriminatorBlock(cfg.channels(r), cfg.channels(r // 2)) for r in resolutions)
        c4 = cfg.channels(4)
        self.conv = EqualConv2d(c4 + cfg.mbstd_num_channels, c4, 3, activation=True)
        self.fc = EqualLinear(c4 * 16, c4, activation=True)
        self.out = EqualLinear(c4, 1)
        self.embed = EqualLinear(cfg.c_dim, c4, bias=False) if cfg.c_dim else None
        self.features_dim = c4

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """φ(x): the penultimate features (N, C₄)."""
        cfg = self.config
        assert_shape(img, (None, cfg.img_channels, cfg.resolution, cfg.resolution), "image")
        x = self.fromrgb(img)
        for block in self.blocks:
            x = block(x)
        x = minibatch_stddev(x, cfg.mbstd_group_size, cfg.mbstd_num_channels)
        return self.fc(self.conv(x).flatten(1))

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(img)
        out = self.out(h)
        if self.embed is not None:
            if c is None:
                raise ValueError(f"a conditional discriminator needs labels c of shape (N, {self.config.c_dim})")
            assert_shape(c, (img.shape[0], self.config.c_dim), "c")
            proj = (self.embed(c.to(h.dtype)) * h).sum(dim=1, keepdim=True)
            out = out + proj / math.sqrt(self.features_dim)
        return out


# --------------------------------------------------------------------------------------------
# Checkpoint descriptions


_KINDS: dict[str, tuple[type[nn.Module], type]] = {
    "generator": (Generator, GeneratorConfig),
    "discriminator": (Discriminator, DiscriminatorConfig),
}


def model_args(module: nn.Module) -> dict[str, Any]:
    """``{"kind", "name": "stylegan2", "config"}`` as plain JSON, what a checkpoint stores."""
    module = getattr(module, "module", module)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    for kind, (cls, _) in _KINDS.items():
        if isinstance(module, cls):
            return {"kind": kind, "name": FAMILY, "config": dataclasses.asdict(module.config)}
    raise ValueError(f"{type(module).__name__} is not a StyleGAN2 network")


def build_from_model_args(args: dict[str, Any], where: str = "model_args") -> nn.Module:
    """Rebuild a generator or discriminator from :func:`model_args` (a checkpoint's record)."""
    try:
        kind, name, config = args["kind"], args["name"], dict(args["config"])
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: not a network description (expected kind, name and config)") from None
    if name != FAMILY:
        raise ConfigError(f"{where}: a {name!r} network, not a StyleGAN2 one")
    if kind not in _KINDS:
        raise ConfigError(f"{where}: unknown network kind {kind!r} (expected one of {tuple(_KINDS)})")
    cls, cfg_cls = _KINDS[kind]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ConfigError(f"{where}: StyleGAN2 {kind} has no option {unknown[0]!r}")
    return cls(cfg_cls(**config))
