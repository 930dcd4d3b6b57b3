"""Findings inserted into a rendered projection, each with its 2D mask and tight box.

Every lesion changes the line integrals the way the disease changes the chest, in cm of
water-equivalent path (see ``docs/phantom_findings.md`` for the table):

* **solid** lesions (nodules, masses, cavity walls, plate atelectasis) are ellipsoids whose
  parallel-beam line integral is analytic, ``L(x, y) = D·sqrt(1 − (x'/a)² − (y'/b)²)``; the
  soft integral grows by ``L·(1 − ρ_lung)·c`` (tissue replacing aerated lung, contrast ``c``);
* **airspace** disease (consolidation, pneumonia, infiltration, edema, ground glass) fills a
  fraction ``φ·f(x, y)`` of the ray's own lung path ``T`` with material of density ``ρ_fill``:
  ``ΔS = φ·f·max(ρ_fill·T − S_lung, 0)``, ``S_lung`` being the lung tissue already on the ray,
  so the opacity follows the real lung depth (denser at the bases, fading at the edges);
* **air** (cavity centres, pneumothorax, emphysema, hernia gas) removes tissue: a pneumothorax
  rim loses all its lung tissue ``S_lung`` and with it every vessel marking.

Lesions are confined to their region (a lung field for lung findings, the heart for cardiomegaly
and hiatal hernia, the pleural space for effusions: a lung field and the posterior recess below
it): the mask is where the lesion changes the image inside that region, and the box is tight
around the mask. Sizes and contrasts scale with the subject's ``severity`` through
``sqrt(severity)``; ranges are in :class:`LesionConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from cxr.errors import CxrError
from cxr.phantom.types import Deferred, Lesion

TB = "Tuberculosis"


@dataclass(frozen=True)
class LesionConfig:
    """Size (mm), contrast and count ranges of every finding; ``(lo, hi)`` are uniform draws
    before the severity scaling (size × sqrt(severity), contrast × sqrt(severity), capped)."""

    solid_contrast: float = 0.9  # fraction of (1 - ρ_lung) a solid lesion adds per cm of path
    nodule_mm: tuple[float, float] = (8.0, 26.0)
    nodule_calcified_p: float = 0.15
    mass_mm: tuple[float, float] = (32.0, 60.0)
    tb_nodule_mm: tuple[float, float] = (3.0, 9.0)
    tb_cluster_n: tuple[int, int] = (3, 9)
    tb_cluster_mm: tuple[float, float] = (18.0, 36.0)  # spread of a nodule cluster
    cavity_mm: tuple[float, float] = (14.0, 34.0)  # outer diameter
    cavity_wall: tuple[float, float] = (0.10, 0.18)  # wall thickness / outer radius
    tb_consolidation_mm: tuple[float, float] = (28.0, 60.0)
    tb_consolidation_phi: tuple[float, float] = (0.20, 0.45)
    fibrotic_n: tuple[int, int] = (3, 7)
    fibrotic_len_mm: tuple[float, float] = (18.0, 45.0)
    miliary_per_cm2: tuple[float, float] = (8.0, 20.0)  # projected nodules per cm² of lung field
    miliary_mm: tuple[float, float] = (1.2, 3.0)
    consolidation_mm: tuple[float, float] = (35.0, 75.0)
    consolidation_phi: tuple[float, float] = (0.45, 0.75)
    pneumonia_mm: tuple[float, float] = (45.0, 90.0)
    pneumonia_phi: tuple[float, float] = (0.35, 0.65)
    infiltration_mm: tuple[float, float] = (25.0, 60.0)
    infiltration_phi: tuple[float, float] = (0.18, 0.38)
    edema_mm: tuple[float, float] = (60.0, 100.0)
    edema_phi: tuple[float, float] = (0.22, 0.42)
    covid_mm: tuple[float, float] = (40.0, 80.0)
    covid_phi: tuple[float, float] = (0.25, 0.5)
    effusion_height_mm: tuple[float, float] = (15.0, 70.0)
    pneumothorax_mm: tuple[float, float] = (8.0, 30.0)  # rim width
    pleural_thickening_mm: tuple[float, float] = (3.0, 8.0)
    pleural_thickening_cm: tuple[float, float] = (1.2, 2.5)  # tangential path of the band
    atelectasis_len_mm: tuple[float, float] = (28.0, 60.0)
    atelectasis_thick_mm: tuple[float, float] = (3.0, 9.0)
    fibrosis_cm: tuple[float, float] = (0.35, 0.8)
    emphysema_lucency: tuple[float, float] = (0.2, 0.4)  # fraction of lung tissue removed
    hernia_mm: tuple[float, float] = (40.0, 70.0)
    cardiomegaly_scale: tuple[float, float] = (1.25, 0.10)  # heart scale = a + b·min(severity, 2)
    aorta_mm: tuple[float, float] = (8.0, 16.0)  # bulge of an enlarged aortic knob
    calcification_mm: tuple[float, float] = (2.0, 6.0)


DEFAULT_CONFIG = LesionConfig()


# ------------------------------------------------------------------------------------------
# The canvas: the projection being edited and its anatomy, in output pixels
# ------------------------------------------------------------------------------------------

@dataclass
class Side:
    """One lung field: mask, box, and which way is lateral (x decreasing for the image-left)."""

    code: int  # 1 image-left lung (patient's right), 2 image-right lung (patient's left)
    mask: np.ndarray
    r0: int
    r1: int
    c0: int
    c1: int
    lateral: int  # -1: lateral is toward x = 0; +1: toward x = W

    @property
    def height(self) -> int:
        return self.r1 - self.r0

    @property
    def width(self) -> int:
        return self.c1 - self.c0

    def zone(self, name: str) -> tuple[int, int]:
        """Rows of the upper / middle / lower third of the field, or all of it."""
        h = self.height
        cut = {"upper": (0, 1 / 3), "middle": (1 / 3, 2 / 3), "lower": (2 / 3, 1.0),
               "upper_mid": (0, 2 / 3), "mid_lower": (1 / 3, 1.0), "any": (0, 1.0)}[name]
        return self.r0 + int(cut[0] * h), max(self.r0 + int(math.ceil(cut[1] * h)), self.r0 + 1)


@dataclass
class Canvas:
    """The projection under construction; generators add to ``soft``/``bone`` in place.

    ``heart_mask`` and ``lung_paths`` (the pair lung_thk, lung_soft) may be given as functions
    (:class:`~cxr.phantom.types.Deferred`): only some lesions read them, so a renderer can
    leave them unsampled for the subjects that have none.
    """

    soft: np.ndarray
    bone: np.ndarray
    lung_mask: np.ndarray
    heart_mask: np.ndarray = Deferred()  # type: ignore[assignment]
    lung_paths: tuple[np.ndarray, np.ndarray] = Deferred()  # type: ignore[assignment]
    mm_per_px: float
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.soft.shape  # type: ignore[return-value]

    @property
    def lung_thk(self) -> np.ndarray:
        """cm of lung on each ray."""
        return self.lung_paths[0]

    @property
    def lung_soft(self) -> np.ndarray:
        """cm water-equivalent of lung tissue on each ray."""
        return self.lung_paths[1]

    def px(self, mm: float) -> float:
        return mm / self.mm_per_px

    def side(self, code: int) -> Side | None:
        key = ("side", code)
        if key not in self.cache:
            m = self.lung_mask == code
            rows = np.flatnonzero(m.any(axis=1))
            cols = np.flatnonzero(m.any(axis=0))
            self.cache[key] = None if rows.size == 0 else Side(
                code, m, int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1,
                -1 if code == 1 else 1)
        return self.cache[key]

    def sides(self) -> list[Side]:
        return [s for s in (self.side(1), self.side(2)) if s is not None]

    def depth_from_edge(self, side: Side) -> np.ndarray:
        """Distance (px) of each pixel of the side's box to the edge of its lung field."""
        key = ("dist", side.code)
        if key not in self.cache:
            win = side.mask[side.r0:side.r1, side.c0:side.c1]
            self.cache[key] = ndimage.distance_transform_edt(np.pad(win, 1))[1:-1, 1:-1]
        return self.cache[key]

    def pick_depth(self, side: Side) -> np.ndarray:
        """A cheap (taxicab) distance to the field's edge, px: only used to pick lesion sites."""
        key = ("cdt", side.code)
        if key not in self.cache:
            win = side.mask[side.r0:side.r1, side.c0:side.c1]
            self.cache[key] = ndimage.distance_transform_cdt(np.pad(win, 1), metric="taxicab")[1:-1, 1:-1]
        return self.cache[key]

    def lung_density(self, sl: tuple[slice, slice]) -> np.ndarray:
        """Mean density of the lung along each ray of a window (≈ 0.1–0.3 g/cm³)."""
        t = self.lung_thk[sl]
        return np.where(t > 0.5, self.lung_soft[sl] / np.maximum(t, 0.5), 0.2).clip(0.0, 0.9)


