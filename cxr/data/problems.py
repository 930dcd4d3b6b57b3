"""Collecting data problems: fail on the first one, or skip and report (``--skip-bad``).

Every loader takes a :class:`Problems` and calls :meth:`Problems.report` for each bad file or
field. In strict mode (the default) that raises a :class:`~cxr.errors.DataError` at once; with
``skip_bad=True`` the problem is recorded, the caller skips the item, and the list can be
written as a report. ``cxr datasets inspect`` uses the collecting mode to list every problem.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from cxr.data.io import atomic_write_text
from cxr.errors import DataError


@dataclass(frozen=True)
class Problem:
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


class Problems:
    """A problem sink; strict (raise) or collecting (record and let the caller skip)."""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = skip_bad
        self.items: list[Problem] = []

    def report(self, where: str | Path, problem: str) -> None:
        """Raise in strict mode; otherwise record. Callers skip the item after this returns."""
        if not self.skip_bad:
            raise DataError(where, problem)
        self.items.append(Problem(str(where), problem))

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:  # a sink is truthy even when empty
        return True

    def write(self, path: str | Path) -> Path:
        """Write the skipped items as CSV (``where,problem``), atomically."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["where", "problem"])
        for p in self.items:
            writer.writerow([p.where, p.problem])
        return atomic_write_text(path, buf.getvalue())
