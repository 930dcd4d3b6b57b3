"""3×3 convolutions by Winograd's minimal filtering, F(4×4, 3×3), for CPU training.

A stride-1 3×3 convolution over C channels costs 9·C multiply-adds per output value done
directly (PyTorch's oneDNN kernels on a CPU). Winograd's F(4, 3) (Lavin & Gray 2016) computes a
4×4 output tile from a 6×6 input tile with 36 products instead of 144: the input tiles and the
weights are each taken to a 36-point transform domain, multiplied there (36 independent
matrix products over the channels, which BLAS runs near peak), and brought back. It is the
same linear map as the direct convolution; only the order of the float32 additions differs
(about 1e-5 relative here), as with the Winograd and FFT algorithms cuDNN picks on a GPU.

On the 2-core CPU machine this makes the 256-channel residual-block convolutions of a ResNet
generator 1.5–2.2× faster, forward and backward together, on 32² to 128² feature maps (128² to
512² images); they are about 70 % of a CycleGAN training step at 256². With fewer channels, or
on 16² maps, the transforms cost what the products save, so ``WinogradConv2d`` uses it only
where it pays (see ``use_winograd``). Backward is written out
by hand (``_WinogradF43``): the same transforms, transposed. The price is memory: each call
keeps its transformed input (2.25× the input) for backward instead of the input itself, about
+0.9 GB at 256², ResNet-9, batch 1 (docs/results/cyclegan_speed.md).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

WinogradMode = Literal["auto", "on", "off"]
WINOGRAD_MODES: tuple[str, ...] = get_args(WinogradMode)
TILE = 4  # output tile side, F(4, 3)
SPAN = TILE + 2  # input tile side
MIN_CHANNELS = 128  # "auto": below this the transforms cost more than the products save
MIN_SIDE = 32  # "auto": feature maps at least this large in both directions
MIN_WORK = 8192  # "auto": channels × smaller side at least this (256 on 32², 128 on 64²)


def winograd_matrices(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F(4, 3)'s 2-D transforms as Kronecker products of Lavin & Gray's 1-D matrices.

    Returns ``(B, G, A)``: ``B`` (36, 36) takes a flattened 6×6 input tile to the transform
    domain, ``G`` (36, 9) a flattened 3×3 kernel, ``A`` (16, 36) the products back to a
    flattened 4×4 output tile. Built in float64, so the only rounding is the final cast.
    """
    bt = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
    g = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
    at = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                       [0, 1, -1, 8, -8, 1]], dtype=torch.float64)
    return tuple(torch.kron(m, m).to(dtype=dtype, device=device) for m in (bt, g, at))  # type: ignore[return-value]


def _tiles(xp: torch.Tensor) -> tuple[int, int]:
    """Tile rows and columns of a padded input whose unpadded sides are multiples of 4."""
    return (xp.shape[2] - 2) // TILE, (xp.shape[3] - 2) // TILE


def _fold_tiles(d: torch.Tensor, n: int, c: int, th: int, tw: int) -> torch.Tensor:
    """Sum overlapping 6×6 tiles, ``d`` (36, c·n·th·tw), back into an (n, c, 4th+2, 4tw+2) image.

    Neighbouring tiles share two rows or columns; a buffer of whole 4×4 cells (one cell more
    each way) takes each tile's first four rows/columns by assignment and its last two by
    addition into the next cell.
    """
    d = d.view(SPAN, SPAN, c, n, th, tw).permute(3, 2, 4, 0, 5, 1)  # n, c, th, 6 (rows), tw, 6 (cols)
    buf = d.new_zeros(n, c, th + 1, TILE, tw + 1, TILE)
    buf[:, :, :th, :, :tw, :] = d[:, :, :, :TILE, :, :TILE]
    buf[:, :, 1:, :2, :tw, :] += d[:, :, :, TILE:, :, :TILE]
    buf[:, :, :th, :, 1:, :2] += d[:, :, :, :TILE, :, TILE:]
    buf[:, :, 1:, :2, 1:, :2] += d[:, :, :, TILE:, :, TILE:]
    return buf.view(n, c, TILE * (th + 1), TILE * (tw + 1))[:, :, :TILE * th + 2, :TILE * tw + 2]