# ------------------------------------------------------------------------------------------
# Primitives
# ------------------------------------------------------------------------------------------

def window(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> tuple[slice, slice]:
    """Pixel window around a centre, clipped to the image (never empty)."""
    h, w = shape
    y0 = min(max(math.floor(cy - ry), 0), h - 1)
    x0 = min(max(math.floor(cx - rx), 0), w - 1)
    y1 = min(max(math.ceil(cy + ry) + 1, y0 + 1), h)
    x1 = min(max(math.ceil(cx + rx) + 1, x0 + 1), w)
    return slice(int(y0), int(y1)), slice(int(x0), int(x1))


def ellipsoid_path(sl: tuple[slice, slice], cy: float, cx: float, a: float, b: float,
                   depth_cm: float, angle: float = 0.0) -> np.ndarray:
    """Line integral (cm) through an ellipsoid: semi-axes ``a``, ``b`` (px) in the image plane
    rotated by ``angle`` (rad), full depth ``depth_cm`` along the beam (exact, parallel beam)."""
    yy = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None] - np.float32(cy)
    xx = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :] - np.float32(cx)
    c, s = math.cos(angle), math.sin(angle)
    u = (xx * c + yy * s) / max(a, 0.35)
    v = (-xx * s + yy * c) / max(b, 0.35)
    return np.float32(depth_cm) * np.sqrt(np.clip(1.0 - u * u - v * v, 0.0, None))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise smoothed on ``sigma`` pixels."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(sigma, 0.5), mode="wrap")
    return n / max(float(n.std()), 1e-6)


def blob_field(rng: np.random.Generator, sl: tuple[slice, slice], cy: float, cx: float,
               radius: float, n_blobs: int, texture: float = 0.3) -> np.ndarray:
    """An irregular patch in [0, 1): a blob at the centre plus satellites, mottled by noise."""
    yy = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None]
    xx = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :]
    acc = np.zeros((yy.shape[0], xx.shape[1]), np.float32)
    for k in range(n_blobs):
        if k == 0:
            by, bx, r = cy, cx, radius * 0.55
        else:
            ang = rng.uniform(0, 2 * math.pi)
            d = rng.uniform(0.2, 0.6) * radius
            by, bx, r = cy + d * math.sin(ang), cx + d * math.cos(ang), radius * rng.uniform(0.3, 0.5)
        r = max(r, 0.7)
        acc += np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * r * r))
    f = 1.0 - np.exp(-2.0 * acc)
    if texture > 0 and min(acc.shape) > 2:
        f *= np.clip(1.0 - texture * 0.5 + texture * 0.5 * smooth_noise(rng, acc.shape, max(radius / 6, 0.7)), 0.0, 1.0)
    return f


def _mask_lesion(finding: str, kind: str, shape: tuple[int, int], sl: tuple[slice, slice],
                 local: np.ndarray, region: str = "lung") -> Lesion | None:
    """A full-size mask and tight box from a window's local mask; None if empty."""
    ys, xs = np.nonzero(local)
    if ys.size == 0:
        return None
    mask = np.zeros(shape, bool)
    mask[sl] = local
    y0, x0 = sl[0].start, sl[1].start
    box = (int(x0 + xs.min()), int(y0 + ys.min()), int(x0 + xs.max() + 1), int(y0 + ys.max() + 1))
    return Lesion(finding=finding, kind=kind, mask=mask, box=box, region=region)


def _cut(f: np.ndarray, level: float) -> np.ndarray:
    """Zero a soft field below ``level`` and rescale the rest to [0, 1], continuously."""
    return np.clip((f - np.float32(level)) / np.float32(max(1.0 - level, 1e-6)), 0.0, 1.0)


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _scale(severity: float) -> float:
    return math.sqrt(float(np.clip(severity, 0.1, 6.0)))


