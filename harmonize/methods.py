"""Classical harmonizers behind one interface: fit on the target domain, apply to source images.

A harmonizer is fitted on images of the *target* domain (the reference tree's patient-level
training split, see :mod:`harmonize.trees`) and then maps any source image (float, [0, 1],
(H, W)) into the target's style::

    h = create_harmonizer("fda", beta=0.03).fit(target_images)
    digest = h.save("fda.safetensors")          # fitted state + method + options
    same = load_harmonizer("fda.safetensors")   # same output, byte for byte
    out = same.apply(source_image)

Methods, by registered name (:data:`HARMONIZERS`):

* ``histogram``: histogram matching to the reference set's barycenter, optionally over the
  central ``field`` of each side (:mod:`harmonize.histogram`);
* ``lung-histogram``: the same, with both distributions taken inside the lung masks only;
* ``percentile``: each image's ``low``-``high`` percentile range mapped linearly onto the
  reference's mean ``low``/``high`` percentiles;
* ``zscore``: each image standardized (over the image, or the lungs with ``region="lungs"``)
  and given the reference's mean and standard deviation;
* ``clahe``: contrast-limited adaptive histogram equalization (not fitted);
* ``fda``: Fourier domain adaptation (Yang & Soatto 2020): the centred low-frequency square
  (relative size ``beta``) of the amplitude spectrum replaced by the reference's mean amplitude,
  the phase kept.

Methods that use lung masks take them as ``apply(image, mask)`` (nonzero inside the lungs)
and fall back to the whole image when given none; the tree level says so once.
The fitted state is a safetensors file: the arrays, plus the method and its options as metadata.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import kornia
import numpy as np
import safetensors.numpy
import torch
import torch.nn.functional as F

from cxr.data.io import atomic_write
from cxr.errors import ConfigError, DataError
from harmonize.histogram import (
    DEFAULT_LEVELS,
    HistogramReference,
    check_field,
    fit_reference,
    match_histogram,
    quantile_function,
)

FORMAT = "cxr-harmonizer"
HARMONIZERS: dict[str, type[Harmonizer]] = {}


def register_harmonizer(name: str) -> Callable[[type[Harmonizer]], type[Harmonizer]]:
    """Class decorator: make a :class:`Harmonizer` subclass available by ``name``."""

    def register(cls: type[Harmonizer]) -> type[Harmonizer]:
        if name in HARMONIZERS:
            raise ValueError(f"harmonizer {name!r} registered twice")
        cls.name = name
        HARMONIZERS[name] = cls
        return cls

    return register


def create_harmonizer(name: str, **options: Any) -> Harmonizer:
    """A new, unfitted harmonizer of method ``name`` with ``options`` (the rest default)."""
    if name not in HARMONIZERS:
        raise ConfigError(f"unknown harmonization method {name!r} (choose from: {', '.join(HARMONIZERS)})")
    return HARMONIZERS[name](**options)


def load_harmonizer(path: str | Path, method: str | None = None) -> Harmonizer:
    """The fitted harmonizer saved at ``path`` (:meth:`Harmonizer.save`); ``method``, when given,
    must be the one saved."""
    return Harmonizer.from_bytes(_read(path), path, method)


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(path, "fitted harmonizer not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a folder, not a fitted harmonizer file") from None


class Harmonizer:
    """Base class: options in, :meth:`fit` on target images, :meth:`apply` to source images.

    Subclasses declare ``defaults`` (every option with its default), check them in
    :meth:`check`, and keep their fitted state as named float64 arrays (:meth:`state`,
    :meth:`set_state`). ``fitted`` is False for methods that need no reference.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    fitted: ClassVar[bool] = True

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            takes = ", ".join(self.defaults) or "none"
            raise ConfigError(f"method {self.name} takes no option {unknown[0]!r} (its options: {takes})")
        self.options = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        self.check()
        self.n_images = 0
        self._state: dict[str, np.ndarray] | None = None if self.fitted else {}

    # -- to override --------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`ConfigError` for an option out of range."""

    def fit_state(self, images: list[np.ndarray], masks: list[np.ndarray | None]) -> dict[str, np.ndarray]:
        return {}

    def transform(self, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    @property
    def uses_masks(self) -> bool:
        """Whether :meth:`apply` (and :meth:`fit`) read lung masks."""
        return False

    # -- the interface ------------------------------------------------------------------------
    def fit(self, images: Iterable[np.ndarray], masks: Iterable[np.ndarray | None] | None = None) -> Harmonizer:
        """Fit on target-domain ``images`` (with one lung mask or None each, for mask methods)."""
        images = [np.asarray(im, dtype=np.float64) for im in images]
        if not images:
            raise ValueError(f"cannot fit harmonizer {self.name} to zero images")
        masks = [None] * len(images) if masks is None else list(masks)
        if len(masks) != len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images")
        self._state = {k: np.asarray(v, dtype=np.float64) for k, v in self.fit_state(images, masks).items()}
        self.n_images = len(images)
        return self

    def apply(self, image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """``image`` (float (H, W)) in the target's style: float32 of the same shape."""
        if self._state is None:
            raise RuntimeError(f"harmonizer {self.name} is not fitted")
        x = np.asarray(image, dtype=np.float64)
        if x.ndim != 2 or x.size == 0:
            raise ValueError(f"harmonizers take one (H, W) image, got shape {x.shape}")
        region = None
        if mask is not None and self.uses_masks:
            region = np.asarray(mask) != 0
            if region.shape != x.shape:
                raise ValueError(f"mask of shape {region.shape} for an image of shape {x.shape}")
            if not region.any():
                region = None
        return np.asarray(self.transform(x, region), dtype=np.float32)

    def state(self) -> dict[str, np.ndarray]:
        if self._state is None:
            raise RuntimeError(f"harmonizer {self.name} is not fitted")
        return dict(self._state)

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self._state = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}

    def to_bytes(self) -> bytes:
        """The fitted state as safetensors bytes (method, options and image count as metadata)."""
        meta = {"format": FORMAT, "method": self.name, "options": json.dumps(self.options, sort_keys=True),
                "n_images": str(self.n_images)}
        return _safetensors(self.state(), meta)

    def state_hash(self) -> str:
        """SHA-256 of :meth:`to_bytes`: names the fitted state in manifests."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> str:
        """Write the fitted state to ``path`` atomically; returns its SHA-256."""
        data = self.to_bytes()
        atomic_write(path, lambda f: f.write(data))
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def from_bytes(data: bytes, where: str | Path = "fitted harmonizer", method: str | None = None) -> Harmonizer:
        meta = _metadata(data, where)
        name = meta["method"]
        if name not in HARMONIZERS:
            raise DataError(where, f"fitted state of unknown method {name!r}")
        if method is not None and method != name:
            raise DataError(where, f"fitted state of method {name}, not {method}")
        try:
            h = HARMONIZERS[name](**json.loads(meta["options"]))
            h.set_state(safetensors.numpy.load(data))
            h.n_images = int(meta.get("n_images", 0))
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(where, f"unreadable fitted harmonizer ({e})") from None
        return h


def _safetensors(arrays: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """Float64 ``arrays`` and string ``meta`` in the safetensors format, byte for byte the same
    for the same input (keys sorted; the safetensors writer orders its header by hash)."""
    header: dict[str, Any] = {"__metadata__": meta}
    chunks, offset = [], 0
    for key in sorted(arrays):
        data = np.ascontiguousarray(arrays[key], dtype="<f8").tobytes()
        header[key] = {"dtype": "F64", "shape": list(np.shape(arrays[key])), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _metadata(data: bytes, where: str | Path) -> dict[str, str]:
    """The safetensors header's metadata, checked to be a harmonizer's."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError):
        meta = {}
    if meta.get("format") != FORMAT or "method" not in meta or "options" not in meta:
        raise DataError(where, "not a fitted harmonizer (a safetensors file written by cxr harmonize)")
    return meta


def _number(h: Harmonizer, key: str, lo: float, hi: float, lo_open: bool = False, integer: bool = False) -> None:
    v = h.options[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok or (integer and int(v) != v):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"method {h.name}: {key} must be {kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")


# ----------------------------------------------------------------------------------------------
# Histogram matching


@register_harmonizer("histogram")
class HistogramMatching(Harmonizer):
    """Histogram matching to the reference set's barycenter; ``field`` < 1 takes both
    distributions from the central field only (:mod:`harmonize.histogram`)."""

    defaults = {"field": 1.0, "levels": DEFAULT_LEVELS}

    def check(self) -> None:
        try:
            check_field(float(self.options["field"]))
        except (ValueError, TypeError):
            raise ConfigError(f"--field must be in (0, 1], got {self.options['field']}") from None
        _number(self, "levels", 2, 1 << 20, integer=True)

    def fit_state(self, images, masks):
        ref = fit_reference(images, n_levels=int(self.options["levels"]), field=float(self.options["field"]))
        return {"quantiles": ref.quantiles}

    @property
    def reference(self) -> HistogramReference:
        return HistogramReference(self.state()["quantiles"], self.n_images, float(self.options["field"]))

    def transform(self, image, mask):
        return match_histogram(image, self.reference)


@register_harmonizer("lung-histogram")
class LungHistogramMatching(Harmonizer):
    """Histogram matching with both distributions taken inside the lung masks (the mediastinum,
    abdomen, arms and air do not count); the curve applies to every pixel. Without a mask: the
    whole image."""

    defaults = {"levels": DEFAULT_LEVELS}

    @property
    def uses_masks(self) -> bool:
        return True

    def check(self) -> None:
        _number(self, "levels", 2, 1 << 20, integer=True)

    def fit_state(self, images, masks):
        n = int(self.options["levels"])
        total = np.zeros(n)
        for image, mask in zip(images, masks):
            inside = None if mask is None or not np.any(mask) else np.asarray(mask) != 0
            total += quantile_function(image, n, inside)
        return {"quantiles": np.maximum.accumulate(total / len(images))}

    def transform(self, image, mask):
        return match_histogram(image, HistogramReference(self.state()["quantiles"], self.n_images), mask)


# ----------------------------------------------------------------------------------------------
# Intensity standardization


@register_harmonizer("percentile")
class PercentileStandardization(Harmonizer):
    """Each image's ``low`` and ``high`` percentiles mapped linearly onto the reference's mean
    ``low`` and ``high`` percentiles (an image with one gray level goes to their midpoint)."""

    defaults = {"low": 1.0, "high": 99.0}

    def check(self) -> None:
        _number(self, "low", 0, 100)
        _number(self, "high", 0, 100)
        if not self.options["low"] < self.options["high"]:
            raise ConfigError(f"method percentile: low ({self.options['low']}) must be below high "
                              f"({self.options['high']})")

    def _pcts(self, image: np.ndarray) -> np.ndarray:
        return np.percentile(image, [self.options["low"], self.options["high"]])

    def fit_state(self, images, masks):
        return {"percentiles": np.mean([self._pcts(im) for im in images], axis=0)}

    def transform(self, image, mask):
        lo, hi = self._pcts(image)
        ref_lo, ref_hi = self.state()["percentiles"]
        if hi <= lo:
            return np.full(image.shape, (ref_lo + ref_hi) / 2.0)
        return ref_lo + (image - lo) * ((ref_hi - ref_lo) / (hi - lo))


def standardize(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``image`` less its mean, over its standard deviation, both taken inside ``mask`` (or over
    the whole image): zero mean and unit variance there. A flat region gives zeros."""
    x = np.asarray(image, dtype=np.float64)
    values = x[np.asarray(mask, dtype=bool)] if mask is not None else x
    mean, std = values.mean(), values.std()
    return (x - mean) / std if std > 0 else x - mean


@register_harmonizer("zscore")
class ZScoreStandardization(Harmonizer):
    """Each image standardized (:func:`standardize`) and given the reference's mean and standard
    deviation (each the mean over the reference images); ``region="lungs"`` takes every
    statistic inside the lung masks (the whole image where a mask is missing)."""

    defaults = {"region": "image"}

    @property
    def uses_masks(self) -> bool:
        return self.options["region"] == "lungs"

    def check(self) -> None:
        if self.options["region"] not in ("image", "lungs"):
            raise ConfigError(f"method zscore: region must be image or lungs, got {self.options['region']!r}")

    def fit_state(self, images, masks):
        stats = []
        for image, mask in zip(images, masks):
            use = mask is not None and self.uses_masks and np.any(mask)
            values = image[np.asarray(mask) != 0] if use else image
            stats.append((values.mean(), values.std()))
        return {"mean_std": np.mean(stats, axis=0)}

    def transform(self, image, mask):
        mean, std = self.state()["mean_std"]
        return standardize(image, mask) * std + mean


# ----------------------------------------------------------------------------------------------
# CLAHE


@register_harmonizer("clahe")
class Clahe(Harmonizer):
    """Contrast-limited adaptive histogram equalization (kornia): each tile of a ``grid`` x
    ``grid`` layout equalized with its histogram clipped at ``clip_limit``, tiles blended
    bilinearly. Needs no reference."""

    defaults = {"clip_limit": 2.0, "grid": 8}
    fitted = False

    def check(self) -> None:
        _number(self, "clip_limit", 0, 1e6, lo_open=True)
        _number(self, "grid", 1, 256, integer=True)

    def transform(self, image, mask):
        g = int(self.options["grid"])
        x = torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32))[None, None]
        out = kornia.enhance.equalize_clahe(x, clip_limit=float(self.options["clip_limit"]), grid_size=(g, g))
        return out[0, 0].numpy()


# ----------------------------------------------------------------------------------------------
# Fourier domain adaptation


def low_frequency_square(shape: tuple[int, int], beta: float) -> np.ndarray:
    """Bool mask, in unshifted FFT order, of the centred square of half-width
    ``floor(min(H, W) * beta)`` frequencies around DC (Yang & Soatto 2020); symmetric under
    k -> -k, so swapping amplitudes inside it keeps a real image real."""
    h, w = shape
    b = int(np.floor(min(h, w) * beta))
    ky = np.abs(np.fft.fftfreq(h) * h)[:, None]
    kx = np.abs(np.fft.fftfreq(w) * w)[None, :]
    return (ky <= b) & (kx <= b)


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.shape == tuple(shape):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float64))[None, None]
    return F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


@register_harmonizer("fda")
class FourierDomainAdaptation(Harmonizer):
    """FDA (Yang & Soatto 2020) at a ``size`` x ``size`` working resolution: the source's
    amplitude spectrum inside the centred low-frequency square (relative half-size ``beta``,
    0.01-0.05 in the paper) is replaced by the reference images' mean amplitude; the phase
    stays the source's. The change is computed at the working size and added, upsampled, to
    the source, so the source's own detail is kept. Fitted state: the mean amplitude."""

    defaults = {"beta": 0.03, "size": 256}

    def check(self) -> None:
        _number(self, "beta", 0, 0.5, lo_open=True)
        _number(self, "size", 8, 4096, integer=True)

    def _shape(self) -> tuple[int, int]:
        s = int(self.options["size"])
        return s, s

    def fit_state(self, images, masks):
        total = np.zeros(self._shape())
        for image in images:
            total += np.abs(np.fft.fft2(_resize(image, self._shape())))
        return {"amplitude": total / len(images)}

    def transform(self, image, mask):
        small = _resize(image, self._shape())
        spectrum = np.fft.fft2(small)
        square = low_frequency_square(self._shape(), float(self.options["beta"]))
        amplitude = np.where(square, self.state()["amplitude"], np.abs(spectrum))
        swapped = np.real(np.fft.ifft2(amplitude * np.exp(1j * np.angle(spectrum))))
        if image.shape == self._shape():
            return swapped
        return image + _resize(swapped - small, image.shape)
