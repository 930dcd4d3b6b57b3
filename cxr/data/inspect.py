"""What a dataset tree holds and what is wrong with it: the engine of ``cxr datasets inspect``.

Loads the tree in collecting mode (every problem recorded, none fatal), then checks every
image's header and integrity, and summarizes counts per label, patient, site and split, image
sizes and bit depths. Returns plain dicts so the CLI can print text or JSON.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxr.data.image import check_image
from cxr.data.layouts import LoadedDataset, load_tree
from cxr.data.problems import Problems
from cxr.errors import DataError


def label_counts(ds: LoadedDataset) -> dict[str, dict[str, int]]:
    """Per label: positive, negative and unlabelled (NaN) image counts."""
    m = ds.label_matrix()
    out = {}
    for j, name in enumerate(ds.label_names):
        col = m[:, j] if len(m) else np.zeros(0)
        out[name] = {"positive": int((col == 1).sum()), "negative": int((col == 0).sum()),
                     "unlabelled": int(np.isnan(col).sum())}
    return out


def inspect_tree(path: str | Path, layout: str | None = None, max_images: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 labels_csv: str | Path | None = None) -> dict[str, Any]:
    """Summary and problem list of the tree at ``path`` (see module docstring)."""
    problems = Problems(skip_bad=True)
    ds = load_tree(path, layout=layout, problems=problems, labels_csv=labels_csv)
    sizes: Counter[tuple[int, int]] = Counter()
    depths: Counter[int] = Counter()
    modes: Counter[str] = Counter()
    checked = 0
    bad_images: set[str] = set()
    for rec in ds.records[: max_images if max_images is not None else None]:
        try:
            info = check_image(rec.image)
        except DataError as e:
            problems.report(e.where, e.problem)
            bad_images.add(rec.image)
        else:
            sizes[(info.width, info.height)] += 1
            depths[info.bit_depth] += 1
            modes[info.mode] += 1
        checked += 1
        if progress:
            progress(1)
    widths = [w for (w, _), n in sizes.items() for _ in range(n)]
    heights = [h for (_, h), n in sizes.items() for _ in range(n)]
    patients = Counter(r.patient_id for r in ds.records)
    return {
        "path": str(path),
        "layout": ds.layout,
        "origin": ds.origin,
        "images": len(ds.records),
        "patients": len(patients),
        "max_images_per_patient": max(patients.values(), default=0),
        "sites": dict(Counter(r.site for r in ds.records)),
        "splits": dict(Counter(r.split or "-" for r in ds.records)),
        "labels": label_counts(ds),
        "checked_images": checked,
        "unreadable_images": len(bad_images),
        "image_size": {
            "min": [min(widths, default=0), min(heights, default=0)],
            "max": [max(widths, default=0), max(heights, default=0)],
            "distinct": len(sizes),
        },
        "bit_depth": {str(k): v for k, v in sorted(depths.items())},
        "modes": dict(modes),
        "problems": [{"where": p.where, "problem": p.problem} for p in problems.items],
    }


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_tree`'s result."""
    lines = [
        f"layout: {s['layout']}    origin: {s['origin']}    root: {s['path']}",
        f"images: {s['images']}    patients: {s['patients']} (max {s['max_images_per_patient']} images/patient)",
        "sites: " + ", ".join(f"{k} {v}" for k, v in s["sites"].items()),
        "splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
        "labels (positive / negative / unlabelled):",
    ]
    for name, c in s["labels"].items():
        lines.append(f"  {name:<22} {c['positive']:>7} / {c['negative']:>7} / {c['unlabelled']:>7}")
    size = s["image_size"]
    lines.append(f"image size: {size['min'][0]}x{size['min'][1]} .. {size['max'][0]}x{size['max'][1]} "
                 f"({size['distinct']} distinct; {s['checked_images']} checked)")
    lines.append("bit depth: " + ", ".join(f"{k}-bit {v}" for k, v in s["bit_depth"].items())
                 + "    modes: " + ", ".join(f"{k} {v}" for k, v in s["modes"].items()))
    lines.append(f"problems: {len(s['problems'])}")
    lines.extend(f"  {p['where']}: {p['problem']}" for p in s["problems"])
    return "\n".join(lines)
