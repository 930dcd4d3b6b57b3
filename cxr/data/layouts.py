"""Registry of on-disk dataset layouts and auto-detection.

Each source module registers a layout with ``@register_layout(name, detect=...)``; its loader
takes ``(root, problems)`` and returns a :class:`LoadedDataset`. ``load_tree(path)`` detects the
layout (or takes ``layout=``) and loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from cxr.data.problems import Problem, Problems
from cxr.data.record import Sample
from cxr.errors import DataError


@dataclass
class LoadedDataset:
    """What a loader returns: the records plus what it found wrong on the way."""

    layout: str
    root: Path
    label_names: tuple[str, ...]
    records: list[Sample]
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def label_matrix(self) -> np.ndarray:
        """(N, L) float32 matrix of labels, NaN where not labelled."""
        if not self.records:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        return np.stack([r.labels for r in self.records]).astype(np.float32)


class Loader(Protocol):
    def __call__(self, root: Path, problems: Problems) -> LoadedDataset: ...


@dataclass(frozen=True)
class Layout:
    name: str
    detect: Callable[[Path], bool]
    load: Loader
    priority: int  # higher is tried first (more specific layouts before generic ones)
    description: str


_LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, detect: Callable[[Path], bool], priority: int = 0,
                    description: str = "") -> Callable[[Loader], Loader]:
    """Decorator registering a loader under ``name``."""

    def wrap(fn: Loader) -> Loader:
        if name in _LAYOUTS:
            raise ValueError(f"layout {name!r} registered twice")
        _LAYOUTS[name] = Layout(name, detect, fn, priority, description or (fn.__doc__ or "").split("\n")[0])
        return fn

    return wrap


def _ensure_registered() -> None:
    # Importing the sources package registers every built-in layout.
    import cxr.data.sources  # noqa: F401


def layouts() -> dict[str, Layout]:
    _ensure_registered()
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