class _WinogradF43(torch.autograd.Function):
    """y = conv2d(xp, w, b) for a padded input ``xp``, stride 1, 3×3 kernel, by F(4, 3)."""

    @staticmethod
    def forward(ctx, xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        b_mat, g_mat, a_mat = winograd_matrices(xp.dtype, xp.device)
        n, ci, _, _ = xp.shape
        co = weight.shape[0]
        th, tw = _tiles(xp)
        t = n * th * tw
        tiles = xp.unfold(2, SPAN, TILE).unfold(3, SPAN, TILE)  # n, ci, th, tw, 6, 6 (a view)
        v = (b_mat @ tiles.permute(4, 5, 1, 0, 2, 3).reshape(SPAN * SPAN, ci * t)).view(-1, ci, t)
        u = (g_mat @ weight.reshape(co * ci, 9).t()).view(-1, co, ci)
        m = torch.bmm(u, v)  # 36, co, t
        y = (a_mat @ m.view(-1, co * t)).view(TILE, TILE, co, n, th, tw)
        y = y.permute(3, 2, 4, 0, 5, 1).reshape(n, co, TILE * th, TILE * tw)
        if bias is not None:
            y += bias.view(1, -1, 1, 1)
        ctx.save_for_backward(weight, v)  # not u: rebuilding it costs ~3 % of the layer, keeping it 9 MB a call
        ctx.matrices = (b_mat, g_mat, a_mat)  # 3 kB; backward needs the same ones
        ctx.shape = (n, ci, co, th, tw)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        weight, v = ctx.saved_tensors
        n, ci, co, th, tw = ctx.shape
        t = n * th * tw
        b_mat, g_mat, a_mat = ctx.matrices
        u = (g_mat @ weight.reshape(co * ci, 9).t()).view(-1, co, ci)
        dyt = dy.reshape(n, co, th, TILE, tw, TILE).permute(3, 5, 1, 0, 2, 4).reshape(TILE * TILE, co * t)
        dm = (a_mat.t() @ dyt).view(-1, co, t)
        dxp = dw = db = None
        if ctx.needs_input_grad[0]:
            dv = torch.bmm(u.transpose(1, 2), dm)  # 36, ci, t
            dxp = _fold_tiles(b_mat.t() @ dv.view(-1, ci * t), n, ci, th, tw)
        if ctx.needs_input_grad[1]:
            du = torch.bmm(dm, v.transpose(1, 2))  # 36, co, ci
            dw = (g_mat.t() @ du.view(-1, co * ci)).t().reshape(co, ci, 3, 3)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dxp, dw, db


def winograd_conv3x3(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(xp, weight, bias)`` for an already padded input, 3×3 kernel, stride 1, by F(4, 3).

    The output's height and width (input's minus 2) must be multiples of 4.
    """
    if weight.shape[2:] != (3, 3) or xp.ndim != 4 or weight.shape[1] != xp.shape[1]:
        raise ValueError(f"winograd_conv3x3 needs a (N, C, H, W) input and a (C_out, C, 3, 3) weight, "
                         f"got {tuple(xp.shape)} and {tuple(weight.shape)}")
    if (xp.shape[2] - 2) % TILE or (xp.shape[3] - 2) % TILE:
        raise ValueError(f"winograd_conv3x3 needs output sides that are multiples of {TILE}, "
                         f"got {xp.shape[2] - 2}×{xp.shape[3] - 2}")
    return _WinogradF43.apply(xp, weight, bias)


def use_winograd(mode: WinogradMode, x: torch.Tensor, channels: int) -> bool:
    """Whether a 3×3 stride-1 convolution of ``x`` should run by F(4, 3).

    ``on``: wherever it can (float32, sides multiples of 4). ``auto``: also only on a CPU, outside
    autocast, with 256 channels on maps of at least 32² or 128 on at least 64², where it
    measured faster than oneDNN's direct kernels (``benchmarks/bench_winograd.py``, one layer,
    forward + backward, 1 and 2 threads: 1.5–2.2× at 256 channels on 32²–128², 1.2–2× at 128 on
    64²; 0.5–0.9× on 16², 0.9–1.2× at 128 channels on 32², 0.5–1.3× at 64 channels). GPUs keep cuDNN,
    which picks its own algorithms.
    """
    if mode == "off" or x.dtype != torch.float32 or x.shape[2] % TILE or x.shape[3] % TILE:
        return False
    if mode == "on":
        return True
    side = min(x.shape[2], x.shape[3])
    return (x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and channels >= MIN_CHANNELS
            and side >= MIN_SIDE and channels * side >= MIN_WORK)


class WinogradConv2d(nn.Conv2d):
    """A 3×3, stride-1, 'same' ``nn.Conv2d`` that runs by F(4, 3) where ``use_winograd`` says so.

    Same parameters and state-dict keys as ``nn.Conv2d``, so checkpoints move between the two.
    """

    def __init__(self, in_channels: int, out_channels: int, *, padding_mode: str = "zeros", bias: bool = True,
                 winograd: WinogradMode = "auto"):
        super().__init__(in_channels, out_channels, 3, padding=1, padding_mode=padding_mode, bias=bias)
        if winograd not in WINOGRAD_MODES:
            raise ValueError(f"winograd must be one of {WINOGRAD_MODES}, got {winograd!r}")
        self.winograd = winograd

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not use_winograd(self.winograd, input, self.in_channels):
            return super()._conv_forward(input, weight, bias)
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return winograd_conv3x3(F.pad(input, (1, 1, 1, 1), mode=mode), weight, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", winograd={self.winograd}"
