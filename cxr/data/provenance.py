"""Where a tree's pixels come from: its origin, read from the manifest the tree carries.

Every command that writes a tree of new pixels in a real layout leaves a JSON manifest at the
top of it: ``cxr harmonize`` writes ``cxr_harmonization.json``, ``cxr translate``
``cxr_translation.json`` and ``cxr generate`` ``cxr_generation.json``. A tree with none of them
is ``real``. The origin travels with the pixels wherever a tree is read
(:func:`cxr.data.layouts.load_tree` sets ``LoadedDataset.origin``): training mixes, prediction
CSVs and evaluation tables all take it from here.

A tree made from another made tree (a harmonized tree translated, say) holds both manifests,
the older one copied over with the other files: the newest (its ``created`` time) names the
last step, which is the origin.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from cxr.errors import DataError

# Manifest file name -> origin, in the order that breaks a tie of equal ``created`` times.
MANIFESTS: dict[str, str] = {
    "cxr_generation.json": "synthetic",
    "cxr_translation.json": "translated",
    "cxr_harmonization.json": "harmonized",
}
ORIGINS: tuple[str, ...] = ("real", "synthetic", "harmonized", "translated")
# The per-image labels `cxr generate` writes beside its manifest: not a dataset's own label file.
GENERATION_LABELS_CSV = "cxr_generation_labels.csv"


def _folder_manifests(root: Path) -> list[tuple[str, str, bytes]]:
    """``(name, where, bytes)`` of the manifests in ``root`` or the nearest folder above it that
    has any (a sub-tree of a harmonized tree, ``OUT/MontgomerySet``, is harmonized too)."""
    for folder in (root, *root.parents):
        found = []
        for name in MANIFESTS:
            path = folder / name
            if path.is_file():
                try:
                    found.append((name, str(path), path.read_bytes()))
                except OSError as e:
                    raise DataError(path, f"cannot read the manifest: {e.strerror or e}") from None
        if found:
            return found
    return []


def _zip_manifests(archive: Path) -> list[tuple[str, str, bytes]]:
    """Manifests at the top of a zip archive or in its single top folder (``zip -r out.zip out``)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if PurePosixPath(n).name in MANIFESTS
                     and len(PurePosixPath(n).parts) <= 2 and "__MACOSX" not in n]
            return [(PurePosixPath(n).name, f"{archive}!/{n}", zf.read(n)) for n in sorted(names)]
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(archive, f"not a readable zip archive ({e})") from None


def tree_manifests(root: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(origin, manifest)`` of every manifest the tree at ``root`` carries, newest first."""
    root = Path(root)
    if root.is_file():
        raw = _zip_manifests(root) if zipfile.is_zipfile(root) else []
    else:
        raw = _folder_manifests(root.absolute())
    out = []
    for name, where, data in raw:
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(where, f"not a readable manifest ({e}); it says where the tree's pixels "
                                   "come from: restore it, or remove it if the tree is real") from None
        if not isinstance(manifest, dict):
            raise DataError(where, "not a readable manifest (expected a JSON object)")
        out.append((MANIFESTS[name], manifest, list(MANIFESTS).index(name)))
    out.sort(key=lambda t: (str(t[1].get("created", "")), -t[2]), reverse=True)
    return [(origin, manifest) for origin, manifest, _ in out]


def tree_origin(root: str | Path) -> str:
    """The origin of the tree at ``root`` (folder or zip): ``real``, ``synthetic``,
    ``harmonized`` or ``translated``, from the newest manifest it carries (see module doc)."""
    found = tree_manifests(root)
    return found[0][0] if found else "real"
