"""Dataset layouts: auto-detection and loading of every built-in layout.

Each source module (:mod:`cxr.data.sources`) registers a layout with
``@register_layout(name, detect=...)`` (:mod:`cxr.data.registry`); its loader takes
``(root, problems)`` and returns a :class:`LoadedDataset`. ``load_tree(path)`` detects the
layout (or takes ``layout=``) and loads it.
"""

from __future__ import annotations

from pathlib import Path

# Importing the sources package registers every built-in layout.
import cxr.data.sources  # noqa: F401
from cxr.data.problems import Problems
from cxr.data.registry import _LAYOUTS, Layout, LoadedDataset, register_layout
from cxr.errors import DataError

__all__ = ["Layout", "LoadedDataset", "detect_layout", "layouts", "load_tree", "register_layout"]


def layouts() -> dict[str, Layout]:
    """Every registered layout by name."""
    return dict(_LAYOUTS)


def detect_layout(root: str | Path) -> str:
    """Name of the first layout (by priority) whose detector accepts ``root``."""
    root = Path(root)
    if not root.exists():
        raise DataError(root, "path does not exist")
    for layout in sorted(layouts().values(), key=lambda l: -l.priority):
        if layout.detect(root):
            return layout.name
    raise DataError(root, "no known dataset layout found (known: " + ", ".join(sorted(layouts())) + ")")


def load_tree(root: str | Path, layout: str | None = None, skip_bad: bool = False,
              problems: Problems | None = None) -> LoadedDataset:
    """Load a dataset tree; ``layout=None`` auto-detects it."""
    root = Path(root)
    name = layout or detect_layout(root)
    known = layouts()
    if name not in known:
        raise DataError(name, "unknown layout (known: " + ", ".join(sorted(known)) + ")")
    sink = problems if problems is not None else Problems(skip_bad=skip_bad)
    ds = known[name].load(root, sink)
    ds.problems = list(sink.items)
    return ds
