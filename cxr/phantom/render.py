"""Render a :class:`~cxr.phantom.types.Subject` into a :class:`~cxr.phantom.types.Projection`.

Physics: a radiograph records ``I = I0 exp(-∫ μ dl)``; with two materials the exponent is
``μ_soft(E)·S + μ_bone(E)·B`` where ``S`` and ``B`` are line integrals (cm) of water-equivalent
soft tissue and of cortical bone. This module produces ``S`` and ``B``; an acquisition chain
picks the μ's, noise and processing.

Speed comes from projecting the CT once per head-to-foot rotation ("yaw", a few bins, cached on
the :class:`~cxr.phantom.anatomy.Anatomy`; the bundled CT's are shipped,
:mod:`cxr.phantom.projections`) and doing everything else per subject in 2D: one smooth warp
carries pose, habitus, inspiration depth, heart size and an elastic deformation, applied with
a single ``grid_sample`` grid to the channels (soft, bone, lung fields; the heart field, lung
path length and lung tissue only when something reads them); lesions are then added as
analytic line integrals (:mod:`cxr.phantom.lesions`). In-plane rotation, translation and
scaling of a parallel projection are exact in 2D; the elastic and organ-size warps are the
approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cxr.errors import CxrError
from cxr.phantom import lesions as lesion_mod
from cxr.phantom.anatomy import ABDOMEN, HEART, LUNG_LEFT, LUNG_RIGHT, Anatomy
from cxr.phantom.types import Projection, Subject, deferred

FOV_MM = 350.0  # side of the square projection field (a 35 x 35 cm detector)
FOV_TOP_MM = -15.0  # top edge of the field relative to the CT's first (cranial) slice
YAW_BINS: tuple[float, ...] = (-6.0, -3.0, 0.0, 3.0, 6.0)  # degrees; projected lazily, cached
PAD_ROWS = 48  # rows added above/below the CT (extend_rows): room for shifts and scalings
PAD_COLS = 24  # air columns beside it
FOLD_MM = 40.0  # beyond each end of the CT, this much of its end slices is mirrored (extend_rows)
SPINE_HALF_MM = 25.0  # bone kept beyond the CT's ends: the spine, this far either side of midline
BONE_FADE_MM = 6.0  # ... after the rest of the bone has faded out over this distance

# Channels of the base projection.
SOFT, BONE, LUNG_R, LUNG_L, HEART_F, LUNG_THK, LUNG_SOFT = range(7)
N_CHANNELS = 7

LUNG_MIN_CM = 1.0  # lung path below this is not "lung field" (pleural edge)
HEART_MIN_CM = 1.0  # heart path above this hides the lung (cardiac silhouette)
ABDOMEN_MIN_CM = 1.0  # lung behind the liver/stomach lies below the diaphragm on a PA film

# Neutral values of the per-subject parameters (see cxr.phantom.subjects for their draws).
DEFAULT_PARAMS: dict[str, float] = {
    "yaw_deg": 0.0, "roll_deg": 0.0, "tx_mm": 0.0, "tz_mm": 0.0,
    "width_scale": 1.0, "height_scale": 1.0, "inspiration": 1.0, "heart_scale": 1.0,
    "elastic_mm": 0.0, "soft_tissue_cm": 0.0, "bone_density": 1.0,
}


@dataclass
class BaseMaps:
    """The CT projected at one yaw, padded, with the landmarks the warp needs (mm, base frame).

    ``maps`` is a ``(1, C, rows, cols)`` float32 tensor; base mm coordinates put x = 0 at the
    centre of the CT's first column and z = 0 at the centre of its first slice.
    """

    maps: torch.Tensor
    dx: float
    dz: float
    x_center: float  # lateral centre of the lungs
    apex_z: float  # top of the lungs
    heart_center: tuple[float, float]  # (x, z)
    heart_radii: tuple[float, float]  # half width, half height


PROJECTED = 7  # soft, bone, right lung, left lung, heart, abdomen, lung tissue (ChannelVolume)


@dataclass
class ChannelVolume:
    """Every depth's 7 planes as float32, zero-padded by ``pad`` columns either side: what a
    projection reads (several yaws projected together share one, built once).

    Stored column-major per depth, ``(ny, pad + nx + pad, 7, nz)``: a shear gathers whole
    columns, and a gather along the first axis copies contiguous runs instead of single floats.
    """

    slabs: np.ndarray
    pad: int

    @classmethod
    def of(cls, anatomy: Anatomy, pad: int, threads: int = 1) -> "ChannelVolume":
        """Build it; ``threads`` > 1 fills channels in parallel (numpy copies release the GIL,
        and a first fill is mostly the kernel handing out ~100 MB of fresh pages)."""
        soft, lab = anatomy.soft, anatomy.labels
        nz, ny, nx = soft.shape
        slabs = np.zeros((ny, pad + nx + pad, PROJECTED, nz), np.float32)

        def lungs() -> np.ndarray:
            return np.isin(lab, LUNG_RIGHT + LUNG_LEFT) * soft

        channels = (lambda: soft, lambda: anatomy.bone, lambda: np.isin(lab, LUNG_RIGHT),
                    lambda: np.isin(lab, LUNG_LEFT), lambda: lab == HEART, lambda: lab == ABDOMEN, lungs)

        def fill(c: int) -> None:
            slabs[:, pad:pad + nx, c] = channels[c]().transpose(1, 2, 0)

        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fill, range(PROJECTED)))
        else:
            for c in range(PROJECTED):
                fill(c)
        return cls(slabs, pad)


def _shear(anatomy: Anatomy, yaw_deg: float) -> tuple[list[np.ndarray], int, int]:
    """Where the ray through each detector column meets each depth (see :func:`_project`), and
    the zero columns needed either side so that no ray reads outside the padded planes."""
    _, dy, dx = anatomy.spacing_mm
    _, ny, nx = anatomy.soft.shape
    theta = math.radians(yaw_deg)
    cos_t, tan_t = math.cos(theta), math.tan(theta)
    xs = np.arange(nx, dtype=np.float64)
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    srcs = [xc + (xs - xc) / cos_t + (j - yc) * dy / dx * tan_t for j in range(ny)]
    pad_lo = max(0, -min(int(np.floor(src[0])) for src in srcs))
    pad_hi = max(0, max(int(np.floor(src[-1])) + 2 for src in srcs) - nx)
    return srcs, pad_lo, pad_hi


def _volume_pad(anatomy: Anatomy, yaws: Iterable[float]) -> int:
    """The zero columns a :class:`ChannelVolume` needs either side to serve every yaw in ``yaws``."""
    return max(max(_shear(anatomy, yaw)[1:]) for yaw in yaws)


def _project(anatomy: Anatomy, yaw_deg: float, volume: ChannelVolume | None = None) -> np.ndarray:
    """Parallel-beam line integrals (cm) of each channel at a yaw (rotation about the body axis).

    The beam runs along y. A yaw ``θ`` is applied as a shear: the ray through detector
    column ``u`` meets depth ``y`` at ``x = u/cos θ + (y - y_c) tan θ`` and its path per voxel
    is ``dy / cos θ`` — exact for a parallel beam up to the ``cos θ`` magnification (< 0.6 %).
    ``volume`` (padded at least as much as this yaw needs) is built here when not given; sharing
    one between yaws spares rebuilding it.
    """
    _, dy, _ = anatomy.spacing_mm
    nz, _, nx = anatomy.soft.shape
    srcs, pad_lo, pad_hi = _shear(anatomy, yaw_deg)
    need = max(pad_lo, pad_hi)
    if volume is None:
        volume = ChannelVolume.of(anatomy, need)
    elif volume.pad < need:
        raise ValueError(f"channel volume padded by {volume.pad}, yaw {yaw_deg} needs {need}")
    off = volume.pad  # zero columns either side: a sheared ray that leaves the CT reads air
    acc = np.zeros((nx, PROJECTED, nz), np.float32)  # column-major, as the slabs
    theta = math.radians(yaw_deg)
    if theta == 0.0:
        for s in volume.slabs:
            acc += s[off:off + nx]
    else:
        a = np.empty_like(acc)
        b = np.empty_like(acc)
        for src, s in zip(srcs, volume.slabs):
            i0 = np.floor(src).astype(np.int64)
            w = (src - i0).astype(np.float32)[:, None, None]
            np.take(s, i0 + off, axis=0, out=a)
            np.take(s, i0 + 1 + off, axis=0, out=b)
            a *= 1 - w  # a (1 - w) + b w, in this order, as float32
            b *= w
            a += b
            acc += a
    out = np.ascontiguousarray(acc.transpose(1, 2, 0))  # (channel, z, x)
    out *= np.float32(dy / 10.0 / math.cos(theta))  # voxel counts → cm along the ray
    return out


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def folded_rows(n: int, pad: int, period: int, below: bool) -> np.ndarray:
    """Source rows for ``pad`` rows beyond one end of ``n`` rows, mirrored back and forth over
    the ``period`` rows nearest that end (a triangle wave), nearest row first."""
    period = max(1, min(period, n))
    d = np.arange(pad) % (2 * period)
    k = np.where(d < period, d, 2 * period - 1 - d)  # 0 .. period-1 .. 0
    return (n - 1 - k) if below else k


def extend_rows(stack: np.ndarray, spine_col: float, lung_rows: tuple[int, int], dz: float,
                dx: float) -> np.ndarray:
    """Add :data:`PAD_ROWS` rows above and below the CT's projection: the body beyond its ends.

    The CT stops at the lower neck and the upper abdomen, and a subject's warp can look past
    both. Repeating the end slices draws every structure they cut as a vertical streak, and
    the radiograph's lower edge shows them. Instead:

    * the :data:`FOLD_MM` nearest each end are mirrored back and forth beyond it (the abdomen
      keeps its texture, the spine goes on as vertebrae), less where the lungs (first and last
      of ``lung_rows``) come nearer the end than that, so that no lung is mirrored; soft
      tissue is blurred sideways a little more with distance so that the folds do not read as
      edges;
    * bone beyond either end fades within :data:`BONE_FADE_MM` to the spine alone
      (:data:`SPINE_HALF_MM` either side of the lungs' midline, with a 10 mm soft edge): the
      ribs, shoulder girdle and pelvis are not there to copy, and copied cuts of them are
      exactly the streaks.

    The lung and heart fields repeat their end rows (empty there), so no organ is mirrored.
    """
    c, n, w = stack.shape
    out = np.empty((c, n + 2 * PAD_ROWS, w), np.float32)
    out[:, PAD_ROWS:PAD_ROWS + n] = stack
    fold = int(round(FOLD_MM / dz))
    periods = {False: min(fold, lung_rows[0]), True: min(fold, n - 1 - lung_rows[1])}
    x = (np.arange(w) - spine_col) * dx
    spine = np.clip((SPINE_HALF_MM + 5.0 - np.abs(x)) / 10.0, 0.0, 1.0).astype(np.float32)
    for below in (False, True):
        src = folded_rows(n, PAD_ROWS, periods[below], below)
        block = stack[:, src]  # (c, PAD_ROWS, w), nearest the CT first
        block[2:] = stack[2:, src[:1]]  # lung and heart fields: the end row (no mirrored organs)
        # bone gets 1 mm of blur only: the spine window already removed what would streak
        block[1] = ndimage.gaussian_filter1d(block[1], 1.0 / dx, axis=-1)
        for d in range(PAD_ROWS):
            sigma_px = (1.0 + 0.15 * d * dz) / dx  # 1 mm at the CT's end, +1.5 mm per cm
            block[0, d] = ndimage.gaussian_filter1d(block[0, d], sigma_px, axis=-1)
            # lateral bone fades out: cut ribs and clavicles end softly, neither streak nor mirror
            block[1, d] *= spine + (1.0 - spine) * np.float32(max(0.0, 1.0 - d * dz / BONE_FADE_MM))
        if below:
            out[:, PAD_ROWS + n:] = block
        else:
            out[:, :PAD_ROWS] = block[:, ::-1]
    return out


def yaw_bin(yaw_deg: float) -> float:
    """The projected yaw a requested yaw is rendered at (the nearest of :data:`YAW_BINS`)."""
    return min(YAW_BINS, key=lambda b: abs(b - yaw_deg))


VOLUME_KEY = ("volume",)  # where preload_volume leaves the volume on ``anatomy.cache``


def preload_volume(anatomy: Anatomy, threads: int = 1) -> None:
    """Build the :class:`ChannelVolume` every yaw bin can share, before knowing which bins a run
    needs: generation does it while the subjects are still being drawn, and the next
    :func:`warm_base_maps` uses it and drops it. Nothing to do when every bin is already
    projected (the bundled CT's shipped maps, :mod:`cxr.phantom.projections`)."""
    if all(("base", yaw) in anatomy.cache for yaw in YAW_BINS):
        return
    anatomy.cache[VOLUME_KEY] = ChannelVolume.of(anatomy, _volume_pad(anatomy, YAW_BINS), threads)


def warm_base_maps(anatomy: Anatomy, yaws: Iterable[float] = YAW_BINS, threads: int = 1) -> None:
    """Project every yaw bin that ``yaws`` need (cached on ``anatomy``); a parent process calls
    it before forking workers, so they share the maps instead of each projecting the CT.

    Several bins share one :class:`ChannelVolume` (the one :func:`preload_volume` left, or one
    built here; dropped afterwards either way) instead of each rebuilding the planes.
    ``threads`` > 1 projects several bins at once: the work is whole-array numpy, which
    releases the GIL, and the workers are not running yet. Each bin is computed alone, so the
    maps are the same whatever the thread count.
    """
    volume = anatomy.cache.pop(VOLUME_KEY, None)  # from preload_volume; dropped once used
    todo = sorted({yaw_bin(y) for y in yaws} - {key[1] for key in anatomy.cache if key[0] == "base"})
    if not todo:
        return
    if volume is None and len(todo) > 1:
        volume = ChannelVolume.of(anatomy, _volume_pad(anatomy, todo), threads)
    if threads <= 1 or len(todo) <= 1:
        for yaw in todo:
            base_maps(anatomy, yaw, volume)
        return
    from concurrent.futures import ThreadPoolExecutor

    # the costly (sheared) bins first, so the cheap straight one fills the gap at the end
    todo.sort(key=lambda yaw: yaw == 0.0)
    with ThreadPoolExecutor(min(threads, len(todo))) as pool:
        list(pool.map(lambda yaw: base_maps(anatomy, yaw, volume), todo))


def base_maps(anatomy: Anatomy, yaw_deg: float, volume: ChannelVolume | None = None) -> BaseMaps:
    """The projection at the nearest yaw bin, computed once per anatomy and cached on it."""
    yaw = yaw_bin(yaw_deg)
    key = ("base", yaw)
    if key in anatomy.cache:
        return anatomy.cache[key]
    p = _project(anatomy, yaw, volume)
    soft, bone, lr_thk, ll_thk, heart_thk, abd_thk, lung_soft = p[:7]
    heart = ndimage.binary_opening(heart_thk > HEART_MIN_CM, iterations=2)
    heart = ndimage.binary_fill_holes(_largest(heart))
    free = ~heart & (abd_thk < ABDOMEN_MIN_CM)
    lung_r = ndimage.binary_fill_holes(_largest((lr_thk > LUNG_MIN_CM) & free))
    lung_l = ndimage.binary_fill_holes(_largest((ll_thk > LUNG_MIN_CM) & free))
    fields = [ndimage.gaussian_filter(m.astype(np.float32), 0.7) for m in (lung_r, lung_l, heart)]
    stack = np.stack([soft, bone, fields[0], fields[1], fields[2], lr_thk + ll_thk, lung_soft])
    dz, _, dx = anatomy.spacing_mm
    lungs = lung_r | lung_l
    rows = np.flatnonzero(lungs.any(axis=1))
    cols = np.flatnonzero(lungs.any(axis=0))
    stack = extend_rows(stack, (cols[0] + cols[-1]) / 2.0, (int(rows[0]), int(rows[-1])), dz, dx)
    stack = np.pad(stack, ((0, 0), (0, 0), (PAD_COLS, PAD_COLS)), mode="constant")
    hz, hx = np.nonzero(heart)
    base = BaseMaps(
        maps=torch.from_numpy(np.ascontiguousarray(stack))[None],
        dx=float(dx), dz=float(dz),
        x_center=float((cols[0] + cols[-1]) / 2 * dx),
        apex_z=float(rows[0] * dz),
        heart_center=(float(hx.mean() * dx), float(hz.mean() * dz)),
        heart_radii=(float((hx.max() - hx.min() + 1) / 2 * dx), float((hz.max() - hz.min() + 1) / 2 * dz)),
    )
    anatomy.cache[key] = base
    return base


def subject_params(subject: Subject) -> dict[str, float]:
    """The subject's pose/habitus values over the neutral defaults, finding effects applied."""
    p = dict(DEFAULT_PARAMS)
    for k, v in subject.params.items():
        if k in p:
            p[k] = float(v)
    for k, factor in lesion_mod.geometry_effects(subject.findings, subject.severity).items():
        p[k] *= factor
    return p


def _elastic(rng: np.random.Generator, t: np.ndarray, amp: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random displacement (mm) on the grid ``t`` × ``t`` (mm from the field centre).

    Sum of the 3 × 3 lowest cosine modes over the field with N(0, amp) coefficients per axis:
    smooth on the scale of a quarter field, evaluated as two small matrix products.
    """
    k = np.arange(1, 4)[None, :]
    basis = np.cos(np.pi * k * (t[:, None] / FOV_MM + 0.5)) / k  # (n, 3), softer high modes
    c = rng.normal(0.0, amp, (2, 3, 3))
    return basis @ c[0] @ basis.T, basis @ c[1] @ basis.T


def sampling_grid(base: BaseMaps, p: dict[str, float], size: int, rng: np.random.Generator) -> torch.Tensor:
    """Output pixel → base-map position, as a ``(1, size, size, 2)`` grid for ``grid_sample``.

    Composed backwards from the output: shift, in-plane rotation, habitus scale (about the field
    centre), inspiration (vertical stretch below the lung apex), heart enlargement (radial,
    fading to identity at 1.8 heart radii), elastic displacement. Every step is smooth, so it is
    computed on a coarse grid and upsampled.
    """
    n = min(size, 40)
    half = FOV_MM / 2
    step = FOV_MM / size
    t = np.linspace(-half + step / 2, half - step / 2, n)
    u = t[None, :] - p["tx_mm"]  # right (mm from the field centre)
    v = t[:, None] - p["tz_mm"]  # down
    a = math.radians(p["roll_deg"])
    u, v = math.cos(a) * u + math.sin(a) * v, -math.sin(a) * u + math.cos(a) * v
    x = u / p["width_scale"] + base.x_center
    z = v / p["height_scale"] + (FOV_TOP_MM + half)
    z = np.where(z > base.apex_z, base.apex_z + (z - base.apex_z) / p["inspiration"], z)
    (hx, hz), (rx, rz) = base.heart_center, base.heart_radii
    if p["heart_scale"] != 1.0:
        r = np.sqrt(((x - hx) / rx) ** 2 + ((z - hz) / rz) ** 2)
        w = np.clip((1.8 - r) / 0.8, 0.0, 1.0)
        g = 1.0 + (1.0 / p["heart_scale"] - 1.0) * w * w * (3 - 2 * w)  # smoothstep to 1.8 radii
        x, z = hx + (x - hx) * g, hz + (z - hz) * g
    if p["elastic_mm"] > 0:
        dx, dz = _elastic(rng, t, p["elastic_mm"])
        x, z = x + dx, z + dz
    rows, cols = base.maps.shape[-2:]
    gx = (2 * (x / base.dx + PAD_COLS) + 1) / cols - 1  # pixel centres, align_corners=False
    gz = (2 * (z / base.dz + PAD_ROWS) + 1) / rows - 1
    grid = torch.from_numpy(np.stack([gx, gz]).astype(np.float32))[None]
    if n != size:
        grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)
    return grid.permute(0, 2, 3, 1)  # grid_sample reads the strided view as fast as a copy


def _child_seed(seed: int, k: int) -> np.random.SeedSequence:
    """``SeedSequence(seed).spawn(2)[k]`` (the warp's stream, 0, and the lesions', 1), built
    directly: the same state, without making the parent and both children every time."""
    return np.random.SeedSequence(seed, spawn_key=(k,))


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise CxrError(f"render: size must be an integer >= 16, got {size!r}")
    return int(size)


def prepare(subject: Subject, anatomy: Anatomy, size: int = 256) -> lesion_mod.Canvas:
    """The subject's warped anatomy on a ``size``² grid, before any lesion: the canvas that
    :func:`cxr.phantom.lesions.insert_findings` edits."""
    size = _check_size(size)
    p = subject_params(subject)
    warp_seq = _child_seed(subject.seed, 0)
    base = base_maps(anatomy, p["yaw_deg"])
    grid = sampling_grid(base, p, size, np.random.default_rng(warp_seq))

    def sample(first: int, stop: int) -> np.ndarray:
        # Channels are resampled independently, so sampling a subset gives the same values.
        out = F.grid_sample(base.maps[:, first:stop], grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out[0].numpy()

    ch = sample(SOFT, LUNG_L + 1)
    soft = np.ascontiguousarray(ch[SOFT])
    bone = ch[BONE] * np.float32(p["bone_density"])
    if p["soft_tissue_cm"] != 0.0:
        # Extra (or less) fat front and back: uniform over the trunk, tapering at its edges.
        soft += np.float32(p["soft_tissue_cm"]) * np.clip(soft / 6.0, 0.0, 1.0)
        np.maximum(soft, 0.0, out=soft)
    lung_mask = (ch[LUNG_R] > 0.5).astype(np.uint8)
    lung_mask[(ch[LUNG_L] > 0.5) & (lung_mask == 0)] = 2
    # Sampled only if something reads them: the lung paths for lesions, the heart for heart
    # lesions and the projection's heart mask (a phantom run's workers never read that).
    return lesion_mod.Canvas(
        soft=soft, bone=bone, lung_mask=lung_mask, heart_mask=lambda: sample(HEART_F, HEART_F + 1)[0] > 0.5,
        lung_paths=lambda: tuple(sample(LUNG_THK, LUNG_SOFT + 1)),
        mm_per_px=FOV_MM / size,
    )


def render(subject: Subject, anatomy: Anatomy, size: int = 256,
           config: lesion_mod.LesionConfig = lesion_mod.DEFAULT_CONFIG) -> Projection:
    """Line integrals, anatomy masks and lesions of one subject on a ``size``² grid (PA view).

    Fills ``soft``/``bone`` (cm, float32; ``soft`` ≈ 3–40, ``bone`` ≈ 0–6, both ≥ 0),
    ``body_mask``, ``lung_mask`` (1 image-left = patient's right lung, 2 image-right),
    ``heart_mask``, ``lesions`` and ``pixel_spacing_mm`` (= 350 mm / size).
    """
    canvas = prepare(subject, anatomy, size)
    lesion_seq = _child_seed(subject.seed, 1)
    found = lesion_mod.insert_findings(canvas, subject.findings, subject.severity,
                                       np.random.default_rng(lesion_seq), config)
    np.maximum(canvas.soft, 0.0, out=canvas.soft)
    return Projection(
        subject=subject, soft=canvas.soft, bone=canvas.bone, body_mask=canvas.soft > 0.5,
        lung_mask=canvas.lung_mask, heart_mask=deferred(canvas, "heart_mask"), lesions=found,
        pixel_spacing_mm=FOV_MM / size,
    )
