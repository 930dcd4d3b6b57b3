"""Acquisition chains: what turns one patient's line integrals into one site's radiograph.

A chain is data (:class:`AcquisitionChain`, loaded from YAML), so a third site is a new YAML
file, not new code. It has two halves:

* **geometry** (:func:`sample_geometry`, :func:`warp_projection`): the detector frame's aspect
  and size, zoom, slight patient rotation and shift, collimation borders and a burnt-in lead
  side marker. One affine map carries the line integrals, the lung mask, the lesion masks and
  the boxes alike, so the truth stays aligned with the pixels.
* **appearance** (:func:`develop`): effective energy, Beer–Lambert, scatter fog, quantum noise,
  detector blur, log, auto-window, unsharp mask, LUT/gamma, quantization. Each step is a pure
  function of ``(image, chain, rng)``.

Paired ground truth falls out of the split: one geometry, several appearances
(:func:`acquire_all`).

Units. ``--size`` is the *long side* of the output image; the short side follows the site's
frame aspect, so every image fits in a ``size x size`` box. The detector's own scales (dose,
readout noise, plate grain, blur) are per *detector pixel* of the site's frame, as a vendor
specifies them; an output pixel bins ``frame long side / size`` detector pixels a side, so its
counting noise and grain shrink with that factor, as they do when a real 4020 x 4892 plate is
downsampled to a study's working resolution (:func:`per_output_pixel`). Field-scale lengths
(scatter kernel, edge-enhancement kernel, collimation, marker) are fractions of the long side,
so they look the same at every size.
"""

from __future__ import annotations

import difflib
import functools
import math
import zlib
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cxr.errors import ConfigError
from cxr.phantom.types import Lesion, Projection

PRESETS: tuple[str, ...] = ("shenzhen", "montgomery")
OUTPUT_MODES: tuple[str, ...] = ("P", "L")


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """A detector frame size the site produces (pixels of the real acquisition), and how often."""

    width: int
    height: int
    weight: float = 1.0


@dataclass(frozen=True)
class AcquisitionChain:
    """Every parameter of one site's acquisition; see ``presets/*.yaml`` for annotated values."""

    name: str
    description: str = ""
    # Effective energy: attenuation A = mu_soft * soft + mu_bone * bone (1/cm). A higher
    # effective energy lowers mu_bone / mu_soft, i.e. bone contrast.
    mu_soft: float = 0.20
    mu_bone: float = 0.45
    # Scatter fog: scatter-to-primary ratio and the width of its low-pass kernel (fraction of
    # the long side). An anti-scatter grid lowers the ratio.
    scatter_fraction: float = 0.2
    scatter_sigma: float = 0.08
    # Quantum noise: effective photons per detector pixel of an unattenuated beam, plus readout
    # noise. All four are per detector pixel of the site's frame (see "Units" above).
    dose: float = 20000.0
    electronic_noise: float = 0.0  # std, in photons per detector pixel
    structure_noise: float = 0.0  # relative std of the plate's grain (gain varies pixel to pixel)
    detector_blur_px: float = 0.5  # Gaussian sigma, detector pixels (after the noise: it shapes grain)
    # Processing: dynamic-range compression (subtract part of a very smooth copy of the log
    # image, as multi-scale "equalization" does), auto-window on the central field, unsharp
    # mask, sigmoid LUT, gamma.
    drc_amount: float = 0.0
    drc_sigma: float = 0.08  # fraction of the long side
    window_percentiles: tuple[float, float] = (0.5, 99.5)
    usm_amount: float = 0.3
    usm_sigma: float = 0.01  # fraction of the long side
    lut_contrast: float = 4.0  # sigmoid slope; larger = harder gradation
    lut_center: float = 0.5
    gamma: float = 1.0
    acquisition_bits: int = 14
    output_mode: str = "L"  # 8-bit PNG mode: "P" (gray palette) or "L"
    # Geometry.
    frames: tuple[Frame, ...] = (Frame(3000, 3000),)
    zoom: tuple[float, float] = (0.97, 1.03)  # projection height / frame height
    rotation_deg: float = 1.0  # max |patient rotation|
    shift: float = 0.02  # max |shift|, fraction of each side
    collimation_prob: float = 0.0
    collimation: tuple[float, float] = (0.0, 0.05)  # border width per edge, fraction of side
    collimation_transmission: float = 0.05
    marker_prob: float = 0.0
    marker_height: float = 0.04  # letter height, fraction of the long side
    marker_left_prob: float = 0.8  # "L" (patient's left, image right) vs "R"
    marker_transmission: float = 0.02

    @property
    def frame_weights(self) -> np.ndarray:
        w = np.array([f.weight for f in self.frames], dtype=np.float64)
        return w / w.sum()


