"""Reading the label CSVs that datasets ship, with one-line errors for what is wrong in them.

Real label files have awkward headers (NIH's ``OriginalImage[Width,Height]`` is split by
pandas into two columns, the bounding-box file has trailing empty columns), so each loader names
the columns it wants by a canonical name plus the header spellings seen in the wild, and gets
back a frame with canonical column names and every cell as stripped text. Values are parsed by
the loaders, which know what each field means and can name it in their messages.
"""

from __future__ import annotations

import io
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pandas as pd

from cxr.data.problems import Problems

HEADER_LINES = 1  # data row i (0-based) is on line i + 2 of the file


def line_of(row: int) -> int:
    """File line number (1-based, header = line 1) of 0-based data row ``row``."""
    return row + HEADER_LINES + 1


def _parse(source: str | Path | bytes, where: str, nrows: int | None) -> pd.DataFrame:
    if isinstance(source, bytes):
        compression = "gzip" if where.lower().endswith(".gz") else None
        handle: io.BytesIO | str | Path = io.BytesIO(source)
    else:
        compression, handle = "infer", source
    return pd.read_csv(handle, dtype=str, keep_default_na=False, na_filter=False,
                       encoding="utf-8-sig", compression=compression, nrows=nrows)


def read_table(source: str | Path | bytes, where: str | Path,
               columns: Mapping[str, Sequence[str]], required: Collection[str],
               problems: Problems | None = None, nrows: int | None = None) -> pd.DataFrame | None:
    """Read a CSV and return its known columns renamed to canonical names, as stripped text.

    ``columns`` maps a canonical name to the header spellings accepted for it (the first one
    is the one named in messages). A missing ``required`` column, an empty or unparsable file is
    reported once for the whole file; after a skip-mode report the result is ``None``.
    Optional columns that are absent are simply not in the result.
    """
    problems = problems if problems is not None else Problems()
    where = str(where)
    try:
        raw = _parse(source, where, nrows)
    except FileNotFoundError:
        problems.report(where, "file not found")
        return None
    except pd.errors.EmptyDataError:
        problems.report(where, "empty CSV file (no header line)")
        return None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problems.report(where, f"not a readable CSV file ({first})")
        return None
    header = {str(c).strip(): c for c in raw.columns}
    found: dict[str, str] = {}
    for canonical, spellings in columns.items():
        for spelling in spellings:
            if spelling in header:
                found[canonical] = header[spelling]
                break
    missing = [columns[c][0] for c in columns if c in required and c not in found]
    if missing:
        names = ", ".join(repr(m) for m in missing)
        have = ", ".join(repr(h) for h in header if not h.startswith("Unnamed:"))
        plural = "s" if len(missing) > 1 else ""
        problems.report(where, f"missing required column{plural} {names} (found: {have})")
        return None
    # A list comprehension strips 100k-row columns many times faster than ``.str.strip()``.
    return pd.DataFrame({c: pd.Series([v.strip() for v in raw[found[c]].tolist()], dtype=str)
                         for c in found}, index=pd.RangeIndex(len(raw)))


def header_columns(source: str | Path | bytes, where: str | Path) -> list[str]:
    """The stripped header names of a CSV, or ``[]`` when it cannot be read (for detectors)."""
    try:
        return [str(c).strip() for c in _parse(source, str(where), 0).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError):
        return []


_DRIVE = re.compile(r"^[A-Za-z]:")


def outside_root(relpath: str) -> bool:
    """True when a path named in a CSV would leave the dataset root (absolute, drive, ``..``).

    A CSV is input like any other: a row naming ``../../etc/passwd.png`` must not make a loader
    read files outside the tree it was pointed at.
    """
    text = relpath.strip()
    if not text or text[0] in "/\\" or _DRIVE.match(text):
        return True
    return ".." in text.replace("\\", "/").split("/")
