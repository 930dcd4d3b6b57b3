"""Reading bytes from plain files and zip members; writing files and trees safely.

An image reference is either a path or ``"<archive>.zip!/<member>"``, so a dataset shipped as
a zip (e.g. the Kaggle "pulmonary chest x-ray abnormalities" archive) is read without
extracting it.

Writers: :func:`atomic_write` (a temporary file renamed into place, with the permissions the
user's umask gives), :func:`claim_output` (one writer at a time per output path), and
:func:`naming` (an OS error from a write names the file it was writing).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

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
    The file gets the mode an ordinary ``open`` would give (0666 less the umask), not the
    0600 of :func:`tempfile.mkstemp`. An OS error while writing names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the file the user asked for, not the temporary one
        e.filename, e.filename2 = str(path), None
        raise
    try:
        with naming(path):
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask: from ``/proc`` on Linux (reading it there changes nothing, so no
    other thread can create a file under a wrong mask meanwhile), else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def naming(path: str | Path, tmp: str | Path | None = None) -> Iterator[None]:
    """Give an :class:`OSError` raised inside without a file name (a ``write`` on a full disk,
    an ``fsync``) the name ``path``, so the command line can say which file failed. With
    ``tmp`` (the hidden folder a tree is written into before it is renamed to ``path``), a name
    inside ``tmp`` is said as the same name inside ``path``: the temporary folder is gone by
    the time the user reads the message."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        elif tmp is not None:
            for attr in ("filename", "filename2"):
                name = getattr(e, attr)
                if name is not None and (str(name) == str(tmp) or str(name).startswith(f"{tmp}{os.sep}")):
                    setattr(e, attr, f"{path}{str(name)[len(str(tmp)):]}")
        raise


LOCK_SUFFIX = ".lock"


def lock_path(out: str | Path) -> Path:
    """The claim file of ``out``: ``.<name>.lock`` beside it (on the same file system)."""
    out = Path(out)
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _lock_holder(lock: Path) -> tuple[str, int] | None:
    """``(host, pid)`` written in a claim file; None when it is unreadable or torn."""
    try:
        host, pid = lock.read_text(encoding="utf-8").split()[:2]
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def claim_output(out: str | Path) -> Iterator[Path]:
    """Hold the exclusive right to write the file or tree ``out`` while the block runs.

    The claim is ``.<name>.lock`` beside ``out``, created with ``O_CREAT | O_EXCL`` (atomic on
    local and NFSv3+ file systems) and holding ``<host> <pid>``; it is removed when the block
    ends, however it ends. A second writer, in this process or another, meets a one-line
    :class:`DataError` naming the holder instead of replacing or mixing the first one's output
    (``--overwrite`` included). A claim left by a process that no longer runs on this host (a
    ``kill -9``, a power cut) is stale and taken over; one from another host is kept (it may be
    alive) and its path is in the message, to remove by hand.
    """
    out = Path(out)
    made = _make_parents(out.parent)
    try:
        with _claimed(out):
            yield lock_path(out)
    finally:
        for folder in made:  # folders made only for the claim, when the writer left them empty
            try:
                folder.rmdir()
            except OSError:
                break


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it made, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return missing


@contextmanager
def _claimed(out: Path) -> Iterator[None]:
    lock = lock_path(out)
    me = f"{socket.gethostname()} {os.getpid()}\n"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and holder[0] == socket.gethostname() and not _alive(holder[1]):
                _take_stale(lock, holder)
                continue
            who = f"process {holder[1]} on {holder[0]}" if holder else "another process"
            raise DataError(out, f"{who} is writing it (claim {lock}); wait for it to finish, or "
                                 "remove the claim file if that process is gone") from None
        except OSError as e:  # a read-only disk, a parent that is a file: say it of the output
            e.filename, e.filename2 = str(out), None
            raise
        try:
            with naming(lock), os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(me)
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
        break
    else:
        raise DataError(out, f"cannot claim it: {lock} keeps coming back")
    try:
        yield
    finally:
        if _lock_holder(lock) == (socket.gethostname(), os.getpid()):
            lock.unlink(missing_ok=True)


def _take_stale(lock: Path, holder: tuple[str, int]) -> None:
    """Remove a dead process's claim, unless a live writer replaced it meanwhile: it is renamed
    aside first (only one of two racing takers succeeds), checked, and put back if it changed."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # someone else took it
    if _lock_holder(aside) != holder:
        try:
            os.link(aside, lock)  # a live claim: back in place unless a new one exists
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
    aside.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


@contextmanager
def staged_tree(out: Path) -> Iterator[Path]:
    """Claim the folder ``out`` (:func:`claim_output`) and yield a new temporary folder beside it
    to write into; when the block ends normally it replaces ``out`` (:func:`swap_in_tree`), and
    when it raises it is removed, so ``out`` is never half-written."""
    with claim_output(out):
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            swap_in_tree(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def swap_in_tree(tmp: Path, out: Path) -> None:
    """Rename a finished temporary folder ``tmp`` to ``out``: an old ``out`` is moved aside
    first (one rename, so ``out`` is never half-written), then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