# Checks for each numeric field: (low, high, low inclusive). None = unbounded.
_BOUNDS: dict[str, tuple[float | None, float | None, bool]] = {
    "mu_soft": (0.0, None, False), "mu_bone": (0.0, None, True),
    "scatter_fraction": (0.0, None, True), "scatter_sigma": (0.0, 1.0, False),
    "dose": (0.0, None, False), "electronic_noise": (0.0, None, True),
    "structure_noise": (0.0, 0.5, True),
    "detector_blur_px": (0.0, 20.0, True), "usm_amount": (0.0, 10.0, True),
    "usm_sigma": (0.0, 1.0, False), "lut_contrast": (0.0, 50.0, False),
    "lut_center": (0.0, 1.0, True), "drc_amount": (0.0, 0.95, True),
    "drc_sigma": (0.0, 1.0, False), "gamma": (0.0, 10.0, False),
    "acquisition_bits": (8, 16, True), "rotation_deg": (0.0, 45.0, True),
    "shift": (0.0, 0.5, True), "collimation_prob": (0.0, 1.0, True),
    "collimation_transmission": (0.0, 1.0, False), "marker_prob": (0.0, 1.0, True),
    "marker_height": (0.0, 0.5, False), "marker_left_prob": (0.0, 1.0, True),
    "marker_transmission": (0.0, 1.0, False),
}
_RANGES: dict[str, tuple[float, float]] = {
    "window_percentiles": (0.0, 100.0), "zoom": (0.1, 10.0), "collimation": (0.0, 0.45),
}


