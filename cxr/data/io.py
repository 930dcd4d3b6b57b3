"""Reading bytes from plain files and from members of zip archives.

An image reference is either a path or ``"<archive>.zip!/<member>"``, so a dataset shipped as
a zip (e.g. the Kaggle "pulmonary chest x-ray abnormalities" archive) is read without
extracting it.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable

from cxr.errors import DataError

ZIP_SEP = "!/"


def zip_ref(archive: str | Path, member: str) -> str:
    """The reference string of ``member`` inside ``archive``."""
    return f"{archive}{ZIP_SEP}{member}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``(archive, member)`` for a zip reference, ``(path, None)`` for a plain path."""
    if ZIP_SEP in ref:
        archive, member = ref.split(ZIP_SEP, 1)
        return archive, member
    return ref, None


@lru_cache(maxsize=8)
def _open_zip(archive: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive)


def read_bytes(ref: str | Path) -> bytes:
    """All bytes of a file or zip member; a missing one raises a one-line DataError."""
    path, member = split_ref(str(ref))
    try:
        if member is None:
            return Path(path).read_bytes()
        return _open_zip(path).read(member)
    except FileNotFoundError:
        raise DataError(ref, "file not found") from None
    except KeyError:
        raise DataError(ref, "member not found in the zip archive") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(ref, f"cannot read: {e}") from None


def exists(ref: str | Path) -> bool:
    path, member = split_ref(str(ref))
    if member is None:
        return Path(path).exists()
    try:
        _open_zip(path).getinfo(member)
        return True
    except (KeyError, OSError, zipfile.BadZipFile):
        return False


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it into place.

    A crash or kill leaves either the old file or the complete new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
