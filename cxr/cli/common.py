"""Small pieces every subcommand uses: progress bars to stderr."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm


@contextmanager
def progress_bar(total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[tqdm]:
    """A tqdm bar on stderr that disappears when stderr is not a terminal and stays quiet in CI."""
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())
    try:
        yield bar
    finally:
        bar.close()
