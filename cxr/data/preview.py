"""Contact sheets: images as the pipeline decodes and preprocesses them, labels underneath.

``DISPLAY_WINDOW`` is the percentile window ``cxr datasets preview`` applies unless told
otherwise: a DICOM whose VOI window spans the whole stored range (common for CR) decodes to a
narrow band such as 0.24–0.93, which on a sheet is a gray fog.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr.data import preprocess
from cxr.data.image import load_image
from cxr.data.io import atomic_write
from cxr.data.preprocess import Preprocess
from cxr.data.record import Sample

CAPTION_H = 14
DISPLAY_WINDOW = (0.5, 99.5)  # percentiles of each image stretched to black..white


def pick(records: Sequence[Sample], n: int, seed: int = 0) -> list[Sample]:
    """Up to ``n`` records, round-robin over label combinations so every class shows."""
    groups: dict[tuple[str, ...], list[Sample]] = {}
    for r in records:
        groups.setdefault(r.findings, []).append(r)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(len(g))) for g in groups.values()]
    members = list(groups.values())
    out: list[Sample] = []
    while len(out) < n and any(queues):
        for g, q in zip(members, queues):
            if q and len(out) < n:
                out.append(g[q.pop(0)])
    return out


def caption(r: Sample) -> str:
    return f"{r.site} | " + (", ".join(r.findings) or "no finding")


def contact_sheet(records: Sequence[Sample], out: str | Path, pre: Preprocess = Preprocess(size=192),
                  columns: int = 4, captions: Sequence[str] | None = None) -> Path:
    """Write a PNG grid of the preprocessed images of ``records`` with captions.

    At most ``columns`` per row, fewer when there are fewer images (one image: one tile).
    """
    from PIL import Image, ImageDraw

    records = list(records)
    if not records:
        raise ValueError("no records to show")
    columns = max(1, min(columns, len(records)))
    rows = (len(records) + columns - 1) // columns
    tile = pre.size
    sheet = Image.new("L", (columns * tile, rows * (tile + CAPTION_H)), color=0)
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(records):
        img = preprocess.apply(load_image(r.image), pre)
        x, y = (i % columns) * tile, (i // columns) * (tile + CAPTION_H)
        sheet.paste(Image.fromarray(np.round(img * 255).astype(np.uint8)), (x, y))
        text = captions[i] if captions is not None else caption(r)
        draw.text((x + 2, y + tile + 1), text[: tile // 6], fill=255)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write(out, lambda f: f.write(buf.getvalue()))