def _pick(canvas: Canvas, rng: np.random.Generator, side: Side, zone: str = "any",
          min_depth_px: float = 0.0, lateral: float | None = None) -> tuple[int, int]:
    """A random point of a lung field's zone, at least ``min_depth_px`` inside its edge;
    ``lateral`` in (0, 1) restricts to that outer fraction of the field's width. Constraints
    are dropped one by one when nothing satisfies them."""
    win = side.mask[side.r0:side.r1, side.c0:side.c1]
    ra, rb = side.zone(zone)

    def outer(cols: np.ndarray) -> np.ndarray:  # cols: offsets in the window
        frac = cols / max(side.width - 1, 1)
        return frac <= lateral if side.lateral < 0 else frac >= 1 - lateral

    # Rejection sampling inside the zone's rows is cheap and usually succeeds at once; the
    # tests run on the 16 candidates only, the whole-window masks only if all of them fail.
    ys = rng.integers(ra - side.r0, max(rb - side.r0, ra - side.r0 + 1), 16)
    xs = rng.integers(0, side.width, 16)
    yc = ys.clip(0, win.shape[0] - 1)
    ok = win[yc, xs] & (yc + side.r0 >= ra) & (yc + side.r0 < rb)
    if lateral is not None:
        ok &= outer(xs)
    if min_depth_px > 0:
        ok &= canvas.pick_depth(side)[yc, xs] >= min_depth_px
    hit = np.flatnonzero(ok)
    if hit.size:
        return side.r0 + int(ys[hit[0]]), side.c0 + int(xs[hit[0]])
    rows = np.arange(side.r0, side.r1)
    in_zone = win & ((rows >= ra) & (rows < rb))[:, None]
    cand = in_zone if lateral is None else in_zone & outer(np.arange(side.width))[None, :]
    deep = cand & (canvas.pick_depth(side) >= min_depth_px) if min_depth_px > 0 else cand
    for m in (deep, cand, in_zone, win):
        ys, xs = np.nonzero(m)
        if ys.size:
            i = int(rng.integers(ys.size))
            return side.r0 + int(ys[i]), side.c0 + int(xs[i])
    return (side.r0 + side.r1) // 2, (side.c0 + side.c1) // 2


def _choose_side(canvas: Canvas, rng: np.random.Generator, right_bias: float = 0.5) -> Side:
    sides = canvas.sides()
    if len(sides) == 1:
        return sides[0]
    return sides[0] if rng.random() < right_bias else sides[1]


def _region(canvas: Canvas, side: Side | None, sl: tuple[slice, slice]) -> np.ndarray:
    return (canvas.lung_mask[sl] == side.code) if side is not None else (canvas.lung_mask[sl] > 0)


# ------------------------------------------------------------------------------------------
# Lesion makers: each edits the canvas and returns its lesions
# ------------------------------------------------------------------------------------------

def solid(canvas: Canvas, side: Side, cy: float, cx: float, a: float, b: float, depth_cm: float,
          contrast: float, angle: float, calcified: bool = False) -> tuple[tuple[slice, slice], np.ndarray]:
    """An ellipsoid of soft tissue replacing aerated lung; returns its window and local mask."""
    r = max(a, b) + 1
    sl = window(canvas.shape, cy, cx, r, r)
    path = ellipsoid_path(sl, cy, cx, a, b, depth_cm, angle)
    path = np.minimum(path, canvas.lung_thk[sl]) * _region(canvas, side, sl)
    canvas.soft[sl] += path * (1.0 - canvas.lung_density(sl)) * np.float32(contrast)
    if calcified:
        canvas.bone[sl] += path * np.float32(0.35)
    return sl, path > 0


def add_solid(canvas: Canvas, rng: np.random.Generator, finding: str, kind: str, side: Side,
              cy: float, cx: float, a: float, b: float, depth_cm: float, contrast: float,
              angle: float | None = None, calcified: bool = False) -> Lesion | None:
    """:func:`solid` as one lesion (random orientation unless ``angle`` is given)."""
    angle = float(rng.uniform(0, math.pi)) if angle is None else angle
    sl, local = solid(canvas, side, cy, cx, a, b, depth_cm, contrast, angle, calcified)
    return _mask_lesion(finding, kind, canvas.shape, sl, local)


class _Union:
    """Accumulates local masks of a lesion made of pieces (a nodule cluster, streaks)."""

    def __init__(self, shape: tuple[int, int]):
        self.mask = np.zeros(shape, bool)
        self.any = False

    def add(self, sl: tuple[slice, slice], local: np.ndarray) -> None:
        self.mask[sl] |= local
        self.any = self.any or bool(local.any())

    def lesion(self, finding: str, kind: str) -> Lesion | None:
        if not self.any:
            return None
        full = (slice(0, self.mask.shape[0]), slice(0, self.mask.shape[1]))
        return _mask_lesion(finding, kind, self.mask.shape, full, self.mask)


def add_airspace(canvas: Canvas, rng: np.random.Generator, finding: str, kind: str, side: Side,
                 cy: float, cx: float, radius: float, phi: float, rho_fill: float,
                 n_blobs: int = 4, texture: float = 0.3, threshold: float = 0.2) -> Lesion | None:
    """Airspace opacity: a patch filling a fraction of the lung path with fluid/cells.

    The patch field is cut at ``threshold`` (and rescaled to stay continuous), so the lesion's
    mask holds every pixel it changes."""
    sl = window(canvas.shape, cy, cx, radius * 1.3, radius * 1.3)
    f = blob_field(rng, sl, cy, cx, radius, n_blobs, texture) * _region(canvas, side, sl)
    f = _cut(f, min(threshold, 0.9 * float(f.max())))
    fill = np.maximum(np.float32(rho_fill) * canvas.lung_thk[sl] - canvas.lung_soft[sl], 0.0)
    canvas.soft[sl] += np.float32(phi) * f * fill
    return _mask_lesion(finding, kind, canvas.shape, sl, f > 0)


