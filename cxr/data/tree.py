"""A dataset root that is either a folder or a ``.zip`` archive, seen through one interface.

Loaders list and read files through :class:`Tree` so that one loader serves a dataset whether it
is extracted on disk or still inside its downloaded archive (the Kaggle NLM archive, say).
Relative paths always use ``/``. Archive junk (``__MACOSX/``, ``._*`` resource forks,
``Thumbs.db``, ``.DS_Store``) is never listed.
"""

from __future__ import annotations

import fnmatch
import zipfile
from functools import cached_property
from pathlib import Path, PurePosixPath

from cxr.data.io import _open_zip, read_bytes, zip_ref
from cxr.errors import DataError

JUNK_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})


def is_junk(relpath: str) -> bool:
    """True for OS/archive by-products that are never dataset files."""
    parts = PurePosixPath(relpath).parts
    if any(p == "__MACOSX" for p in parts):
        return True
    name = parts[-1] if parts else ""
    return name.lower() in JUNK_NAMES or name.startswith("._")


class Tree:
    """Read-only view of a folder or a zip archive rooted at ``prefix`` inside it."""

    def __init__(self, root: str | Path, prefix: str = ""):
        self.root = Path(root)
        self.prefix = prefix.strip("/")
        self.is_zip = self.root.is_file() and zipfile.is_zipfile(self.root)
        if not self.is_zip and not self.root.is_dir():
            raise DataError(self.root, "not a folder or a zip archive")

    def __repr__(self) -> str:
        return f"Tree({str(self.root)!r}, prefix={self.prefix!r})"

    def sub(self, relpath: str) -> "Tree":
        """The tree rooted at ``relpath`` below this one."""
        prefix = f"{self.prefix}/{relpath}".strip("/") if self.prefix else relpath.strip("/")
        if not self.is_zip:
            return Tree(self.root / relpath)
        return Tree(self.root, prefix)

    @property
    def name(self) -> str:
        """Display name: the folder path, or ``archive.zip!/prefix``."""
        return zip_ref(self.root, self.prefix) if self.is_zip and self.prefix else str(self.root)

    @cached_property
    def _members(self) -> list[str]:
        """All file paths (relative to the prefix) of a zip tree, junk removed."""
        zf = _open_zip(str(self.root))
        head = f"{self.prefix}/" if self.prefix else ""
        out = []
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(head):
                continue
            rel = info.filename[len(head):]
            if rel and not is_junk(rel):
                out.append(rel)
        return sorted(out)

    def files(self, relpath: str = "", pattern: str = "*", recursive: bool = False) -> list[str]:
        """Sorted relative paths of files in ``relpath`` whose *name* matches ``pattern``.

        Matching is case-insensitive. With ``recursive`` the search descends into subfolders.
        """
        relpath = relpath.strip("/")
        pat = pattern.lower()
        if self.is_zip:
            head = f"{relpath}/" if relpath else ""
            out = []
            for m in self._members:
                if not m.startswith(head):
                    continue
                rest = m[len(head):]
                if not recursive and "/" in rest:
                    continue
                if fnmatch.fnmatchcase(rest.rsplit("/", 1)[-1].lower(), pat):
                    out.append(m)
            return out
        base = self.root / relpath
        if not base.is_dir():
            return []
        it = base.rglob("*") if recursive else base.iterdir()
        out = []
        for p in it:
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and not is_junk(rel) and fnmatch.fnmatchcase(p.name.lower(), pat):
                out.append(rel)
        return sorted(out)

    def dirs(self, relpath: str = "") -> list[str]:
        """Sorted names of the immediate subfolders of ``relpath``."""
        relpath = relpath.strip("/")
        if self.is_zip:
            head = f"{relpath}/" if relpath else ""
            names = {m[len(head):].split("/", 1)[0] for m in self._members
                     if m.startswith(head) and "/" in m[len(head):]}
            return sorted(n for n in names if not is_junk(n))
        base = self.root / relpath
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not is_junk(p.name))

    def is_dir(self, relpath: str) -> bool:
        relpath = relpath.strip("/")
        if self.is_zip:
            head = f"{relpath}/"
            return any(m.startswith(head) for m in self._members)
        return (self.root / relpath).is_dir()

    def is_file(self, relpath: str) -> bool:
        relpath = relpath.strip("/")
        if self.is_zip:
            return relpath in set(self._members)
        return (self.root / relpath).is_file()

    def ref(self, relpath: str) -> str:
        """The reference string (path or ``zip!/member``) that loaders store in a Sample."""
        relpath = relpath.strip("/")
        if self.is_zip:
            member = f"{self.prefix}/{relpath}" if self.prefix else relpath
            return zip_ref(self.root, member)
        return str(self.root / relpath)

    def read_bytes(self, relpath: str) -> bytes:
        return read_bytes(self.ref(relpath))

    def read_text(self, relpath: str) -> str:
        """Text of a file; decoded as UTF-8, falling back to Latin-1 (old NLM readings)."""
        data = self.read_bytes(relpath)
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return data.decode("latin-1")
