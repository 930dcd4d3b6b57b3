"""The registry of on-disk dataset layouts that each source module adds itself to.

A source module registers a layout with ``@register_layout(name, detect=...)``; its loader
takes ``(root, problems)`` and returns a :class:`LoadedDataset`. :mod:`cxr.data.layouts` imports
every built-in source and detects and loads trees with what they registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from cxr.data.problems import Problem, Problems
from cxr.data.record import Sample


@dataclass
class LoadedDataset:
    """What a loader returns: the records plus what it found wrong on the way."""

    layout: str
    root: Path
    label_names: tuple[str, ...]
    records: list[Sample]
    problems: list[Problem] = field(default_factory=list)
    # where the pixels come from, from the tree's manifest (cxr.data.provenance): real,
    # synthetic, harmonized or translated; set by cxr.data.layouts.load_tree
    origin: str = "real"

    def __len__(self) -> int:
        return len(self.records)

    def label_matrix(self) -> np.ndarray:
        """(N, L) float32 matrix of labels, NaN where not labelled."""
        if not self.records:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        return np.stack([r.labels for r in self.records]).astype(np.float32)


class Loader(Protocol):
    # a layout registered with labels_csv=True also takes ``labels_csv=PATH`` (a label file
    # kept outside the tree)
    def __call__(self, root: Path, problems: Problems) -> LoadedDataset: ...


@dataclass(frozen=True)
class Layout:
    name: str
    detect: Callable[[Path], bool]
    load: Loader
    priority: int  # higher is tried first (more specific layouts before generic ones)
    description: str
    labels_csv: bool = False  # the loader takes labels_csv=PATH


_LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, detect: Callable[[Path], bool], priority: int = 0,
                    description: str = "", labels_csv: bool = False) -> Callable[[Loader], Loader]:
    """Decorator registering a loader under ``name`` (``labels_csv``: it takes ``labels_csv=PATH``)."""

    def wrap(fn: Loader) -> Loader:
        if name in _LAYOUTS:
            raise ValueError(f"layout {name!r} registered twice")
        _LAYOUTS[name] = Layout(name, detect, fn, priority, description or (fn.__doc__ or "").split("\n")[0],
                                labels_csv)
        return fn

    return wrap