def nodule(canvas, rng, sev, cfg, finding="Nodule", side=None, zone="any"):
    s = _scale(sev)
    side = side or _choose_side(canvas, rng)
    d = canvas.px(_uniform(rng, cfg.nodule_mm) * s)
    cy, cx = _pick(canvas, rng, side, zone, min_depth_px=d / 2)
    les = add_solid(canvas, rng, finding, "nodule", side, cy, cx, d / 2, d / 2 * rng.uniform(0.85, 1.15),
                    d * canvas.mm_per_px / 10, min(1.0, cfg.solid_contrast * s),
                    calcified=bool(rng.random() < cfg.nodule_calcified_p))
    return [les]


def mass(canvas, rng, sev, cfg, finding="Mass", side=None):
    """A lobulated mass: the union (max of paths) of 2–4 overlapping ellipsoids."""
    s = _scale(sev)
    side = side or _choose_side(canvas, rng)
    d = canvas.px(_uniform(rng, cfg.mass_mm) * s)
    d = min(d, 0.8 * min(side.width, side.height))
    cy, cx = _pick(canvas, rng, side, "upper_mid", min_depth_px=d / 3)
    sl = window(canvas.shape, cy, cx, d, d)
    path = np.zeros((sl[0].stop - sl[0].start, sl[1].stop - sl[1].start), np.float32)
    depth = d * canvas.mm_per_px / 10
    for k in range(int(rng.integers(2, 5))):
        off = 0 if k == 0 else d * 0.25
        ang = rng.uniform(0, 2 * math.pi)
        rr = d / 2 * (1.0 if k == 0 else rng.uniform(0.45, 0.7))
        path = np.maximum(path, ellipsoid_path(sl, cy + off * math.sin(ang), cx + off * math.cos(ang),
                                               rr, rr * rng.uniform(0.75, 1.0), depth * rr / (d / 2),
                                               rng.uniform(0, math.pi)))
    path = np.minimum(path, canvas.lung_thk[sl]) * _region(canvas, side, sl)
    canvas.soft[sl] += path * (1.0 - canvas.lung_density(sl)) * np.float32(min(1.0, cfg.solid_contrast * s))
    return [_mask_lesion(finding, "mass", canvas.shape, sl, path > 0)]


def _airspace_finding(kind: str, size_key: str, phi_key: str, rho_fill: float, zones: tuple[str, ...],
                      texture: float, n_patches: tuple[int, int] = (1, 1), lateral: float | None = None,
                      bilateral: bool = False) -> Callable:
    def make(canvas, rng, sev, cfg, finding):
        s = _scale(sev)
        out = []
        sides = canvas.sides() if bilateral else [_choose_side(canvas, rng)]
        for side in sides:
            for _ in range(int(rng.integers(n_patches[0], n_patches[1] + 1))):
                radius = canvas.px(_uniform(rng, getattr(cfg, size_key)) * s) / 2
                radius = min(radius, 0.45 * max(side.width, side.height))
                zone = zones[int(rng.integers(len(zones)))]
                cy, cx = _pick(canvas, rng, side, zone, min_depth_px=min(radius / 3, side.width / 6), lateral=lateral)
                phi = min(0.95, _uniform(rng, getattr(cfg, phi_key)) * s)
                out.append(add_airspace(canvas, rng, finding, kind, side, cy, cx, radius, phi, rho_fill,
                                        n_blobs=int(rng.integers(3, 7)), texture=texture))
        return out
    return make


consolidation = _airspace_finding("consolidation", "consolidation_mm", "consolidation_phi", 1.0,
                                  ("upper", "middle", "lower", "lower"), texture=0.15)
pneumonia = _airspace_finding("pneumonia", "pneumonia_mm", "pneumonia_phi", 1.0,
                              ("middle", "lower", "lower", "upper"), texture=0.25)
infiltration = _airspace_finding("infiltration", "infiltration_mm", "infiltration_phi", 0.8,
                                 ("upper", "middle", "lower"), texture=0.5, n_patches=(1, 2))
covid = _airspace_finding("ground_glass", "covid_mm", "covid_phi", 0.6, ("lower", "middle", "lower"),
                          texture=0.45, lateral=0.4, bilateral=True)


def edema(canvas, rng, sev, cfg, finding="Edema"):
    """Bilateral perihilar ("bat-wing") haze, densest at the hila, fading to the periphery."""
    s = _scale(sev)
    out = []
    for side in canvas.sides():
        ra, rb = side.zone("middle")
        cy = (ra + rb) / 2 - 0.05 * side.height
        row = side.mask[int(np.clip(cy, side.r0, side.r1 - 1)), side.c0:side.c1]
        xs = np.flatnonzero(row)
        medial = (side.c0 + xs.max()) if side.lateral < 0 else (side.c0 + xs.min()) if xs.size else (side.c0 + side.c1) / 2
        cx = medial + side.lateral * 0.22 * side.width
        radius = min(canvas.px(_uniform(rng, cfg.edema_mm) * s) / 2, 0.5 * side.height)
        phi = min(0.9, _uniform(rng, cfg.edema_phi) * s)
        out.append(add_airspace(canvas, rng, finding, "perihilar_edema", side, cy, cx, radius, phi, 0.8,
                                n_blobs=5, texture=0.25, threshold=0.25))
    return out


