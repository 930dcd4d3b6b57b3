"""The preprocessed cache: built once, read without decoding, never stale, never half-written."""

from __future__ import annotations

import numpy as np
import pytest

import cxr.data.cache as cache_mod
from builders import write_png, zip_tree
from cxr.data import preprocess
from cxr.data.cache import ImageCache
from cxr.data.image import load_image
from cxr.data.io import zip_ref
from cxr.data.preprocess import Preprocess
from cxr.data.problems import Problems
from cxr.errors import DataError

PRE = Preprocess(size=16)


def _refs(tmp_path, n=4):
    return [str(write_png(tmp_path / "src" / f"{i}.png", 40, 30, mode="I;16", seed=i)) for i in range(n)]


def test_cached_equals_decoded_and_warm_reads_decode_nothing(tmp_path, monkeypatch):
    refs = _refs(tmp_path)
    cache = ImageCache(tmp_path / "cache", PRE)
    report = cache.build(refs, workers=1)
    assert (report.built, report.reused, report.failed) == (4, 0, 0)
    expected = [preprocess.apply(load_image(r), PRE) for r in refs]

    def no_decoding(ref):
        raise AssertionError(f"decoded {ref} on a warm read")

    monkeypatch.setattr(cache_mod, "load_image", no_decoding)
    warm = ImageCache(tmp_path / "cache", PRE)  # a new process would start like this
    for ref, exp in zip(refs, expected):
        got = warm.get(ref)
        assert got.shape == (16, 16) and got.dtype == np.float32
        np.testing.assert_allclose(got, exp, atol=1 / 65535)
    assert warm.build(refs).reused == 4


def test_changed_file_is_rebuilt_not_served_stale(tmp_path):
    refs = _refs(tmp_path, 1)
    cache = ImageCache(tmp_path / "cache", PRE)
    before = cache.get(refs[0])
    write_png(refs[0], 40, 30, mode="L", seed=99)  # new content at the same path
    after = ImageCache(tmp_path / "cache", PRE).get(refs[0])
    np.testing.assert_allclose(after, preprocess.apply(load_image(refs[0]), PRE), atol=1 / 65535)
    assert not np.allclose(before, after)


def test_settings_get_their_own_store(tmp_path):
    refs = _refs(tmp_path, 1)
    a = ImageCache(tmp_path / "cache", Preprocess(size=16)).get(refs[0])
    b = ImageCache(tmp_path / "cache", Preprocess(size=8)).get(refs[0])
    assert a.shape == (16, 16) and b.shape == (8, 8)


def test_parallel_build_matches_serial(tmp_path):
    refs = _refs(tmp_path, 6)
    ImageCache(tmp_path / "c1", PRE).build(refs, workers=1)
    ImageCache(tmp_path / "c2", PRE).build(refs, workers=2)
    for r in refs:
        np.testing.assert_array_equal(ImageCache(tmp_path / "c1", PRE).get(r), ImageCache(tmp_path / "c2", PRE).get(r))


def test_zip_members_are_cached(tmp_path):
    _refs(tmp_path, 2)
    archive = zip_tree(tmp_path / "src", tmp_path / "set.zip")
    ref = zip_ref(archive, "1.png")
    got = ImageCache(tmp_path / "cache", PRE).get(ref)
    np.testing.assert_allclose(got, preprocess.apply(load_image(ref), PRE), atol=1 / 65535)


def test_bad_image_is_reported_and_leaves_no_entry(tmp_path):
    refs = _refs(tmp_path, 2)
    bad = tmp_path / "src" / "bad.png"
    bad.write_bytes(b"not a png")
    cache = ImageCache(tmp_path / "cache", PRE)
    with pytest.raises(DataError, match="bad.png: not an image file"):
        cache.build(refs + [str(bad)], workers=1)
    sink = Problems(skip_bad=True)
    report = ImageCache(tmp_path / "cache", PRE).build(refs + [str(bad)], workers=1, problems=sink)
    assert report.failed == 1 and [p.where for p in sink.items] == [str(bad)]
    entries = list((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 2  # the bad file produced nothing
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_stack_returns_built_entries_in_order(tmp_path):
    refs = [str(write_png(tmp_path / f"i{k}.png", 24, 20, seed=k)) for k in range(3)]
    cache = ImageCache(tmp_path / "cache", Preprocess(size=16))
    cache.build(refs, workers=1)
    stacked = cache.stack(refs[::-1])
    assert stacked.shape == (3, 16, 16) and stacked.dtype == np.float32
    for k, ref in enumerate(refs[::-1]):
        assert np.array_equal(stacked[k], cache.get(ref))
    assert cache.stack([]).shape == (0, 16, 16)
    assert cache_mod.decode_workers(None) >= 1 and cache_mod.decode_workers(0) == 1
    assert cache_mod.decode_workers(3) == 3
