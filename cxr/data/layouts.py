"""Dataset layouts: auto-detection and loading of every built-in layout.

Each source module (:mod:`cxr.data.sources`) registers a layout with
``@register_layout(name, detect=...)`` (:mod:`cxr.data.registry`); its loader takes
``(root, problems)`` and returns a :class:`LoadedDataset`. ``load_tree(path)`` detects the
layout (or takes ``layout=``) and loads it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

# Importing the sources package registers every built-in layout.
import cxr.data.sources  # noqa: F401
from cxr.data.problems import Problems
from cxr.data.provenance import tree_origin
from cxr.data.registry import _LAYOUTS, Layout, LoadedDataset, register_layout
from cxr.errors import DataError

__all__ = ["Layout", "LoadedDataset", "check_root", "detect_layout", "layouts", "load_tree", "register_layout"]


def layouts() -> dict[str, Layout]:
    """Every registered layout by name."""
    return dict(_LAYOUTS)


def check_root(root: Path) -> None:
    """Refuse a root that is missing, or a file that is not a readable zip archive."""
    if not root.exists():
        raise DataError(root, "path does not exist")
    if root.is_file() and not zipfile.is_zipfile(root):
        if root.suffix.lower() == ".zip":
            raise DataError(root, "not a readable zip archive (truncated or corrupt?)")
        raise DataError(root, "not a folder or a zip archive")


def detect_layout(root: str | Path) -> str:
    """Name of the first layout (by priority) whose detector accepts ``root``."""
    root = Path(root)
    check_root(root)
    for layout in sorted(layouts().values(), key=lambda l: -l.priority):
        if layout.detect(root):
            return layout.name
    raise DataError(root, "no known dataset layout found (known: " + ", ".join(sorted(layouts())) + ")")


def load_tree(root: str | Path, layout: str | None = None, skip_bad: bool = False,
              problems: Problems | None = None, labels_csv: str | Path | None = None) -> LoadedDataset:
    """Load a dataset tree; ``layout=None`` auto-detects it.

    ``labels_csv``: the label file of a layout that takes one from outside the tree (``nih``:
    a Data_Entry-style CSV); without ``layout`` it selects that layout. A forced layout (or a
    label file) that yields no image is an error naming what the loader looked for. The
    dataset's ``origin`` comes from the tree's manifest (:func:`cxr.data.provenance.tree_origin`).
    """
    root = Path(root)
    known = layouts()
    forced = layout is not None or labels_csv is not None
    if labels_csv is not None:
        takers = sorted(n for n, lay in known.items() if lay.labels_csv)
        layout = layout or (takers[0] if len(takers) == 1 else None)
        if layout not in takers:
            raise DataError(labels_csv, f"layout {layout!r} takes no label file from outside the tree "
                                        f"(layouts that do: {', '.join(takers)})")
    name = layout or detect_layout(root)
    if name not in known:
        raise DataError(name, "unknown layout (known: " + ", ".join(sorted(known)) + ")")
    check_root(root)
    sink = problems if problems is not None else Problems(skip_bad=skip_bad)
    options = {"labels_csv": Path(labels_csv)} if labels_csv is not None else {}
    ds = known[name].load(root, sink, **options)  # type: ignore[call-arg]
    ds.problems = list(sink.items)
    if forced and not ds.records:
        looked = "; ".join(p.problem if p.where == str(root) else f"{p.where}: {p.problem}"
                           for p in ds.problems[:3])
        more = f" (and {len(ds.problems) - 3} more problems)" if len(ds.problems) > 3 else ""
        raise DataError(root, f"layout {name!r} found no images here"
                              + (f": {looked}{more}" if looked else f" (it reads: {known[name].description})"))
    ds.origin = tree_origin(root)
    return ds
