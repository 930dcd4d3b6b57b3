"""Preprocessed-image cache: decode and resize each image once, then read compact arrays.

Layout on disk::

    <cache_root>/<preprocess key>/<aa>/<content hash>.npy   uint16 (size, size), value/65535
    <cache_root>/<preprocess key>/index.json                ref -> [bytes, mtime_ns, content hash]

Entries are keyed by the *content* hash of the source file together with the preprocessing
settings, so an edited file (new content) can never be served from a stale entry. The index
only memoizes ``ref -> content hash`` behind the file's size and mtime, so a warm epoch stats
each file and reads one small ``.npy``: it never opens a PNG. Zip members are keyed by their
CRC-32 and size from the archive directory, which is a content checksum too. Entries and the
index are written to a temporary file and renamed into place, so a killed build leaves no
half-written entry.

Quantizing to 16 bits keeps 16-bit sources' depth (the float error is below 1e-5).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from cxr.data import preprocess
from cxr.data.image import load_image
from cxr.data.io import _open_zip, atomic_write, atomic_write_text, split_ref
from cxr.data.preprocess import Preprocess
from cxr.data.problems import Problems
from cxr.errors import DataError

SCALE = 65535.0
Box = tuple[int, int, int, int]  # a lung crop: top, left, height, width (cxr.data.lungcrop)


def decode_workers(requested: int | None) -> int:
    """Processes that decode into the cache: ``requested`` (at least 1), or up to 8 cores."""
    return min(8, os.cpu_count() or 1) if requested is None else max(1, requested)


def _stat_key(ref: str) -> tuple[int, int, str | None]:
    """(size, mtime_ns, known_hash) for a file; zip members carry their CRC as the hash."""
    path, member = split_ref(ref)
    try:
        if member is None:
            st = os.stat(path)
            return st.st_size, st.st_mtime_ns, None
        info = _open_zip(path).getinfo(member)
        return info.file_size, 0, f"zipcrc-{info.CRC:08x}-{info.file_size}"
    except FileNotFoundError:
        raise DataError(ref, "file not found") from None
    except KeyError:
        raise DataError(ref, "member not found in the zip archive") from None


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def _decode_entry(ref: str, pre: Preprocess, dest: str, box: Box | None = None) -> tuple[str, str] | None:
    """Worker: decode + preprocess one image (cut to ``box`` first) into ``dest``; ``(where,
    problem)`` on bad input."""
    try:
        img = preprocess.apply(load_image(ref), pre, box)
    except DataError as e:
        return e.where, e.problem
    buf = io.BytesIO()  # np.save straight to a file reports a full disk without its errno
    np.save(buf, np.round(img * SCALE).astype(np.uint16))
    atomic_write(Path(dest), lambda f: f.write(buf.getbuffer()))
    return None


def _entry_file(store: str, digest: str, box: Box | None = None) -> Path:
    """An entry's file; a lung-cropped one carries its box in the name, so the same image cut
    two ways (another mask, another margin) has two entries and a stale one is never read."""
    suffix = "" if box is None else "-c" + "_".join(str(int(v)) for v in box)
    return Path(store) / digest[:2] / f"{digest}{suffix}.npy"


def _build_entry(ref: str, pre: Preprocess, store: str, box: Box | None = None
                 ) -> tuple[str, int, int, str | None, tuple[str, str] | None]:
    """Worker: hash ``ref`` and decode it into the store unless its entry exists.

    Hashing happens here, not in the parent, so a cold build reads and hashes files on every
    core. Returns ``(ref, size, mtime_ns, digest, error)``.
    """
    try:
        size, mtime, known = _stat_key(ref)
    except DataError as e:
        return ref, 0, 0, None, (e.where, e.problem)
    digest = known or _hash_file(split_ref(ref)[0])
    dest = _entry_file(store, digest, box)
    err = None if dest.exists() else _decode_entry(ref, pre, str(dest), box)
    return ref, size, mtime, digest, err


@dataclass
class BuildReport:
    """What :meth:`ImageCache.build` did."""

    built: int = 0
    reused: int = 0
    failed: int = 0


class ImageCache:
    """Content-addressed store of preprocessed images for one :class:`Preprocess` setting."""

    def __init__(self, root: str | Path, pre: Preprocess):
        self.pre = pre
        self.dir = Path(root) / pre.key()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index_path = self.dir / "index.json"
        self._index: dict[str, list] = self._read_index()
        self._dirty = False
        settings = self.dir / "preprocess.json"
        if not settings.exists():
            atomic_write_text(settings, json.dumps(pre.__dict__, sort_keys=True, indent=1))

    def _read_index(self) -> dict[str, list]:
        try:
            return json.loads(self._index_path.read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, OSError):
            return {}  # a damaged index only costs re-hashing; entries are content-keyed

    def flush(self) -> None:
        """Persist the ref → content-hash memo (atomically)."""
        if self._dirty:
            atomic_write_text(self._index_path, json.dumps(self._index))
            self._dirty = False

    def content_hash(self, ref: str) -> str:
        """Content hash of ``ref``, re-hashed only when its size or mtime changed."""
        size, mtime, known = _stat_key(ref)
        if known is not None:
            return known
        memo = self._index.get(ref)
        if memo and memo[0] == size and memo[1] == mtime:
            return memo[2]
        digest = _hash_file(split_ref(ref)[0])
        self._index[ref] = [size, mtime, digest]
        self._dirty = True
        return digest

    def entry_path(self, ref: str, box: Box | None = None) -> Path:
        return _entry_file(str(self.dir), self.content_hash(ref), box)

    def _known_entry(self, ref: str, box: Box | None = None) -> Path | None:
        """The entry of ``ref`` if its hash is known without reading the file and it exists."""
        try:
            size, mtime, known = _stat_key(ref)
        except DataError:
            return None
        memo = self._index.get(ref)
        digest = known or (memo[2] if memo and memo[0] == size and memo[1] == mtime else None)
        if digest is None:
            return None
        path = _entry_file(str(self.dir), digest, box)
        return path if path.exists() else None

    def get(self, ref: str, box: Box | None = None) -> np.ndarray:
        """The preprocessed image (float32, size × size), cut to ``box`` first, decoding it on a miss."""
        path = self.entry_path(ref, box)
        try:
            return np.load(path).astype(np.float32) / SCALE
        except FileNotFoundError:
            pass
        err = _decode_entry(ref, self.pre, str(path), box)
        if err is not None:
            raise DataError(*err)
        return np.load(path).astype(np.float32) / SCALE

    def stack(self, refs: Sequence[str], boxes: Mapping[str, Box | None] | None = None) -> np.ndarray:
        """(N, size, size) float32 in [0, 1] of already-built entries, in ``refs`` order (a
        trainer's in-memory training set); ``boxes``: each ref's lung crop, as built."""
        if not refs:
            return np.zeros((0, self.pre.size, self.pre.size), np.float32)
        boxes = boxes or {}
        out = np.stack([np.load(self.entry_path(r, boxes.get(r))) for r in refs]).astype(np.float32) / SCALE
        self.flush()
        return out

    def build(self, refs: Iterable[str], workers: int | None = None, problems: Problems | None = None,
              progress: Callable[[int], None] | None = None,
              boxes: Mapping[str, Box | None] | None = None) -> BuildReport:
        """Make sure every ref has an entry, decoding misses in ``workers`` processes.

        A bad image goes to ``problems`` (strict: raises after the others are done; skip: is
        recorded). ``progress(n)`` is called as images complete. ``boxes``: each ref's lung
        crop (:mod:`cxr.data.lungcrop`; a ref without one keeps its whole image).
        """
        report = BuildReport()
        boxes = boxes or {}
        todo: list[str] = []
        for ref in dict.fromkeys(refs):
            if self._known_entry(ref, boxes.get(ref)) is not None:
                report.reused += 1
                if progress:
                    progress(1)
            else:
                todo.append(ref)
        errors: list[tuple[str, str]] = []
        workers = (os.cpu_count() or 1) if workers is None else workers
        store = str(self.dir)
        if workers <= 1 or len(todo) <= 1:
            results: Iterable = (_build_entry(r, self.pre, store, boxes.get(r)) for r in todo)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            chunk = max(1, len(todo) // (workers * 8))
            results = pool.map(_build_entry, todo, [self.pre] * len(todo), [store] * len(todo),
                               [boxes.get(r) for r in todo], chunksize=chunk)
        try:
            for ref, size, mtime, digest, err in results:
                if digest is not None and not digest.startswith("zipcrc-"):
                    self._index[ref] = [size, mtime, digest]
                    self._dirty = True
                if err:
                    errors.append(err)
                if progress:
                    progress(1)
        finally:
            if pool is not None:
                pool.shutdown()
            self.flush()
        report.failed = len(errors)
        report.built = len(todo) - report.failed
        sink = problems if problems is not None else Problems()
        for where, what in errors:
            sink.report(where, what)
        return report


