"""The fast paths of the phantom's chain and set-up give the numbers the plain versions give."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
from scipy import ndimage

from cxr.phantom import chains as C
from cxr.phantom.subjects import nih_rows


@pytest.mark.parametrize("shape", [(40, 36), (150, 140), (256, 250), (330, 320)])
@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.54, 3.0])
def test_gaussian_matches_ndimage_on_every_path(shape, sigma):
    # shapes straddle the window where shifted-view sums are used instead of ndimage
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    want = ndimage.gaussian_filter(img, sigma, mode="nearest", truncate=3.0)
    got = C.gaussian(img, sigma)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert got is not img and np.shares_memory(got, img) is False


@pytest.mark.parametrize("shape", [(5, 7), (127, 129), (128, 128), (256, 256), (250, 256), (33, 700)])
def test_banded_transpose_is_the_transpose(shape):
    # below 128² a plain copy; above, bands of 32 rows, the last one short
    img = np.random.default_rng(1).random(shape, dtype=np.float32)
    got = C.transposed(img)
    assert got.flags.c_contiguous and got.shape == shape[::-1]
    assert np.array_equal(got, img.T) and not np.shares_memory(got, img)


def test_wide_lowpass_keeps_constants_and_follows_a_true_gaussian():
    flat = np.full((200, 170), 0.37, np.float32)
    np.testing.assert_allclose(C.lowpass(flat, 16.0), 0.37, atol=1e-6)
    yy, xx = np.mgrid[0:256, 0:250].astype(np.float32)
    smooth = (np.sin(xx / 23.0) * np.cos(yy / 31.0)).astype(np.float32)  # content far below the cut-off
    for sigma in (6.4, 15.4, 25.6):
        got = C.lowpass(smooth, sigma)
        want = ndimage.gaussian_filter(smooth, sigma, mode="nearest", truncate=3.0)
        inner = (slice(40, -40), slice(40, -40))  # the block grid's edges differ from mode="nearest"
        assert got.dtype == np.float32 and got.shape == smooth.shape
        assert np.abs(got - want)[inner].max() < 0.03, sigma
        assert got.std() < smooth.std()


def test_lowpass_blocks_cover_every_pixel_once():
    # sizes not divisible by the block: the last block is shorter, and still an average
    for n, factor in ((37, 5), (256, 7), (250, 10)):
        r = C._resampling(n, factor)
        assert r.starts[0] == 0 and np.all(np.diff(r.starts) == factor)
        counts = np.round(1 / r.inv_counts).astype(int)
        assert counts.sum() == n and counts[-1] == n - r.starts[-1]
        np.testing.assert_allclose(r.w_lo + r.w_hi, 1.0, atol=1e-6)
        img = np.arange(n, dtype=np.float32)[:, None].repeat(3, 1)
        sums = C._block_sum(img, factor, 0)
        np.testing.assert_allclose(sums[:, 0], np.add.reduceat(np.arange(n, dtype=np.float64), r.starts))


def test_percentiles_equal_numpy():
    x = np.random.default_rng(1).normal(size=(113, 97)).astype(np.float32)
    for q in ((0.5, 99.5), (1.0, 99.0), (0.0, 100.0), (50.0, 50.0)):
        np.testing.assert_allclose(C.percentiles(x, q), np.percentile(x, q), rtol=1e-6, atol=1e-7)


def test_blocked_attenuation_in_place_equals_added_map():
    chain = C.load_chain("montgomery")
    for seed in range(20):
        geom = C.sample_geometry(chain, 96, 96, np.random.default_rng(seed))
        a = np.random.default_rng(seed).random((geom.height, geom.width), dtype=np.float32)
        want = a + C.blocked_attenuation(geom, chain)
        got = C.add_blocked_attenuation(a.copy(), geom, chain)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_standard_normal_is_keyed_by_the_stream():
    a = C.standard_normal((64, 60), C.stream(7, "appearance", "x"))
    b = C.standard_normal((64, 60), C.stream(7, "appearance", "x"))
    c = C.standard_normal((64, 60), C.stream(8, "appearance", "x"))
    assert a.dtype == np.float32 and a.shape == (64, 60)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    big = C.standard_normal((400, 400), C.stream(1, "n"))
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1.0) < 0.01


def test_nih_rows_match_a_row_by_row_read(tmp_path):
    path = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position"]
    rows = [["a.png", "Effusion|Mass", 0, 1, 40, "M", "PA"],
            ["b.png", "No Finding", 0, 2, 30, "f", "ap"],
            ["c.png", "Mass", 0, 3, 50, "", "LL"],
            ["d.png", "Nodule|Effusion", 0, 4, 61, "F", "AP"],
            ["e.png", "No Finding", 0, 5, 130, "M", "PA"]]
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    got = nih_rows(str(path))
    assert got.findings == (("Effusion", "Mass"), (), ("Mass",), ("Nodule", "Effusion"), ())
    assert list(got.by_finding) == ["Effusion", "Mass", "Nodule"]  # order of first appearance
    assert got.by_finding["Effusion"].tolist() == [0, 3] and got.by_finding["Mass"].tolist() == [0, 2]
    assert got.by_finding["Effusion"].dtype == np.int64 and got.normal.tolist() == [1, 4]
    assert got.sex.tolist() == ["M", "F", "M", "F", "M"] and got.sex.dtype == np.dtype("<U1")
    assert got.view.tolist() == ["PA", "AP", "PA", "AP", "PA"] and got.view.dtype == np.dtype("<U2")
    assert got.age.tolist() == [40, 30, 50, 61, 100]


def _same_rows(a, b) -> bool:
    arrays = ("age", "sex", "view", "normal")
    return (all(getattr(a, f).dtype == getattr(b, f).dtype and np.array_equal(getattr(a, f), getattr(b, f))
                for f in arrays)
            and a.findings == b.findings and list(a.by_finding) == list(b.by_finding)
            and all(np.array_equal(a.by_finding[k], b.by_finding[k]) for k in a.by_finding))


def test_packaged_nih_rows_are_torchxrayvisions_file():
    from cxr.phantom.subjects import _nih_path, _packed_nih

    assert _packed_nih() is not None, "cxr/phantom/assets/nih_rows.npz is missing from the install"
    packed = nih_rows()
    assert len(packed) == 112120
    assert _same_rows(packed, nih_rows(str(_nih_path())))


def test_make_assets_packs_what_the_csv_reader_returns(tmp_path):
    from cxr.phantom.make_assets import main
    from cxr.phantom.subjects import NIH_ASSET, _packed_nih, _rows_from_codes, nih_codes

    path = tmp_path / "entries.csv"
    path.write_text("Image Index,Finding Labels,Patient Age,Patient Gender,View Position\n"
                    "a.png,Mass|Nodule,40,M,PA\nb.png,No Finding,7,F,AP\nc.png,Nodule,88,,PA\n")
    assert main(["--nih", str(path), "--out", str(tmp_path / "assets")]) == 0
    packed = _packed_nih(tmp_path / "assets" / NIH_ASSET)
    assert _packed_nih(tmp_path / "none.npz") is None
    assert packed[3].tolist() == [0, 1, 2] and packed[4] == ["Mass|Nodule", "No Finding", "Nodule"]
    assert _same_rows(_rows_from_codes(*packed), _rows_from_codes(*nih_codes(path)))
    assert (tmp_path / "assets" / "NIH_NOTICE").read_text().startswith("cxr-gan phantom demographics")


def test_threaded_projection_gives_the_serial_maps():
    from cxr.phantom.anatomy import load_anatomy
    from cxr.phantom.render import warm_base_maps

    serial, threaded = load_anatomy(), load_anatomy()
    warm_base_maps(serial, (-3.0, 0.4, 6.0), threads=1)
    warm_base_maps(threaded, (-3.0, 0.4, 6.0), threads=2)
    assert sorted(serial.cache) == sorted(threaded.cache) == [("base", -3.0), ("base", 0.0), ("base", 6.0)]
    for key, base in serial.cache.items():
        other = threaded.cache[key]
        assert np.array_equal(base.maps.numpy(), other.maps.numpy())
        assert (base.x_center, base.apex_z, base.heart_center) == (other.x_center, other.apex_z, other.heart_center)


def test_shared_channel_volume_projects_every_yaw_as_its_own_would():
    from cxr.phantom.anatomy import load_anatomy
    from cxr.phantom.render import ChannelVolume, _project, _shear

    anatomy = load_anatomy()
    pads = {yaw: max(_shear(anatomy, yaw)[1:]) for yaw in (-6.0, 0.0, 3.0)}
    assert pads[0.0] == 1 and pads[-6.0] > pads[3.0] > 1  # wider shears need more air
    shared = ChannelVolume.of(anatomy, max(pads.values()) + 3)
    for yaw in pads:
        assert np.array_equal(_project(anatomy, yaw, shared), _project(anatomy, yaw))
    with pytest.raises(ValueError, match="padded by 1"):
        _project(anatomy, -6.0, ChannelVolume.of(anatomy, 1))


def test_bench_phantom_probe_leaves_its_files_for_the_end(tmp_path):
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_phantom")
    ms = bench.file_create_ms(tmp_path, n=20, size=64)
    assert 0.0 < ms < 1000.0
    (probe,) = tmp_path.iterdir()  # deleting them now would slow the run that follows
    assert len(list(probe.iterdir())) == 20 and all(f.stat().st_size == 64 for f in probe.iterdir())


def test_bench_phantom_table_shows_the_kernel_share_and_flags_a_busy_disk():
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_phantom")
    row = {"size": 256, "images": 800, "workers": 2, "wall_s": 3.5, "cpu_main_s": 0.3,
           "cpu_workers_s": 6.4, "sys_workers_s": 0.24, "rss_main_mb": 550.0, "rss_worker_mb": 437.0}
    line = bench.table([row]).splitlines()[-1]
    assert "| 229 |" in line and "| 8.0 (0.3) |" in line  # 800 / 3.5 s; 6.4 s / 800 (0.24 s)
    assert bench.busy_disk_note(row) is None
    busy = dict(row, sys_workers_s=1.6)  # 2 ms an image in the kernel
    assert "2.0 ms an image in the kernel" in bench.busy_disk_note(busy)
    assert bench.busy_disk_note(dict(busy, size=512)) is None  # four times the pixels and bytes


def test_bench_phantom_waits_for_the_disk_to_settle(tmp_path, monkeypatch):
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_phantom")
    probes = iter([0.6, 0.55, 0.04, 9.9])
    slept = []
    monkeypatch.setattr(bench, "file_create_ms", lambda folder: next(probes))
    monkeypatch.setattr(bench.time, "sleep", slept.append)
    monkeypatch.setattr(bench.os, "sync", lambda: slept.append("sync"))
    assert bench.settle(tmp_path, limit_s=60) == (0.04, 20.0)
    # the journal is committed and given its moment before the first probe
    assert slept == ["sync", bench.SETTLE_COMMIT_S] + [bench.SETTLE_STEP_S] * 2
    probes = iter([0.6, 0.6, 0.6])
    assert bench.settle(tmp_path, limit_s=10) == (0.6, 10.0)  # gives up, and says what it saw
    probes = iter([0.6])
    assert bench.settle(tmp_path, limit_s=0) == (0.6, 0.0)


def test_generation_preloads_the_volume_and_drops_it_before_the_workers(tmp_path):
    from dataclasses import dataclass

    from cxr.phantom.generate import CTBackend, PhantomConfig, generate
    from cxr.phantom.render import VOLUME_KEY

    calls: list[str] = []

    @dataclass(frozen=True)
    class Recording(CTBackend):
        def load(self):
            calls.append("load")
            return super().load()

        def preload(self, anatomy):
            calls.append("preload")
            super().preload(anatomy)
            assert anatomy.cache[VOLUME_KEY].pad >= 1

        def warm(self, anatomy, subjects, threads=1):
            calls.append("warm")
            super().warm(anatomy, subjects, threads)
            assert VOLUME_KEY not in anatomy.cache  # 100 MB the workers must not inherit

    @dataclass(frozen=True)
    class NoPreload(CTBackend):
        preload = None  # type: ignore[assignment]

    def tree(name, backend):
        out = tmp_path / name
        generate(PhantomConfig(preset="nlm", out=out, size=48, n=8, workers=1, seed=2), backend=backend)
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # projected here, as a user's CT is (the bundled one's maps are shipped: nothing to preload)
    preloaded = tree("a", Recording(shipped_projections=False))
    assert calls == ["load", "preload", "warm"]
    assert preloaded == tree("b", NoPreload(shipped_projections=False))  # the same bytes without it
    assert preloaded == tree("c", CTBackend())  # and with the shipped maps


def test_shipped_projections_are_the_bundled_ct_projected_now(tmp_path):
    import shutil
    from importlib import resources

    from cxr.phantom.make_assets import build_projections
    from cxr.phantom.projections import PROJECTIONS_ASSET, read_projections

    assets = resources.files("cxr.phantom") / "assets"
    shutil.copyfile(str(assets / "chest_ct.npz"), tmp_path / "chest_ct.npz")
    rebuilt = build_projections(tmp_path)  # what `make_assets --projections` writes
    with np.load(str(assets / PROJECTIONS_ASSET)) as a, np.load(rebuilt) as b:
        assert sorted(a.files) == sorted(b.files) and "maps_4" in a.files
        for key in a.files:  # equal to the bit: rebuild the asset after changing the projection
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    shipped = read_projections()
    assert shipped is not None and sorted(k[1] for k in shipped) == [-6.0, -3.0, 0.0, 3.0, 6.0]
    assert shipped[("base", 0.0)].maps.shape[:2] == (1, 7)


def test_stale_or_damaged_projections_are_ignored(tmp_path):
    from cxr.phantom import projections as P

    assert P.read_projections(digest="0" * 64) is None  # made from another CT
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert P.read_projections(bad) is None
    assert P.read_projections(tmp_path / "missing.npz") is None


def test_a_bundled_run_never_reads_the_ct_voxels(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from cxr.phantom import projections as P
    from cxr.phantom.anatomy import LazyAnatomy
    from cxr.phantom.generate import CTBackend, PhantomConfig, generate

    seen = []

    @dataclass(frozen=True)
    class Keeping(CTBackend):
        def load(self):
            seen.append(super().load())
            return seen[-1]

    generate(PhantomConfig(preset="nih", out=tmp_path / "t", size=48, n=6, workers=1, seed=1), backend=Keeping())
    (anatomy,) = seen
    assert isinstance(anatomy, LazyAnatomy) and not anatomy.loaded
    # without a matching asset the same object projects the CT itself
    monkeypatch.setattr(P, "read_projections", lambda *a, **k: None)
    fallback = P.bundled_anatomy()
    assert fallback.cache == {} and not fallback.loaded
    assert fallback.soft.shape == fallback.labels.shape and fallback.loaded


def test_guided_chunks_cover_the_jobs_in_order_and_shrink_at_the_end():
    from cxr.phantom.generate import guided_chunks

    parts = list(guided_chunks(list(range(800)), workers=2))
    assert [x for part in parts for x in part] == list(range(800))
    sizes = [len(p) for p in parts]
    assert sizes[0] == 32 and max(sizes) == 32 and min(sizes) >= 1
    assert sizes[-4:-1] == [2, 2, 2] and sizes[-1] <= 2 and sizes == sorted(sizes, reverse=True)
    assert len(parts) < 800 // 8  # far fewer hand-overs than the old chunks of 4
    assert [len(p) for p in guided_chunks(list(range(3)), workers=4)] == [2, 1]


def test_cached_draws_equal_numpy_s_own():
    from cxr.phantom.render import YAW_BINS, _child_seed
    from cxr.phantom.subjects import _yaw_cdf, _yaw_weights

    for seed in range(300):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        assert float(a.choice(YAW_BINS, p=_yaw_weights())) == YAW_BINS[int(_yaw_cdf().searchsorted(b.random(), side="right"))]
        assert a.random() == b.random()  # and the stream goes on alike
    for seed in (0, 7, 2**40 + 3, 2**64 - 1):
        for k in (0, 1):
            want = np.random.SeedSequence(seed).spawn(2)[k]
            assert np.array_equal(_child_seed(seed, k).generate_state(4), want.generate_state(4))


@pytest.mark.parametrize("n_lesions", [0, 1, 3, 21])
def test_packed_mask_warp_equals_warping_each_mask(n_lesions):
    rng = np.random.default_rng(n_lesions)
    lung = rng.integers(0, 3, (40, 36)).astype(np.uint8)
    lesions = [rng.random((40, 36)) < 0.2 for _ in range(n_lesions)]
    geom = C.Geometry(30, 44, ((0.9, -0.2, 4.0), (0.25, 1.1, -6.0)), (0, 0, 30, 44))
    grid = C.sampling_grid(geom, lung.shape)
    got_lung, got = C._warp_masks(lung, lesions, grid)
    planes = C._resample([lung] + lesions, grid, "nearest", "zeros")  # one plane per mask
    assert got_lung.dtype == np.uint8 and np.array_equal(got_lung, np.rint(planes[0]).astype(np.uint8))
    assert set(np.unique(got_lung)) <= {0, 1, 2} and (got_lung == 0).any()  # some fall outside
    assert len(got) == n_lesions
    for m, plane in zip(got, planes[1:]):
        assert m.dtype == bool and np.array_equal(m, plane > 0.5)


def test_projections_without_a_ct_to_match_are_ignored(monkeypatch):
    from cxr.phantom import projections as P

    def gone():
        raise FileNotFoundError("chest_ct.npz")

    monkeypatch.setattr(P, "ct_digest", gone)
    assert P.read_projections() is None  # the CT's own loader then names the missing file