def chain_from_dict(data: Mapping[str, Any], where: str, base: AcquisitionChain | None = None,
                    default_name: str | None = None) -> AcquisitionChain:
    """Validate a mapping of chain parameters; unknown keys name the closest valid one.

    Keys left out come from ``base`` (a preset) or the neutral defaults; ``name`` falls back
    to ``default_name`` (a file's stem).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of chain parameters, got {type(data).__name__}")
    valid = [f.name for f in fields(AcquisitionChain)]
    values: dict[str, Any] = {}
    for key, raw in data.items():
        key = str(key)
        if key == "base":
            continue
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        values[key] = _check_value(key, raw, where)
    if "name" not in values and default_name is not None:
        values["name"] = default_name
    if base is not None:
        return replace(base, **values)
    if "name" not in values:
        raise ConfigError(f"{where}: missing key 'name'")
    return AcquisitionChain(**values)


def _number(key: str, raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ConfigError(f"{where}: key '{key}' must be a number, got {raw!r}")
    return float(raw)


def _check_value(key: str, raw: Any, where: str) -> Any:
    if key in ("name", "description"):
        if not isinstance(raw, str) or (key == "name" and not raw.strip()):
            raise ConfigError(f"{where}: key '{key}' must be a non-empty string, got {raw!r}")
        return raw.strip() if key == "name" else raw
    if key == "output_mode":
        if raw not in OUTPUT_MODES:
            raise ConfigError(f"{where}: key 'output_mode' must be one of "
                              f"{', '.join(OUTPUT_MODES)}, got {raw!r}")
        return raw
    if key == "frames":
        return _check_frames(raw, where)
    if key in _RANGES:
        lo_ok, hi_ok = _RANGES[key]
        if not isinstance(raw, (list, tuple)) or len(raw) != 2:
            raise ConfigError(f"{where}: key '{key}' must be a pair [low, high], got {raw!r}")
        lo, hi = (_number(key, v, where) for v in raw)
        if not lo_ok <= lo <= hi <= hi_ok:
            raise ConfigError(f"{where}: key '{key}' must satisfy "
                              f"{lo_ok} <= low <= high <= {hi_ok}, got {raw!r}")
        return (lo, hi)
    value = _number(key, raw, where)
    lo, hi, lo_incl = _BOUNDS[key]
    if (lo is not None and (value < lo or (value == lo and not lo_incl))) or (hi is not None and value > hi):
        rng = f"{'[' if lo_incl else '('}{lo}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{where}: key '{key}' = {raw!r} is outside {rng}")
    if key == "acquisition_bits":
        if value != int(value):
            raise ConfigError(f"{where}: key 'acquisition_bits' must be an integer, got {raw!r}")
        return int(value)
    return value


def _check_frames(raw: Any, where: str) -> tuple[Frame, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: key 'frames' must be a non-empty list of {{width, height, weight}}")
    out = []
    for i, item in enumerate(raw):
        here = f"{where}: frames[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{here}: expected a mapping with width, height, weight")
        unknown = set(map(str, item)) - {"width", "height", "weight"}
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, ["width", "height", "weight"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{here}: unknown key '{key}'{hint}")
        try:
            w, h = int(item["width"]), int(item["height"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{here}: width and height must be positive integers") from None
        weight = _number("weight", item.get("weight", 1.0), here)
        if w <= 0 or h <= 0 or weight <= 0 or max(w, h) / min(w, h) > 4:
            raise ConfigError(f"{here}: needs positive width/height (aspect at most 4:1) "
                              f"and weight, got {dict(item)}")
        out.append(Frame(w, h, weight))
    return tuple(out)


def load_chain(source: str | Path) -> AcquisitionChain:
    """A chain by preset name ("shenzhen", "montgomery") or from a YAML file.

    A file may start from a preset with ``base: montgomery`` and override some keys; without
    ``base`` it must give ``name`` and takes the neutral defaults for what it leaves out.
    """
    import yaml

    if isinstance(source, str) and source in PRESETS:
        text = resources.files("cxr.phantom").joinpath("presets", f"{source}.yaml").read_text("utf-8")
        where = f"preset {source}"
    else:
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{where}: chain file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: cannot read chain file ({e})") from None
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 5x faster
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of chain parameters")
    base = None
    if "base" in data:
        if data["base"] not in PRESETS:
            raise ConfigError(f"{where}: key 'base' must be one of {', '.join(PRESETS)}, "
                              f"got {data['base']!r}")
        base = load_chain(data["base"])
    is_preset = isinstance(source, str) and source in PRESETS
    return chain_from_dict(data, where, base=base, default_name=None if is_preset else Path(source).stem)


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------

def stream(seed: int, *tags: str) -> np.random.Generator:
    """A generator keyed by a subject's seed and purpose tags, independent of call order.

    Geometry and each chain's noise draw from separate streams, so adding a site or a step
    never changes what another part of the same subject looks like.
    """
    return np.random.default_rng([int(seed)] + [zlib.crc32(t.encode("utf-8")) for t in tags])


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Marker:
    letter: str  # "L" or "R"
    x: int  # top-left corner, output pixels
    y: int
    scale: int  # pixels per glyph cell


@dataclass(frozen=True)
class Geometry:
    """Output frame and the map from projection to output coordinates.

    ``matrix`` (2x3) maps continuous projection coordinates (pixel ``(i, j)`` covers
    ``[j, j+1) x [i, i+1)``) to continuous output coordinates: ``out = M @ [x, y, 1]``.
    ``field`` is the exposed rectangle (x0, y0, x1, y1) inside the collimation.
    """

    width: int
    height: int
    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    field: tuple[int, int, int, int]
    marker: Marker | None = None
    frame: Frame | None = None  # the site frame the output stands for (original pixel size)

    def forward(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) projection points to output points."""
        m = np.asarray(self.matrix, dtype=np.float64)
        return np.asarray(xy, dtype=np.float64) @ m[:, :2].T + m[:, 2]

    def inverse_coeffs(self) -> tuple[float, ...]:
        """The 6 PIL AFFINE coefficients mapping output to projection coordinates."""
        m = np.vstack([np.asarray(self.matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
        inv = np.linalg.inv(m)
        return tuple(float(v) for v in inv[:2].reshape(-1))


def output_shape(frame: Frame, size: int) -> tuple[int, int]:
    """(width, height) of a frame scaled so its long side is ``size``."""
    long = max(frame.width, frame.height)
    w = max(1, round(size * frame.width / long))
    h = max(1, round(size * frame.height / long))
    return w, h


def sample_geometry(chain: AcquisitionChain, size: int, proj_size: int,
                    rng: np.random.Generator, square: bool = False) -> Geometry:
    """Draw a frame, zoom, rotation, shift, collimation and marker for one exposure.

    ``square``: the frame is squeezed into a ``size x size`` output, one scale per axis, as
    NIH resized every original film to 1024 x 1024 whatever its aspect; the same draws, so the
    same exposure, only stored square.
    """
    frame = chain.frames[int(rng.choice(len(chain.frames), p=chain.frame_weights))]
    w, h = output_shape(frame, size)
    zoom = rng.uniform(*chain.zoom)
    angle = math.radians(rng.uniform(-chain.rotation_deg, chain.rotation_deg))
    dx, dy = rng.uniform(-chain.shift, chain.shift, 2) * (w, h)
    # The projection's height spans ``zoom`` frame heights; portrait frames crop its sides,
    # landscape ones show more of them (edge-padded line integrals).
    s = zoom * h / proj_size
    c, si = math.cos(angle) * s, math.sin(angle) * s
    pc = proj_size / 2.0
    ox, oy = w / 2.0 + dx, h / 2.0 + dy
    matrix = ((c, -si, ox - c * pc + si * pc), (si, c, oy - si * pc - c * pc))
    if square:  # the frame's map, then each output axis stretched to ``size``
        kx, ky = size / w, size / h
        matrix = (tuple(kx * v for v in matrix[0]), tuple(ky * v for v in matrix[1]))  # type: ignore[assignment]
        w, h = size, size

    x0, y0, x1, y1 = 0, 0, w, h
    if rng.random() < chain.collimation_prob:
        lo, hi = chain.collimation
        b = rng.uniform(lo, hi, 4)
        x0, x1 = round(b[0] * w), w - round(b[2] * w)
        y0, y1 = round(b[1] * h), h - round(b[3] * h)
    marker = None
    if rng.random() < chain.marker_prob:
        letter = "L" if rng.random() < chain.marker_left_prob else "R"
        scale = max(1, round(chain.marker_height * max(w, h) / GLYPH_ROWS))
        gw, gh = GLYPH_COLS * scale, GLYPH_ROWS * scale
        # Patient's left is on the image right in a PA film; the marker sits in an upper corner
        # inside the exposed field, where technologists tape it.
        margin = round(rng.uniform(0.02, 0.06) * w)
        top = y0 + round(rng.uniform(0.03, 0.12) * h)
        left = x1 - margin - gw if letter == "L" else x0 + margin
        left = int(np.clip(left, 0, max(0, w - gw)))
        top = int(np.clip(top, 0, max(0, h - gh)))
        marker = Marker(letter, left, top, scale)
    return Geometry(w, h, matrix, (x0, y0, x1, y1), marker, frame)


# 5x7 pixel glyphs for the burnt-in lead markers.
GLYPH_ROWS, GLYPH_COLS = 7, 5
GLYPHS: dict[str, tuple[str, ...]] = {
    "L": ("X....", "X....", "X....", "X....", "X....", "X....", "XXXXX"),
    "R": ("XXXX.", "X...X", "X...X", "XXXX.", "X.X..", "X..X.", "X...X"),
}


def glyph(letter: str, scale: int) -> np.ndarray:
    """Boolean bitmap of a marker letter, each glyph cell ``scale`` pixels wide."""
    rows = np.array([[ch == "X" for ch in row] for row in GLYPHS[letter]], dtype=bool)
    return np.kron(rows, np.ones((scale, scale), dtype=bool)).astype(bool)


@dataclass
class Warped:
    """A projection carried into an output frame: everything one affine map moved."""

    geometry: Geometry
    soft: np.ndarray  # float32 (H, W)
    bone: np.ndarray
    lung_mask: np.ndarray  # uint8 labels 0/1/2
    lesions: list[Lesion]  # masks and boxes in output pixels (lesions cut off entirely are dropped)


def sampling_grid(geom: Geometry, in_shape: tuple[int, int]) -> torch.Tensor:
    """Where each output pixel centre falls in the projection, as a ``grid_sample`` grid.

    ``(1, H, W, 2)`` float32 in the normalised coordinates of ``align_corners=False``, where
    -1 and 1 are the outer edges of the first and last input pixels.
    """
    inv = np.array(geom.inverse_coeffs(), dtype=np.float64).reshape(2, 3)
    u = np.arange(geom.width, dtype=np.float64) + 0.5
    v = np.arange(geom.height, dtype=np.float64) + 0.5
    h_in, w_in = in_shape
    # One plane per coordinate, viewed as (H, W, 2): contiguous writes here, and grid_sample
    # reads the strided view slightly faster than an interleaved copy.
    planes = np.empty((2, geom.height, geom.width), np.float32)
    for k, extent in enumerate((w_in, h_in)):
        # (a u + b v + c) * 2 / extent - 1: an affine map is a row term plus a column term,
        # each worked out in float64 on one line and added once per pixel in float32
        across = (inv[k, 0] * 2.0 / extent * u).astype(np.float32)
        down = ((inv[k, 1] * v + inv[k, 2]) * 2.0 / extent - 1.0).astype(np.float32)
        np.add(across[None, :], down[:, None], out=planes[k])
    return torch.from_numpy(planes).permute(1, 2, 0)[None]


def _resample(planes: list[np.ndarray], grid: torch.Tensor, mode: str, padding: str) -> np.ndarray:
    """Resample same-shape planes through one grid: ``(len(planes), H_out, W_out)`` float32."""
    stack = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) for p in planes]))[None]
    out = F.grid_sample(stack, grid, mode=mode, padding_mode=padding, align_corners=False)
    return out[0].numpy()


