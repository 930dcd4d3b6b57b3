"""Tiny NLM-layout trees and CycleGAN configs for the CycleGAN tests.

The trees have the exact on-disk layout of the real Montgomery and Shenzhen sets (CXR_png,
ClinicalReadings, ManualMask for Montgomery) with small PNGs, so every loader and the
translation code see what they see on real data. Domain B's images are a gamma-brightened,
smoothed version of domain A's kind of image, so there is something to translate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from builders import write_lung_masks
from cxr.engine.config import load_config
from gan.cyclegan.config import CycleGANConfig

MONTGOMERY_READING = "Patient's Sex: {sex} \nPatient's Age: 0{age}Y\n\n{body}\n"
SHENZHEN_READING = "{sex} {age}yrs\n{body}\n"


def chest_like(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth two-lung pattern in [0, 1] with some per-image variation."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.75 - 0.25 * yy
    for cx in (0.3, 0.7):
        r = ((xx - cx - rng.normal(0, 0.02)) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2
        img -= 0.45 * np.exp(-r ** 2)
    img += rng.normal(0, 0.03, (h, w))
    return np.clip(img, 0, 1)


def _save(path: Path, img: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L")
    if mode == "L":
        gray.save(path)
    elif mode == "P":
        gray.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(path)
    elif mode == "I;16":
        Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(path)
    else:
        gray.convert(mode).save(path)


def nlm_site(root: Path, site: str, n: int, sizes: Sequence[tuple[int, int]] = ((40, 34),),
             mode: str | None = None, seed: int = 0) -> Path:
    """Write ``root/MontgomerySet`` or ``root/ChinaSet_AllFiles`` with ``n`` images.

    Image ``i`` has size ``sizes[i % len(sizes)]`` (h, w) and label ``i % 2``; Montgomery gets
    left/right lung masks. Shenzhen images are palette PNGs (as the real set), Montgomery 8-bit
    gray, unless ``mode`` says otherwise.
    """
    montgomery = site == "montgomery"
    folder = root / ("MontgomerySet" if montgomery else "ChinaSet_AllFiles")
    prefix = "MCUCXR" if montgomery else "CHNCXR"
    mode = mode or ("L" if montgomery else "P")
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        stem = f"{prefix}_{i + 1:04d}_{i % 2}"
        img = chest_like(h, w, seed * 1000 + i)
        if not montgomery:  # the "other site": brighter mid-tones, softer
            img = np.clip(img ** 0.6, 0, 1)
        _save(folder / "CXR_png" / f"{stem}.png", img, mode)
        body = "normal" if i % 2 == 0 else "right upper lobe infiltrate, TB"
        reading = (MONTGOMERY_READING.format(sex="M" if i % 3 else "F", age=30 + i, body=body) if montgomery
                   else SHENZHEN_READING.format(sex="male" if i % 3 else "female", age=30 + i, body=body))
        (folder / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (folder / "ClinicalReadings" / f"{stem}.txt").write_text(reading)
        if montgomery:
            write_lung_masks(folder, stem, h, w)
    return folder


def tiny_config(a: Path, b: Path, cache: Path, *overrides: str) -> CycleGANConfig:
    """A CycleGAN config small enough for a CPU test: 32², 4-filter ResNet-6, a few steps."""
    base = [f"data.a={a}", f"data.b={b}", f"data.cache_dir={cache}", "data.size=32", "data.decode_workers=1",
            "model.generator=resnet6", "model.ngf=4", "model.ndf=4", "model.d_layers=2",
            "train.batch_size=2", "train.steps=4", "train.log_every=2", "train.image_every=2",
            "train.ckpt_every=2", "train.channels_last=false", "optim.lr=0.002", "device=cpu"]
    return load_config(CycleGANConfig, None, base + list(overrides))