def effusion(canvas, rng, sev, cfg, finding="Effusion", side=None, kind="effusion"):
    """Pleural fluid: fills the costophrenic recess and rises along the lateral wall (meniscus).

    The fluid surface is ``dome + 0.3h − h·t²`` (rows; ``t`` 0 medial → 1 lateral, ``h`` the
    height of the meniscus above the dome): a small effusion only blunts the lateral angle, a
    large one hides the hemidiaphragm.
    """
    s = _scale(sev)
    sides = [side] if side is not None else (canvas.sides() if rng.random() < 0.3 else [_choose_side(canvas, rng, 0.55)])
    out = []
    for sd in sides:
        h = max(canvas.px(_uniform(rng, cfg.effusion_height_mm) * s), 2.0)
        h = min(h, 0.5 * sd.height)
        sl = (slice(sd.r0, sd.r1), slice(sd.c0, sd.c1))
        win = sd.mask[sl]
        has = win.any(axis=0)
        bottom = np.where(has, sd.r0 + win.shape[0] - 1 - np.argmax(win[::-1], axis=0), -1)
        t = (np.arange(sd.c0, sd.c1, dtype=np.float32) - sd.c0) / max(sd.width - 1, 1)
        t = 1.0 - t if sd.lateral < 0 else t  # 0 medial, 1 lateral
        central = has & (t > 0.3) & (t < 0.7)
        dome = float(np.min(bottom[central])) if central.any() else float(bottom[has].min())
        surface = dome + 0.3 * h - h * t ** 2
        # The collection runs on below the lung field's lower edge: a PA ray there still
        # crosses the posterior costophrenic recess behind the diaphragm. Cut at the field's
        # edge, the fluid drew that edge (a stepped line with a dark halo) instead of hiding it.
        r1 = min(canvas.shape[0], sd.r1 + int(canvas.px(30.0)))
        sl = (slice(sd.r0, r1), slice(sd.c0, sd.c1))
        field = sd.mask[sl]
        thk = canvas.lung_thk[sl]
        rows = np.arange(sd.r0, r1, dtype=np.float32)[:, None]
        # Fluid thins out toward its top (it layers posteriorly): a hazy upper border.
        ramp = max(0.45 * h, 1.5)
        f = np.clip((rows - surface[None, :] + 0.3 * ramp) / ramp, 0.0, 1.0)
        f = f * f * (3 - 2 * f) * (field | (thk > 0.3))
        # Keep the fluid connected to the lateral recess (one pleural collection).
        lab, n = ndimage.label(f > 0.5)
        if n > 1:
            lat_col = int(np.argmax(np.where(has, t, -1)))
            ids = [i for i in np.unique(lab[:, lat_col]) if i]
            keep = ids[0] if ids else int(np.bincount(lab.ravel())[1:].argmax()) + 1
            # a soft cut: a binary one leaves a pixel-stepped, ringing edge
            kept = ndimage.binary_dilation(lab == keep, iterations=2).astype(np.float32)
            f *= ndimage.gaussian_filter(kept, sigma=1.0, mode="nearest")
        f = _cut(f, min(0.2, 0.9 * float(f.max())))
        # Fluid replaces the aerated lung on each ray, plus a pleural layer that fades out where
        # the lung path ends (so the collection has no step where the lung does).
        fill = np.maximum(thk - canvas.lung_soft[sl], 0.0) * np.float32(0.9) \
            + np.float32(1.5) * np.clip((thk - 1.0) / 3.0, 0.0, 1.0)
        # Soften the collection's outline by ~2 mm: fluid has no pixel-sharp border, and a hard
        # step rings (dark halo) through the DR chain's range compression and edge enhancement.
        added = ndimage.gaussian_filter(f * fill, sigma=max(canvas.px(2.0), 0.5), mode="nearest")
        canvas.soft[sl] += added * np.float32(min(1.0, 0.8 * s))
        out.append(_mask_lesion(finding, kind, canvas.shape, sl, added > 0, region="pleura"))
    return out


def pneumothorax(canvas, rng, sev, cfg, finding="Pneumothorax"):
    """Pleural air over the apex and lateral wall: the rim loses its lung tissue (no markings),
    the collapsed lung edge gains it back, and a thin visceral pleural line separates them."""
    s = _scale(sev)
    side = _choose_side(canvas, rng)
    w = max(canvas.px(_uniform(rng, cfg.pneumothorax_mm) * s), 2.0)
    w = min(w, 0.3 * side.width)
    sl = (slice(side.r0, side.r1), slice(side.c0, side.c1))
    dist = canvas.depth_from_edge(side)
    yrel = (np.arange(side.r0, side.r1, dtype=np.float32)[:, None] - side.r0) / max(side.height, 1)
    xrel = (np.arange(side.c0, side.c1, dtype=np.float32)[None, :] - (side.c0 + side.c1) / 2) * side.lateral
    lat = np.clip(xrel / max(0.25 * side.width, 1.0), 0.0, 1.0)
    # Rim width tapers smoothly: full over the apex and upper lateral wall, zero by the base.
    ext = np.maximum(np.clip((0.3 - yrel) / 0.15, 0.0, 1.0), lat * np.clip((0.8 - yrel) / 0.25, 0.0, 1.0))
    width = w * ext
    win = side.mask[sl]
    rim = win & (dist <= width) & (ext > 0.05)
    line = win & (np.abs(dist - width - 0.5) < 0.75) & (ext > 0.3)
    edge = win & ~rim & (dist <= width + w * 0.6) & (ext > 0.05)
    amount = np.float32(min(1.0, 0.9 * s))
    removed = canvas.lung_soft[sl] * rim * amount
    canvas.soft[sl] -= removed
    canvas.soft[sl] += edge * canvas.lung_soft[sl] * amount * np.float32(0.5) + line * np.float32(0.25)
    return [_mask_lesion(finding, "pneumothorax", canvas.shape, sl, rim)]


def pleural_thickening(canvas, rng, sev, cfg, finding="Pleural_Thickening"):
    """A dense band along the chest wall: an apical cap or a lateral segment."""
    s = _scale(sev)
    side = _choose_side(canvas, rng)
    w = max(canvas.px(min(_uniform(rng, cfg.pleural_thickening_mm) * s, 15.0)), 1.2)
    sl = (slice(side.r0, side.r1), slice(side.c0, side.c1))
    dist = canvas.depth_from_edge(side)
    rows = np.arange(side.r0, side.r1)[:, None]
    cols = np.arange(side.c0, side.c1)[None, :]
    if rng.random() < 0.5:
        seg = rows < side.r0 + 0.22 * side.height
        kind = "apical_cap"
    else:
        a = side.r0 + rng.uniform(0.25, 0.5) * side.height
        seg = (rows >= a) & (rows < a + rng.uniform(0.2, 0.35) * side.height)
        seg = seg & ((cols - (side.c0 + side.c1) / 2) * side.lateral > 0)
        kind = "lateral_band"
    band = side.mask[sl] & seg & (dist <= w)
    dens = _uniform(rng, cfg.pleural_thickening_cm) * min(1.5, s)
    # Softened by ~1 mm, as the effusion's outline, and over the field's pixel-stepped edge
    # onto the chest wall (where the pleura is): a pixel-sharp band renders as a stepped line
    # with a dark halo through the chains' edge enhancement.
    soft_band = ndimage.gaussian_filter(band.astype(np.float32), sigma=max(canvas.px(1.0), 0.5), mode="nearest")
    canvas.soft[sl] += soft_band * np.float32(dens)
    # The mask: where it adds at least 2 % of its density inside the lung field (the band and
    # its softened edge; the chest wall outside is not the lung region).
    return [_mask_lesion(finding, kind, canvas.shape, sl, side.mask[sl] & (soft_band >= 0.02))]