def box_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x0, y0, x1, y1) box, exclusive ends, of a boolean mask; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def transform_box(box: tuple[float, float, float, float], geom: Geometry) -> tuple[int, int, int, int] | None:
    """Output box covering the mapped corners of a projection box, clipped to the frame."""
    x0, y0, x1, y1 = box
    pts = geom.forward(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=np.float64))
    bx0, by0 = np.floor(pts.min(axis=0))
    bx1, by1 = np.ceil(pts.max(axis=0))
    bx0, bx1 = max(0, int(bx0)), min(geom.width, int(bx1))
    by0, by1 = max(0, int(by0)), min(geom.height, int(by1))
    if bx1 <= bx0 or by1 <= by0:
        return None
    return bx0, by0, bx1, by1


_PACKED_LESIONS = 20  # lesion bits above the lung label's two, exact in a float32


def _warp_masks(lung: np.ndarray, lesions: list[np.ndarray], grid: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """The lung labels and lesion masks resampled (nearest, zero outside) through one grid.

    Nearest-neighbour sampling copies one input value per output pixel, so the masks travel
    packed as the bits of one small integer per pixel (the lung label in bits 0-1, lesion k in
    bit k + 2), exact in float32: one plane to resample instead of one per mask, the same
    result."""
    if len(lesions) > _PACKED_LESIONS:
        planes = _resample([lung] + lesions, grid, "nearest", "zeros")
        return np.rint(planes[0]).astype(np.uint8), [p > 0.5 for p in planes[1:]]
    packed = lung.astype(np.int32)
    for k, m in enumerate(lesions):
        packed[m] |= 1 << (k + 2)
    codes = _resample([packed], grid, "nearest", "zeros")[0].astype(np.int32)
    out = [(codes & (1 << (k + 2))) != 0 for k in range(len(lesions))]
    return (codes & 3).astype(np.uint8), out


def warp_projection(proj: Projection, geom: Geometry) -> Warped:
    """Carry line integrals (bilinear), masks (nearest) and boxes into the output frame.

    Boxes are recomputed from the warped masks so that masks and boxes agree exactly; a lesion
    too small to survive nearest-neighbour resampling keeps the mapped corners of its box and
    a one-pixel mask at its centre, and one that falls wholly outside the frame is dropped.
    """
    grid = sampling_grid(geom, proj.soft.shape)
    # Line integrals beyond the projection's edge mirror it ("reflection"): the detector sees
    # more of the same body rather than a hard cut to air, and no repeated edge row drawn out
    # into streaks (what "border" padding did along the lower edge of tall frames).
    soft, bone = _resample([proj.soft, proj.bone], grid, "bilinear", "reflection")
    lung, masks = _warp_masks(proj.lung_mask, [les.mask for les in proj.lesions], grid)
    lesions = []
    for les, m in zip(proj.lesions, masks):
        box = box_of(m)
        if box is None:
            box = transform_box(les.box, geom)
            if box is None:
                continue
            cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
            m[cy, cx] = True
            box = (cx, cy, cx + 1, cy + 1)
        lesions.append(replace(les, mask=m, box=box))
    return Warped(geom, soft, bone, lung, lesions)


def blocked_attenuation(geom: Geometry, chain: AcquisitionChain) -> np.ndarray:
    """Extra attenuation of the collimator blades and the lead marker, in the output frame."""
    return add_blocked_attenuation(np.zeros((geom.height, geom.width), np.float32), geom, chain)


def add_blocked_attenuation(a: np.ndarray, geom: Geometry, chain: AcquisitionChain) -> np.ndarray:
    """``a`` plus :func:`blocked_attenuation`, in place: only the blades' strips and the marker's
    pixels are touched, which matters as most images are mostly open field."""
    blade = np.float32(-math.log(chain.collimation_transmission))
    x0, y0, x1, y1 = geom.field
    a[:y0] += blade
    a[y1:] += blade
    a[y0:y1, :x0] += blade
    a[y0:y1, x1:] += blade
    if geom.marker is not None:
        mk = geom.marker
        g = glyph(mk.letter, mk.scale)
        gh = min(g.shape[0], geom.height - mk.y)
        gw = min(g.shape[1], geom.width - mk.x)
        region = a[mk.y:mk.y + gh, mk.x:mk.x + gw]
        region[g[:gh, :gw]] += np.float32(-math.log(chain.marker_transmission))
    return a


# --------------------------------------------------------------------------------------------
# Appearance: pure steps of (image, chain, rng)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def gaussian_weights(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """Normalised 1-D Gaussian taps ``exp(-x² / 2σ²)``, ``x`` in ``[-r, r]``, ``r = ⌊truncate·σ + ½⌋``.

    The same taps as ``scipy.ndimage.gaussian_filter`` uses, built once per σ instead of on
    every call (the set-up costs as much as filtering a small image).
    """
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    taps = phi / phi.sum()
    taps.flags.writeable = False
    return taps


def _blur_axis(img: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Correlate every line along ``axis`` with symmetric ``taps``, edges repeated ("nearest").

    Sums of shifted views of an edge-padded copy: a few whole-image numpy operations per tap
    pair, several times faster than ``ndimage.correlate1d`` for the 3-11 taps used here.
    """
    r = len(taps) // 2
    n = img.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    padded = np.pad(img, pad, mode="edge")

    def shifted(k: int) -> np.ndarray:
        return padded[k:k + n] if axis == 0 else padded[:, k:k + n]

    out = np.multiply(shifted(r), img.dtype.type(taps[r]))
    pair = np.empty_like(out)
    for k in range(r):
        np.add(shifted(k), shifted(2 * r - k), out=pair)
        pair *= img.dtype.type(taps[k])
        out += pair
    return out


def gaussian(img: np.ndarray, sigma: float, truncate: float = 3.0) -> np.ndarray:
    """Separable Gaussian blur with ``ndimage.gaussian_filter``'s taps and edge mode
    ("nearest"), in the input's dtype; equal to it up to float rounding. Always a new array.

    Short kernels on whole images run as sums of shifted views (:func:`_blur_axis`); long
    kernels or small images through ``ndimage.correlate1d``, along contiguous memory (the
    image is transposed for the column pass and back, a third faster than strided columns).
    """
    taps = gaussian_weights(float(sigma), float(truncate))
    if len(taps) == 1:
        return img.copy()
    if len(taps) <= _SHIFTED_TAPS_MAX and _SHIFTED_PIXELS[0] <= img.size <= _SHIFTED_PIXELS[1]:
        return _blur_axis(_blur_axis(img, taps, 0), taps, 1)
    t = transposed(img)  # always a copy: the passes below write in place
    ndimage.correlate1d(t, taps, 1, t, "nearest")
    out = transposed(t)
    return ndimage.correlate1d(out, taps, 1, out, "nearest")


def transposed(img: np.ndarray, block: int = 32) -> np.ndarray:
    """A C-contiguous copy of ``img.T``, copied in bands of ``block`` rows when the image is
    large: a whole-image transposed copy strides through memory a column at a time, and at
    power-of-two widths those strides fall in the same cache sets (2.8x slower at 256²)."""
    if img.size < 128 * 128:
        return img.T.copy(order="C")
    out = np.empty(img.shape[::-1], img.dtype)
    for i in range(0, img.shape[0], block):
        out[:, i:i + block] = img[i:i + block].T
    return out


# Where shifted-view sums beat ndimage (CPU time measured at 128-512 px, 3-7 taps): images
# big enough that numpy's per-call overhead is small against the pixels, yet small enough that
# the padded copy and temporaries stay in a core's cache (1.3-2x faster at 256²; 1.7x slower
# at 512², where every pass goes to memory).
_SHIFTED_TAPS_MAX = 7
_SHIFTED_PIXELS = (96 * 96, 320 * 320)


@dataclass(frozen=True)
class _Resampling:
    """How :func:`lowpass` shrinks and re-expands one axis of length ``n`` (see there)."""

    starts: np.ndarray  # first pixel of each block
    inv_counts: np.ndarray  # 1 / pixels in each block (float32)
    lo: np.ndarray  # for every pixel, the block centres either side
    hi: np.ndarray
    w_lo: np.ndarray  # and their linear weights (float32)
    w_hi: np.ndarray


@functools.lru_cache(maxsize=64)
def _resampling(n: int, factor: int) -> _Resampling:
    starts = np.arange(0, n, factor)
    counts = np.minimum(starts + factor, n) - starts
    centres = starts + counts / 2.0  # continuous coordinates (pixel i covers [i, i + 1))
    pos = np.interp(np.arange(n) + 0.5, centres, np.arange(len(starts), dtype=np.float64))
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, len(starts) - 1)
    frac = pos - lo
    plan = _Resampling(starts, (1.0 / counts).astype(np.float32), lo, hi,
                       (1.0 - frac).astype(np.float32), frac.astype(np.float32))
    for arr in (plan.starts, plan.inv_counts, plan.lo, plan.hi, plan.w_lo, plan.w_hi):
        arr.flags.writeable = False
    return plan


