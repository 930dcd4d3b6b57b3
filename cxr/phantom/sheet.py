"""Paired contact sheet of a phantom tree: the same subject through every acquisition chain.

Rows are subjects (a normal one, a TB one, then one per other finding present), columns are
sites, so the domain shift is seen with the anatomy and disease held fixed. Lesion boxes from
the manifest are outlined in the last column.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cxr.data.image import load_image
from cxr.data.io import atomic_write

if TYPE_CHECKING:
    from PIL.Image import Image as Picture

CAPTION_H = 14


def read_manifest(truth: str | Path) -> list[dict[str, str]]:
    """Rows of ``phantom_truth/manifest.csv``."""
    with open(Path(truth) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def site_columns(row: dict[str, str]) -> list[str]:
    """Site names that have a render column in the manifest, in file order."""
    return [k[len("render_"):] for k in row if k.startswith("render_")]


def choose_subjects(root: str | Path, max_rows: int = 6, skip: Sequence[str] = ()
                    ) -> list[tuple[Path, dict[str, str]]]:
    """Subjects of phantom tree ``root``: a normal one, a TB one, then one per further finding
    set, leaving out finding sets in ``skip`` (``""`` is normal). Returns (root, row) pairs."""
    rows = read_manifest(Path(root) / "phantom_truth")
    picked: list[dict[str, str]] = []
    seen: set[str] = set(skip)
    for want in ("", "Tuberculosis"):
        for r in rows:
            if r["findings"] == want and want not in seen:
                picked.append(r)
                seen.add(want)
                break
    for r in rows:
        if r["findings"] not in seen:
            picked.append(r)
            seen.add(r["findings"])
    return [(Path(root), r) for r in picked[:max_rows]]


def fit_tile(img: np.ndarray, tile: int) -> Picture:
    """An (H, W) [0, 1] image as an 8-bit picture scaled so its long side is ``tile`` pixels."""
    from PIL import Image

    h, w = img.shape
    scale = tile / max(h, w)
    gray = Image.fromarray(np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8))
    return gray.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)


def save_png(picture: Picture, out: str | Path) -> Path:
    """Write a picture as a PNG atomically (temp file, then rename)."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return atomic_write(out, lambda f: f.write(buf.getvalue()))


def paired_sheet(picks: Sequence[tuple[Path, dict[str, str]]], out: str | Path, tile: int = 192) -> Path:
    """Write a PNG with one row per picked subject and one column per site."""
    from PIL import Image, ImageDraw

    if not picks:
        raise ValueError("no subjects to show")
    sites = site_columns(picks[0][1])
    sheet = Image.new("L", (len(sites) * tile, len(picks) * (tile + CAPTION_H)), 0)
    draw = ImageDraw.Draw(sheet)
    for i, (base, row) in enumerate(picks):
        y = i * (tile + CAPTION_H)
        for j, site in enumerate(sites):
            img = load_image(base / row[f"render_{site}"])
            scale = tile / max(img.shape)
            sheet.paste(fit_tile(img, tile), (j * tile, y))
            if j == len(sites) - 1:
                for box in json.loads(row["boxes"] or "[]"):
                    x0, y0, x1, y1 = (v * scale for v in box["box"])
                    draw.rectangle([j * tile + x0, y + y0, j * tile + x1 - 1, y + y1 - 1], outline=255)
            label = row["findings"].replace("|", ", ") or "normal"
            draw.text((j * tile + 2, y + tile + 1), f"{site}: {label}"[: tile // 6], fill=255)
    return save_png(sheet, out)