def atelectasis(canvas, rng, sev, cfg, finding="Atelectasis"):
    """Plate-like (discoid) atelectasis: a thin, nearly horizontal airless disc in a lower zone."""
    s = _scale(sev)
    side = _choose_side(canvas, rng)
    length = min(canvas.px(_uniform(rng, cfg.atelectasis_len_mm) * s), 0.7 * side.width)
    thick = max(canvas.px(_uniform(rng, cfg.atelectasis_thick_mm) * s), 1.2)
    cy, cx = _pick(canvas, rng, side, "lower" if rng.random() < 0.7 else "middle", min_depth_px=length / 3)
    depth = _uniform(rng, (3.0, 6.0))
    les = add_solid(canvas, rng, finding, "plate_atelectasis", side, cy, cx, length / 2, thick / 2, depth,
                    1.0, angle=float(rng.uniform(-0.3, 0.3)))
    return [les]


def fibrosis(canvas, rng, sev, cfg, finding="Fibrosis", zone="lower"):
    """Reticulation: a net of fine lines (zero crossings of band-passed noise), peripheral."""
    s = _scale(sev)
    out = []
    sides = canvas.sides() if rng.random() < 0.8 else [_choose_side(canvas, rng)]
    for side in sides:
        sl = (slice(side.r0, side.r1), slice(side.c0, side.c1))
        dist = canvas.depth_from_edge(side)
        rows = (np.arange(side.r0, side.r1, dtype=np.float32)[:, None] - side.r0) / max(side.height, 1)
        vert = np.clip((rows - 0.3) / 0.4, 0, 1) if zone == "lower" else np.clip((0.6 - rows) / 0.4, 0, 1)
        periph = np.clip(1.0 - dist / max(canvas.px(40.0), 2.0), 0.0, 1.0)
        env = vert * periph * side.mask[sl]
        env = _cut(env, min(0.3, 0.9 * float(env.max())))
        sig = max(canvas.px(1.5), 0.6)
        n = ndimage.gaussian_filter(rng.standard_normal(env.shape).astype(np.float32), sig)
        n -= ndimage.gaussian_filter(n, 2.5 * sig)
        ridges = np.exp(-(n / (0.35 * float(n.std()) + 1e-6)) ** 2)
        amp = _uniform(rng, cfg.fibrosis_cm) * min(s, 2.0)
        canvas.soft[sl] += np.float32(amp) * env * ridges
        out.append(_mask_lesion(finding, "reticulation", canvas.shape, sl, env > 0))
    return out


def emphysema(canvas, rng, sev, cfg, finding="Emphysema"):
    """Hyperlucent upper/mid lungs with pruned markings; the flat diaphragm comes from the warp."""
    s = _scale(sev)
    out = []
    for side in canvas.sides():
        sl = (slice(side.r0, side.r1), slice(side.c0, side.c1))
        rows = (np.arange(side.r0, side.r1, dtype=np.float32)[:, None] - side.r0) / max(side.height, 1)
        env = np.clip((0.85 - rows) / 0.25, 0.0, 1.0) * side.mask[sl]
        alpha = min(0.8, _uniform(rng, cfg.emphysema_lucency) * s)
        canvas.soft[sl] -= canvas.lung_soft[sl] * env * np.float32(alpha)
        out.append(_mask_lesion(finding, "hyperlucency", canvas.shape, sl, env > 0))
    return out


def cardiomegaly(canvas, rng, sev, cfg, finding="Cardiomegaly"):
    """The heart itself, already enlarged by the render warp (see :func:`geometry_effects`)."""
    full = (slice(0, canvas.shape[0]), slice(0, canvas.shape[1]))
    les = _mask_lesion(finding, "cardiomegaly", canvas.shape, full, canvas.heart_mask, region="heart")
    return [les]


def hernia(canvas, rng, sev, cfg, finding="Hernia"):
    """Hiatal hernia: a retrocardiac sac just above the diaphragm with an air-fluid level."""
    s = _scale(sev)
    ys, xs = np.nonzero(canvas.heart_mask)
    if ys.size == 0:
        return []
    hy0, hy1, hx0, hx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    hw, hh = hx1 - hx0, hy1 - hy0
    a = max(min(canvas.px(_uniform(rng, cfg.hernia_mm) * s) / 2, 0.35 * hw), 1.5)
    b = max(a * rng.uniform(0.7, 0.9), 1.2)
    cy = hy1 - b - rng.uniform(0.05, 0.15) * hh
    cx = (hx0 + hx1) / 2 + rng.uniform(0.0, 0.12) * hw
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))  # keep the centre inside the heart
    cy, cx = float(ys[k]), float(xs[k])
    sl = window(canvas.shape, cy, cx, b + 1, a + 1)
    path = ellipsoid_path(sl, cy, cx, a, b, 2 * a * canvas.mm_per_px / 10, 0.0) * canvas.heart_mask[sl]
    level = cy + rng.uniform(-0.3, 0.1) * b
    rows = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None]
    air = rows < level
    contrast = min(1.0, 0.8 * s)
    canvas.soft[sl] += np.where(air, -0.7 * path, 0.25 * path) * np.float32(contrast)
    les = _mask_lesion(finding, "hiatal_hernia", canvas.shape, sl, path > 0, region="heart")
    return [les]


def aortic_enlargement(canvas, rng, sev, cfg, finding="Aortic enlargement"):
    """A bulging aortic knob: soft tissue over the medial upper left lung field."""
    s = _scale(sev)
    side = canvas.side(2) or _choose_side(canvas, rng)
    cy = side.r0 + rng.uniform(0.15, 0.25) * side.height
    row = side.mask[int(cy), side.c0:side.c1]
    xs = np.flatnonzero(row)
    cx = side.c0 + (xs.min() if xs.size else 0)
    a = max(canvas.px(_uniform(rng, cfg.aorta_mm) * s), 1.5)
    b = a * rng.uniform(1.3, 1.8)
    return [add_solid(canvas, rng, finding, "aortic_knob", side, cy, cx, a, b, 3.0, 1.0, angle=0.0)]