def lowpass(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass of a float32 image; always a new array, so callers may reuse it.

    Fine kernels (σ < 4 px: detector blur, a fine unsharp mask) are exact separable Gaussians.
    Wide ones (scatter, range compression, a wide unsharp mask) only need the image's coarse
    content: the image is averaged over blocks of ``f = ⌊σ / 2⌋`` pixels (the last block of a
    row or column may be shorter), the block means are blurred with σ / f (edges repeated) and
    interpolated linearly back to every pixel centre (held constant beyond the outer block
    centres). That costs a few passes over the image whatever the kernel's width. Plain numpy
    reductions and gathers, no BLAS: its thread pool would contend with the worker processes.
    """
    if sigma <= 0:
        return img.copy()
    factor = int(sigma // 2)
    if factor < 2:
        return gaussian(img, sigma)
    rows, cols = _resampling(img.shape[0], factor), _resampling(img.shape[1], factor)
    small = _block_sum(_block_sum(img, factor, 0), factor, 1)
    small *= rows.inv_counts[:, None]
    small *= cols.inv_counts[None, :]
    small = gaussian(small, sigma / factor)
    wide = small[:, cols.lo] * cols.w_lo  # (blocks down, W): columns expanded while small
    wide += small[:, cols.hi] * cols.w_hi
    out = wide.take(rows.lo, axis=0)  # whole-row gathers
    out *= rows.w_lo[:, None]
    below = wide.take(rows.hi, axis=0)
    below *= rows.w_hi[:, None]
    out += below
    return out


def _block_sum(img: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """Sums over consecutive blocks of ``factor`` lines along ``axis`` (the last may be short):
    ``factor`` strided adds, one pass over the image."""
    n = img.shape[axis]
    m = -(-n // factor)
    if axis == 0:
        out = img[::factor].copy()
        for k in range(1, factor):
            part = img[k::factor]
            out[:part.shape[0]] += part
    else:
        out = img[:, ::factor].copy()
        for k in range(1, factor):
            part = img[:, k::factor]
            out[:, :part.shape[1]] += part
    assert out.shape[axis] == m
    return out


def attenuation(soft: np.ndarray, bone: np.ndarray, chain: AcquisitionChain) -> np.ndarray:
    """Effective-energy attenuation ``A = mu_soft * soft + mu_bone * bone``."""
    # float32 throughout (the coefficients are float32 scalars); in place to spare temporaries.
    a = np.multiply(soft, np.float32(chain.mu_soft), dtype=np.float32)
    a += np.multiply(bone, np.float32(chain.mu_bone), dtype=np.float32)
    return a


def beer_lambert(a: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator) -> np.ndarray:
    """Primary transmitted fraction ``I = exp(-A)``."""
    i = np.negative(a)
    return np.exp(i, out=i)


def scatter_fog(i: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator) -> np.ndarray:
    """``I + SPR * G_sigma * I``: a smooth haze that lifts the dense regions and lowers contrast."""
    sigma = chain.scatter_sigma * max(i.shape)
    out = lowpass(i, sigma)
    out *= np.float32(chain.scatter_fraction)
    out += i
    return out


def quantum_noise(i: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator) -> np.ndarray:
    """Poisson counting noise at ``dose`` photons/pixel, Gaussian approximation, plus readout.

    ``I' = I (1 + s z1) + sqrt(I / N0 + (sigma_e / N0)^2) z2``, z ~ N(0, 1), where ``s`` is the
    plate's structure noise: a storage-phosphor plate's grain is a gain that varies from
    pixel to pixel, so it shows most where the signal is high (the lungs), unlike counting
    noise; a flat panel's gain map is calibrated away (``s = 0``). The three terms are
    independent Gaussians, so one draw with their summed variance does.
    """
    n0 = chain.dose
    pos = np.maximum(i, np.float32(0))
    var = pos * np.float32(1.0 / n0)
    var += np.float32((chain.electronic_noise / n0) ** 2)
    if chain.structure_noise > 0:
        pos *= np.float32(chain.structure_noise)
        var += np.square(pos, out=pos)
    out = np.sqrt(var, out=var)
    out *= standard_normal(i.shape, rng)
    out += i
    return out


def standard_normal(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """float32 N(0, 1) draws keyed by ``rng``: torch's vectorised sampler, seeded from ``rng``,
    draws them 2-3x faster than numpy's ziggurat, and noise is the chain's largest single step."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    return torch.empty(shape, dtype=torch.float32).normal_(generator=gen).numpy()


def detector_blur(i: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator) -> np.ndarray:
    """Light spread in the phosphor / plate readout: a Gaussian of ``detector_blur_px``."""
    return lowpass(i, chain.detector_blur_px)


def log_transform(i: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator) -> np.ndarray:
    """``-log I``, floored at one photon so that noise never takes the log of zero."""
    out = np.maximum(i, np.float32(1.0 / chain.dose))
    np.log(out, out=out)
    return np.negative(out, out=out)


def range_compression(l: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator) -> np.ndarray:
    """``L - a * G_sigma * L``: flattens the lung/mediastinum gap, keeps local detail.

    What multi-scale processing does so that ribs and vessels show in the lungs and the spine
    through the heart on one image.
    """
    if chain.drc_amount == 0:
        return l
    out = lowpass(l, chain.drc_sigma * max(l.shape))
    out *= np.float32(chain.drc_amount)
    return np.subtract(l, out, out=out)


def auto_window(l: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator) -> np.ndarray:
    """Map the percentiles of the central field to [0, 1], as a reader's histogram analysis.

    The central 70 % is always exposed, so collimation and markers do not move the window.
    """
    h, w = l.shape
    core = l[int(0.15 * h):max(int(0.85 * h), int(0.15 * h) + 1):2,
             int(0.15 * w):max(int(0.85 * w), int(0.15 * w) + 1):2]
    lo, hi = percentiles(core, chain.window_percentiles)
    scale = np.float32(1.0 / max(float(hi - lo), 1e-6))
    out = np.subtract(l, np.float32(lo))
    out *= scale
    return out


def unsharp_mask(x: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator) -> np.ndarray:
    """Edge enhancement ``x + a * (x - G_sigma * x)``: overshoot halos at every edge."""
    if chain.usm_amount == 0:
        return x
    out = lowpass(x, chain.usm_sigma * max(x.shape))
    np.subtract(x, out, out=out)
    out *= np.float32(chain.usm_amount)
    out += x
    return out


def percentiles(x: np.ndarray, q: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(x, q)`` (linear interpolation) from one ``np.partition`` call, without
    percentile's general-purpose set-up, which costs as much as the partition on one image."""
    flat = x.ravel()
    pos = np.asarray(q, dtype=np.float64) / 100.0 * (flat.size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, flat.size - 1)
    part = np.partition(flat, np.unique(np.concatenate([lo, hi])))
    a, b = part[lo].astype(np.float64), part[hi].astype(np.float64)
    return tuple(float(v) for v in a + (b - a) * (pos - lo))


LUT_DOMAIN = (-0.5, 1.5)  # windowed values outside this saturate
LUT_STEPS = 8192


def lut_table(chain: AcquisitionChain) -> np.ndarray:
    """The site's gradation curve sampled on ``LUT_DOMAIN``, already quantized to its bits.

    ``y = ((s(c (x - m)) - s(-c m)) / (s(c (1 - m)) - s(-c m)))^gamma`` clipped to [0, 1], with
    ``s`` the logistic function, ``c`` = lut_contrast and ``m`` = lut_center; then rounded to
    ``2^bits - 1`` levels. A table makes the curve, gamma and quantization one lookup.
    """
    x = np.linspace(*LUT_DOMAIN, LUT_STEPS, dtype=np.float64)
    c, m = chain.lut_contrast, chain.lut_center

    def s(t):
        return 1.0 / (1.0 + np.exp(-t))

    y = (s(c * (x - m)) - s(-c * m)) / (s(c * (1 - m)) - s(-c * m))
    y = np.clip(y, 0.0, 1.0) ** chain.gamma
    levels = 2 ** chain.acquisition_bits - 1
    return (np.round(y * levels) / levels).astype(np.float32)


def apply_lut(x: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator,
              table: np.ndarray | None = None) -> np.ndarray:
    """LUT/gamma and quantization to ``acquisition_bits`` (values stay floats in [0, 1])."""
    table = lut_table(chain) if table is None else table
    lo, hi = LUT_DOMAIN
    pos = np.subtract(x, np.float32(lo))
    pos *= np.float32((LUT_STEPS - 1) / (hi - lo))
    pos += np.float32(0.5)
    np.clip(pos, 0, LUT_STEPS - 1, out=pos)
    return table.take(pos.astype(np.intp))


def binning(geom: Geometry) -> float:
    """Detector pixels per output pixel along a side: the frame's long side over the output's.

    1 when the frame is unknown or smaller than the output (interpolating up adds no grain).
    """
    if geom.frame is None:
        return 1.0
    return max(1.0, max(geom.frame.width, geom.frame.height) / max(geom.width, geom.height))


def per_output_pixel(chain: AcquisitionChain, bins: float) -> AcquisitionChain:
    """The chain's detector parameters restated for output pixels that each sum ``bins**2``
    detector pixels.

    Summing ``n = bins**2`` pixels multiplies the photons by ``n`` and the readout variance by
    ``n``, and averages ``n`` independent grain gains: dose ``x n``, readout std ``x bins``,
    grain ``/ bins``; the blur's width shrinks to ``/ bins`` output pixels. (A blur narrower than
    the bin leaves the summed noise as it was, so binning after blurring is the same.)
    """
    if bins == 1.0:
        return chain
    return replace(chain, dose=chain.dose * bins * bins,
                   electronic_noise=chain.electronic_noise * bins,
                   structure_noise=chain.structure_noise / bins,
                   detector_blur_px=chain.detector_blur_px / bins)


def develop(a: np.ndarray, chain: AcquisitionChain, rng: np.random.Generator,
            bins: float = 1.0) -> np.ndarray:
    """Attenuation in the output frame → the site's processed image, float32 in [0, 1].

    Order follows the physics, then the reader's processing: exposure, scatter, counting
    noise, detector blur (after the noise, so it shapes the grain), log, range compression,
    window, unsharp mask, gradation, quantization. ``bins``: detector pixels per output pixel
    along a side (:func:`binning`); 1 develops at the detector's own pitch.
    """
    px = per_output_pixel(chain, bins)
    img = beer_lambert(a, px, rng)
    for step in (scatter_fog, quantum_noise, detector_blur, log_transform, range_compression,
                 auto_window, unsharp_mask):
        img = step(img, px, rng)
    return apply_lut(img, px, rng, _cached_table(chain))


@functools.lru_cache(maxsize=32)
def _cached_table(chain: AcquisitionChain) -> np.ndarray:
    # The table depends only on the frozen chain: build it once per chain, not per image.
    table = lut_table(chain)
    table.flags.writeable = False
    return table


# --------------------------------------------------------------------------------------------
# Whole chain
# --------------------------------------------------------------------------------------------

@dataclass
class Radiograph:
    """One site's image of one exposure, with the truth carried into its pixels."""

    chain: str
    image: np.ndarray  # float32 (H, W) in [0, 1], quantized to ``bits``
    bits: int  # acquisition bit depth
    output_mode: str  # 8-bit PNG mode of the site ("P" or "L")
    lung_mask: np.ndarray  # uint8 (H, W): 0, 1 image-left lung, 2 image-right lung
    lesions: list[Lesion] = field(default_factory=list)
    geometry: Geometry | None = None

    @property
    def boxes(self) -> list[tuple[str, tuple[int, int, int, int]]]:
        return [(les.finding, les.box) for les in self.lesions]


def acquire_all(proj: Projection, chains: Iterable[AcquisitionChain], home: AcquisitionChain,
                size: int, seed: int | None = None, square: bool = False) -> dict[str, Radiograph]:
    """The same exposure seen by several sites: ``home``'s geometry, each chain's appearance.

    The geometry (frame, rotation, collimation, marker) is drawn once from ``home`` so the
    images are pixel-aligned with each other and with one set of masks and boxes; each chain
    then draws its own noise, binned from ``home``'s frame (:func:`binning`: one exposure, one
    frame, so every site's detector values are read at that frame's pixel count). ``seed``
    defaults to the subject's seed; ``square`` stores the frame as a ``size x size`` image
    (:func:`sample_geometry`).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    seed = proj.subject.seed if seed is None else seed
    geom = sample_geometry(home, size, proj.size, stream(seed, "geometry", home.name), square)
    warped = warp_projection(proj, geom)
    bins = binning(geom)
    out: dict[str, Radiograph] = {}
    for chain in chains:
        a = add_blocked_attenuation(attenuation(warped.soft, warped.bone, chain), geom, chain)
        image = develop(a, chain, stream(seed, "appearance", chain.name), bins)
        out[chain.name] = Radiograph(chain.name, image, chain.acquisition_bits, chain.output_mode,
                                     warped.lung_mask, warped.lesions, geom)
    return out


def acquire(proj: Projection, chain: AcquisitionChain, size: int, seed: int | None = None) -> Radiograph:
    """One site's radiograph of a projection (geometry and appearance both from ``chain``)."""
    return acquire_all(proj, [chain], chain, size, seed)[chain.name]
