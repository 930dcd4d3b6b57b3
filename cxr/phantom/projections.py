"""The bundled CT's yaw-bin projections, computed once by ``make_assets`` and shipped.

Every phantom run renders from the CT projected at the :data:`~cxr.phantom.render.YAW_BINS`
(:func:`~cxr.phantom.render.base_maps`). For the bundled CT those maps are fixed data, so
``assets/chest_ct_projections.npz`` ships them (1.8 MB beside the CT's 1.7): a run reads
them in ~30 ms instead of loading the CT, laying it out and projecting five bins (0.3 s of a
2-core machine's set-up, before the first image). The CT itself is then read only if
something asks for its voxels (:class:`~cxr.phantom.anatomy.LazyAnatomy`).

The asset records the SHA-256 of the CT file it was projected from and the rendering
constants it depends on; if either differs (a rebuilt CT, a changed padding) it is ignored
and the maps are computed as for a user's CT. A test recomputes them from the CT and requires
them equal to the bit, so a change to the projection code cannot go unnoticed:
``python -m cxr.phantom.make_assets --projections`` rebuilds the asset.
"""

from __future__ import annotations

import hashlib
import zipfile
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import numpy as np
import torch

from cxr.phantom import render as R
from cxr.phantom.anatomy import ASSET, Anatomy, LazyAnatomy, load_anatomy

PROJECTIONS_ASSET = "chest_ct_projections.npz"
# What a shipped map depends on besides the CT's bytes; a change to any voids the asset.
_FORMAT = 1


def _constants() -> np.ndarray:
    return np.array([_FORMAT, R.FOV_MM, R.FOV_TOP_MM, R.PAD_ROWS, R.PAD_COLS, R.FOLD_MM,
                     R.SPINE_HALF_MM, R.BONE_FADE_MM, R.LUNG_MIN_CM, R.HEART_MIN_CM,
                     R.ABDOMEN_MIN_CM, R.N_CHANNELS], np.float64)


def _asset(name: str) -> Traversable:
    return resources.files("cxr.phantom") / "assets" / name


def ct_digest() -> str:
    """SHA-256 of the bundled CT asset's bytes."""
    return hashlib.sha256(_asset(ASSET).read_bytes()).hexdigest()


def projection_arrays(anatomy: Anatomy, digest: str) -> dict[str, np.ndarray]:
    """Every yaw bin of ``anatomy`` projected, as the asset's arrays."""
    R.warm_base_maps(anatomy, R.YAW_BINS)
    out: dict[str, np.ndarray] = {"yaws": np.array(R.YAW_BINS, np.float64),
                                  "constants": _constants(), "ct_sha256": np.array(digest)}
    marks = []
    for i, yaw in enumerate(R.YAW_BINS):
        base = anatomy.cache[("base", yaw)]
        out[f"maps_{i}"] = base.maps[0].numpy()
        marks.append([base.dx, base.dz, base.x_center, base.apex_z, *base.heart_center, *base.heart_radii])
    out["landmarks"] = np.array(marks, np.float64)  # per bin: dx, dz, x_center, apex_z, heart (x, z), radii
    return out


def read_projections(ref: Traversable | Any = None, digest: str | None = None) -> dict[Any, R.BaseMaps] | None:
    """The shipped maps as :func:`~cxr.phantom.render.base_maps` caches them, or None when the
    asset is missing, unreadable, or made from another CT or other rendering constants."""
    ref = ref if ref is not None else _asset(PROJECTIONS_ASSET)
    try:
        with ref.open("rb") as fh, np.load(fh) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    try:
        digest = digest if digest is not None else ct_digest()
    except OSError:  # no CT to compare with: loading it will say so, naming the file
        return None
    try:
        if (str(arrays["ct_sha256"]) != digest
                or not np.array_equal(arrays["constants"], _constants())
                or tuple(arrays["yaws"].tolist()) != R.YAW_BINS):
            return None
        cache = {}
        for i, yaw in enumerate(R.YAW_BINS):
            maps = arrays[f"maps_{i}"]
            if maps.dtype != np.float32 or maps.ndim != 3 or maps.shape[0] != R.N_CHANNELS:
                return None
            dx, dz, xc, apex, hx, hz, rx, rz = (float(v) for v in arrays["landmarks"][i])
            cache[("base", yaw)] = R.BaseMaps(torch.from_numpy(maps)[None], dx, dz, xc, apex, (hx, hz), (rx, rz))
    except (KeyError, IndexError, ValueError):
        return None
    return cache


def bundled_anatomy() -> Anatomy:
    """The bundled CT with its yaw bins already projected (from the shipped asset, when it
    matches); its voxels are read only if something needs them."""
    anatomy = LazyAnatomy(load_anatomy, source=f"bundled:{ASSET}")
    anatomy.cache.update(read_projections() or {})
    return anatomy
