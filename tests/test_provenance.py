"""A tree's origin comes from the manifest it carries, wherever the tree is read."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from builders import write_png
from cxr.data.layouts import load_tree
from cxr.data.provenance import MANIFESTS, ORIGINS, tree_manifests, tree_origin
from cxr.errors import DataError


def _tree(root: Path, n: int = 2) -> Path:
    """A folder-per-class tree (two classes, ``n`` images each)."""
    for cls in ("Normal", "Tuberculosis"):
        for i in range(n):
            write_png(root / cls / f"{cls[0]}{i}.png", seed=i)
    return root


def _manifest(root: Path, name: str, created: str = "2026-01-01T00:00:00+00:00") -> None:
    (root / name).write_text(json.dumps({"source": "x", "created": created}))


def test_each_manifest_names_its_origin_and_none_is_real(tmp_path):
    assert set(MANIFESTS.values()) | {"real"} == set(ORIGINS)
    root = _tree(tmp_path / "t")
    assert tree_origin(root) == "real" and load_tree(root).origin == "real"
    for name, origin in MANIFESTS.items():
        _manifest(root, name)
        assert tree_origin(root) == origin and load_tree(root).origin == origin
        (root / name).unlink()


def test_the_newest_manifest_names_the_last_step(tmp_path):
    # A harmonized tree translated: the harmonization manifest was copied over, the newer
    # translation manifest names what the pixels are now.
    root = _tree(tmp_path / "t")
    _manifest(root, "cxr_harmonization.json", "2026-01-01T00:00:00+00:00")
    _manifest(root, "cxr_translation.json", "2026-02-01T00:00:00+00:00")
    assert tree_origin(root) == "translated"
    assert [o for o, _ in tree_manifests(root)] == ["translated", "harmonized"]
    _manifest(root, "cxr_harmonization.json", "2026-03-01T00:00:00+00:00")
    assert tree_origin(root) == "harmonized"


def test_a_sub_tree_and_a_zipped_tree_keep_the_origin(tmp_path):
    out = tmp_path / "out"
    _tree(out / "set")
    _manifest(out, "cxr_translation.json")
    assert tree_origin(out / "set") == "translated" and load_tree(out / "set").origin == "translated"
    archive = tmp_path / "out.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(out.rglob("*")):
            if p.is_file():
                zf.write(p, f"out/{p.relative_to(out).as_posix()}")
    assert tree_origin(archive) == "translated"


def test_an_unreadable_manifest_is_one_clear_error(tmp_path):
    root = _tree(tmp_path / "t")
    (root / "cxr_harmonization.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cxr_harmonization.json: not a readable manifest"):
        load_tree(root)
