"""Tiny learnable dataset trees and configs for the classifier tests.

Each tree has a real on-disk layout (Shenzhen, NIH ChestX-ray14, folder-per-class) with small
PNGs whose findings are drawn as simple, learnable marks on a chest-like background: a bright
upper-lobe blob for TB, a wide bright heart for Cardiomegaly, a bright lung base for Effusion,
a diffuse haze for Covid. A small CNN separates them within a few epochs, so "the loss goes
down" is a real check rather than noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from builders import write_lung_masks
from classifiers.config import ClassifierConfig
from cxr.engine.config import load_config
from cyclegan_helpers import chest_like

SIZE = 32
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def draw(findings: Sequence[str], seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    """A chest-like [0, 1] image with a mark for each finding."""
    img = chest_like(h, w, seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    if "Tuberculosis" in findings:
        img += 0.6 * np.exp(-(((xx - 0.3) / 0.1) ** 2 + ((yy - 0.3) / 0.1) ** 2))
    if "Cardiomegaly" in findings:
        img += 0.5 * np.exp(-(((xx - 0.55) / 0.2) ** 2 + ((yy - 0.65) / 0.12) ** 2))
    if "Effusion" in findings:
        img += 0.5 * (yy > 0.75)
    if "Covid" in findings:
        img = 0.6 * img + 0.4
    return np.clip(img, 0, 1)


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(path)


def shenzhen_tree(root: Path, n: int = 40, seed: int = 0, positives: bool = True) -> Path:
    """``root/ChinaSet_AllFiles`` with ``n`` images, label ``i % 2`` (all 0 if not ``positives``)."""
    folder = root / "ChinaSet_AllFiles"
    for i in range(n):
        label = i % 2 if positives else 0
        stem = f"CHNCXR_{i + 1:04d}_{label}"
        _save(folder / "CXR_png" / f"{stem}.png", draw(["Tuberculosis"] if label else [], seed * 1000 + i))
        (folder / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (folder / "ClinicalReadings" / f"{stem}.txt").write_text(
            f"{'male' if i % 3 else 'female'} {30 + i}yrs\n{'upper lobe TB' if label else 'normal'}\n")
    return folder


def montgomery_tree(root: Path, n: int = 20, seed: int = 1) -> Path:
    """``root/MontgomerySet`` with ``n`` images (label ``i % 2``), the other site's test set."""
    folder = root / "MontgomerySet"
    for i in range(n):
        label = i % 2
        stem = f"MCUCXR_{i + 1:04d}_{label}"
        _save(folder / "CXR_png" / f"{stem}.png", draw(["Tuberculosis"] if label else [], seed * 1000 + i) ** 1.2)
        (folder / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (folder / "ClinicalReadings" / f"{stem}.txt").write_text(
            f"Patient's Sex: {'M' if i % 3 else 'F'} \nPatient's Age: 0{30 + i}Y\n\n{'TB' if label else 'normal'}\n")
        write_lung_masks(folder, stem, SIZE, SIZE)
    return folder


NIH_CYCLE = ("No Finding", "Cardiomegaly", "Effusion", "Cardiomegaly|Effusion")


def nih_tree(root: Path, n: int = 48, seed: int = 2, ages: Sequence[object] | None = None) -> Path:
    """An NIH ChestX-ray14 tree (``Data_Entry_2017.csv`` + ``images/``), one image per patient,
    findings cycling through :data:`NIH_CYCLE`. ``ages`` overrides the age column (e.g. blanks)."""
    rows = []
    for i in range(n):
        findings = NIH_CYCLE[i % len(NIH_CYCLE)]
        name = f"{i + 1:08d}_000.png"
        _save(root / "images" / name, draw(findings.split("|"), seed * 1000 + i))
        age = 30 + i % 50 if ages is None else ages[i % len(ages)]
        rows.append(f"{name},{findings},0,{i + 1},{age},{'M' if i % 2 else 'F'},{'PA' if i % 3 else 'AP'},"
                    f"2500,2048,0.143,0.143,")
    (root / "Data_Entry_2017.csv").write_text("\n".join([NIH_HEADER, *rows]) + "\n")
    return root


NINE_CLASSES = ("No Finding", "Tuberculosis", "Covid")


def nine_tree(root: Path, per_class: int = 14, seed: int = 3) -> Path:
    """A folder-per-class tree with three of the nine classes."""
    for c, name in enumerate(NINE_CLASSES):
        for i in range(per_class):
            _save(root / name / f"{name.replace(' ', '')}-{i}.png", draw([name], seed * 1000 + 100 * c + i))
    return root


FAST = ["data.size=32", "data.decode_workers=1", "device=cpu", "model.options={width: 4, dropout: 0.0}",
        "train.batch_size=8", "train.log_every=2", "eval.n_boot=20", "augment.enabled=false",
        "train.channels_last=false"]


def tiny_config(task: str, train: Path | Sequence[Path], cache: Path, *overrides: str) -> ClassifierConfig:
    """A classifier config small enough for a CPU test (32², 4-filter small CNN)."""
    trees = [train] if isinstance(train, Path) else list(train)
    base = [f"task={task}", f"data.train=[{','.join(str(t) for t in trees)}]", f"data.cache_dir={cache}",
            "train.epochs=3", "optim.lr=0.01", *FAST]
    return load_config(ClassifierConfig, None, base + list(overrides))