def calcification(canvas, rng, sev, cfg, finding="Calcification"):
    """Calcified granulomas: small dots of bone density."""
    out = []
    for _ in range(int(rng.integers(1, 4))):
        side = _choose_side(canvas, rng)
        d = max(canvas.px(_uniform(rng, cfg.calcification_mm)), 1.0)
        cy, cx = _pick(canvas, rng, side, "any", min_depth_px=d)
        sl = window(canvas.shape, cy, cx, d, d)
        path = ellipsoid_path(sl, cy, cx, d / 2, d / 2, d * canvas.mm_per_px / 10) * _region(canvas, side, sl)
        canvas.bone[sl] += path * np.float32(0.8)
        canvas.soft[sl] += path * np.float32(0.3)
        out.append(_mask_lesion(finding, "calcified_granuloma", canvas.shape, sl, path > 0))
    return out


def nodule_or_mass(canvas, rng, sev, cfg, finding="Nodule/Mass"):
    return nodule(canvas, rng, sev, cfg, finding) if rng.random() < 0.6 else mass(canvas, rng, sev, cfg, finding)


def other_lesion(canvas, rng, sev, cfg, finding="Other lesion"):
    return nodule(canvas, rng, sev, cfg, finding) if rng.random() < 0.5 else infiltration(canvas, rng, sev, cfg, finding)


# ------------------------------------------------------------------------------------------
# Tuberculosis
# ------------------------------------------------------------------------------------------

def tb_nodule_cluster(canvas, rng, sev, cfg, side):
    s = _scale(sev)
    spread = canvas.px(_uniform(rng, cfg.tb_cluster_mm) * s)
    cy, cx = _pick(canvas, rng, side, "upper", min_depth_px=spread / 4)
    pieces = _Union(canvas.shape)
    for _ in range(int(rng.integers(cfg.tb_cluster_n[0], cfg.tb_cluster_n[1] + 1))):
        d = max(canvas.px(_uniform(rng, cfg.tb_nodule_mm) * s), 1.0)
        ny = cy + rng.normal(0, spread / 3)
        nx = cx + rng.normal(0, spread / 3)
        pieces.add(*solid(canvas, side, ny, nx, d / 2, d / 2 * rng.uniform(0.8, 1.2),
                          d * canvas.mm_per_px / 10 * 1.3, min(1.0, cfg.solid_contrast * s),
                          float(rng.uniform(0, math.pi)), calcified=bool(rng.random() < 0.1)))
    return pieces.lesion(TB, "nodule_cluster")


def tb_cavity(canvas, rng, sev, cfg, side):
    """A thin dense wall around air: the centre's path loses more (air) than the wall adds."""
    s = _scale(sev)
    d = canvas.px(_uniform(rng, cfg.cavity_mm) * min(s, 1.6))
    R = max(d / 2, 1.5)
    cy, cx = _pick(canvas, rng, side, "upper", min_depth_px=R * 1.2)
    wall = _uniform(rng, cfg.cavity_wall)
    r = R * (1.0 - wall)
    b_ratio = rng.uniform(0.8, 1.0)
    ang = float(rng.uniform(0, math.pi))
    sl = window(canvas.shape, cy, cx, R + 1, R + 1)
    depth = 2 * R * canvas.mm_per_px / 10
    outer = ellipsoid_path(sl, cy, cx, R, R * b_ratio, depth, ang)
    inner = ellipsoid_path(sl, cy, cx, r, r * b_ratio, depth * (1.0 - wall), ang)
    region = _region(canvas, side, sl)
    outer = np.minimum(outer, canvas.lung_thk[sl]) * region
    inner = np.minimum(inner, outer) * region
    rho = canvas.lung_density(sl)
    # Wall tissue replaces lung over the outer path; the inner path is air instead of tissue.
    canvas.soft[sl] += outer * (1.0 - rho) * np.float32(min(1.0, cfg.solid_contrast * s)) - inner * np.float32(1.0)
    canvas.soft[sl] = np.maximum(canvas.soft[sl], 0.0)
    return _mask_lesion(TB, "cavity", canvas.shape, sl, outer > 0)


def tb_consolidation(canvas, rng, sev, cfg, side):
    s = _scale(sev)
    radius = canvas.px(_uniform(rng, cfg.tb_consolidation_mm) * s) / 2
    radius = min(radius, 0.4 * side.width)
    cy, cx = _pick(canvas, rng, side, "upper", min_depth_px=radius / 4)
    phi = min(0.9, _uniform(rng, cfg.tb_consolidation_phi) * s)
    return add_airspace(canvas, rng, TB, "consolidation", side, cy, cx, radius, phi, 0.9,
                        n_blobs=int(rng.integers(3, 6)), texture=0.45)


def tb_fibrotic(canvas, rng, sev, cfg, side):
    """Fibrotic streaks: thin linear opacities converging from the apex toward the hilum."""
    s = _scale(sev)
    hy = side.r0 + 0.42 * side.height
    row = side.mask[int(np.clip(hy, side.r0, side.r1 - 1)), side.c0:side.c1]
    xs = np.flatnonzero(row)
    hx = (side.c0 + (xs.max() if side.lateral < 0 else xs.min())) if xs.size else (side.c0 + side.c1) / 2
    pieces = _Union(canvas.shape)
    for _ in range(int(rng.integers(cfg.fibrotic_n[0], cfg.fibrotic_n[1] + 1))):
        length = canvas.px(_uniform(rng, cfg.fibrotic_len_mm) * s)
        cy, cx = _pick(canvas, rng, side, "upper", min_depth_px=1.0)
        ang = math.atan2(hy - cy, hx - cx) + rng.normal(0, 0.25)
        width = max(canvas.px(rng.uniform(1.0, 2.5)), 0.6)
        pieces.add(*solid(canvas, side, cy, cx, length / 2, width / 2, rng.uniform(1.0, 2.5),
                          min(1.0, 0.9 * s), ang))
    return pieces.lesion(TB, "fibrotic")


def miliary(canvas, rng, sev, cfg, finding=TB):
    """Innumerable 1–3 mm nodules through both lungs, splatted with mass conservation."""
    s = _scale(sev)
    out = []
    area_px = canvas.mm_per_px ** 2
    for side in canvas.sides():
        sl = (slice(side.r0, side.r1), slice(side.c0, side.c1))
        win = side.mask[sl]
        ys, xs = np.nonzero(win)
        n = int(round(_uniform(rng, cfg.miliary_per_cm2) * min(s, 2.0) * ys.size * area_px / 100.0))
        n = max(n, 5)
        pick = rng.integers(0, ys.size, n)
        d = rng.uniform(cfg.miliary_mm[0], cfg.miliary_mm[1], n)
        vol = np.pi * d ** 3 / 6  # mm³ of tissue replacing lung
        imp = np.zeros(win.shape, np.float32)
        np.add.at(imp, (ys[pick], xs[pick]), (vol / 10.0 / area_px).astype(np.float32))
        sigma = max(float(np.mean(d)) / 2.5 / canvas.mm_per_px, 0.5)
        field_ = ndimage.gaussian_filter(imp, sigma) * win
        canvas.soft[sl] += field_ * np.float32(0.8 * min(1.0, s))
        out.append(_mask_lesion(finding, "miliary", canvas.shape, sl, win))
    return out


def tuberculosis(canvas, rng, sev, cfg, finding=TB):
    """Post-primary TB: upper-zone consolidation, nodule clusters, cavities, fibrotic streaks;
    sometimes a miliary pattern or a pleural effusion instead."""
    u = rng.random()
    if u < 0.06:
        return miliary(canvas, rng, sev, cfg)
    if u < 0.12:
        return effusion(canvas, rng, sev, cfg, finding=TB, side=_choose_side(canvas, rng), kind="effusion")
    sides = canvas.sides()
    if len(sides) == 2 and rng.random() >= 0.35:
        sides = [_choose_side(canvas, rng, 0.55)]
    out = []
    for i, side in enumerate(sides):
        makers = []
        if rng.random() < 0.7:
            makers.append(tb_consolidation)
        if rng.random() < 0.6:
            makers.append(tb_nodule_cluster)
        if rng.random() < (0.3 if i == 0 else 0.15):
            makers.append(tb_cavity)
        if rng.random() < 0.3:
            makers.append(tb_fibrotic)
        if not makers:
            makers.append(tb_nodule_cluster if rng.random() < 0.5 else tb_consolidation)
        for make in makers:
            out.append(make(canvas, rng, sev, cfg, side))
    if rng.random() < 0.08:
        out += effusion(canvas, rng, sev, cfg, finding=TB, side=_choose_side(canvas, rng), kind="effusion")
    return out


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------

def _named(fn: Callable, **kw) -> Callable:
    def make(canvas, rng, sev, cfg, finding):
        return fn(canvas, rng, sev, cfg, finding=finding, **kw)
    return make


MAKERS: dict[str, Callable] = {
    TB: tuberculosis,
    "Atelectasis": atelectasis,
    "Cardiomegaly": cardiomegaly,
    "Effusion": effusion,
    "Infiltration": infiltration,
    "Mass": mass,
    "Nodule": nodule,
    "Pneumonia": pneumonia,
    "Pneumothorax": pneumothorax,
    "Consolidation": consolidation,
    "Edema": edema,
    "Emphysema": emphysema,
    "Fibrosis": fibrosis,
    "Pleural_Thickening": pleural_thickening,
    "Hernia": hernia,
    "Covid": covid,
    # VinDr-CXR classes
    "Aortic enlargement": aortic_enlargement,
    "Calcification": calcification,
    "ILD": fibrosis,
    "Lung Opacity": infiltration,
    "Nodule/Mass": nodule_or_mass,
    "Other lesion": other_lesion,
    "Pleural effusion": effusion,
    "Pleural thickening": pleural_thickening,
    "Pulmonary fibrosis": fibrosis,
}
ALIASES: dict[str, str] = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening",
                           "COVID-19": "Covid", "TB": TB}
NO_FINDING = ("No Finding", "No finding", "Normal")
FINDINGS: tuple[str, ...] = tuple(MAKERS)

# Findings that change the anatomy itself, applied by the render warp: parameter → factor.
_GEOMETRY: dict[str, Callable[[float, LesionConfig], dict[str, float]]] = {
    "Cardiomegaly": lambda s, c: {"heart_scale": c.cardiomegaly_scale[0] + c.cardiomegaly_scale[1] * min(s, 2.0)},
    "Emphysema": lambda s, c: {"inspiration": 1.0 + 0.08 * min(_scale(s), 1.5), "heart_scale": 0.93},
    "Fibrosis": lambda s, c: {"inspiration": 0.95},
    "ILD": lambda s, c: {"inspiration": 0.95},
    "Pulmonary fibrosis": lambda s, c: {"inspiration": 0.95},
    "Atelectasis": lambda s, c: {"inspiration": 0.98},
}


def canonical(name: str) -> str | None:
    """The registry name of a finding (aliases resolved); None for "No Finding"; raises if unknown."""
    if name in NO_FINDING:
        return None
    name = ALIASES.get(name, name)
    if name not in MAKERS:
        import difflib
        close = difflib.get_close_matches(name, list(MAKERS) + list(ALIASES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise CxrError(f"finding: unknown finding '{name}'{hint}")
    return name


def geometry_effects(findings: tuple[str, ...], severity: float,
                     config: LesionConfig = DEFAULT_CONFIG) -> dict[str, float]:
    """Multiplicative changes to the render parameters that the findings imply."""
    out: dict[str, float] = {}
    for f in findings:
        name = canonical(f)
        if name in _GEOMETRY:
            for k, v in _GEOMETRY[name](severity, config).items():
                out[k] = out.get(k, 1.0) * v
    return out


def insert_findings(canvas: Canvas, findings: tuple[str, ...], severity: float,
                    rng: np.random.Generator, config: LesionConfig = DEFAULT_CONFIG) -> list[Lesion]:
    """Add every finding to the canvas (in order) and return their lesions."""
    out: list[Lesion] = []
    if not canvas.sides():
        return out
    for f in findings:
        name = canonical(f)
        if name is None:
            continue
        maker = MAKERS[name]
        made = maker(canvas, rng, severity, config, finding=f if f in MAKERS else name)
        out.extend(les for les in made if les is not None)
    return out
