"""Acquisition chains: determinism, geometry carried to masks/boxes, a domain gap that survives
histogram matching, and YAML parameter files with one-line errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cxr.errors import ConfigError
from cxr.phantom import chains as C
from cxr.phantom.types import Lesion, Projection, Subject


def toy_projection(size: int = 64, seed: int = 0, tb: bool = True, sid: str = "S000001",
                   findings: tuple[str, ...] | None = None) -> Projection:
    """A hand-made chest: elliptic body and lungs, a disc heart, a spine, ribs, one lesion.

    Line integrals in water-equivalent cm (soft) and cm of bone, like the renderer's.
    """
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size

    def ell(cx, cy, rx, ry):
        r2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        return np.sqrt(np.clip(1 - r2, 0, None)), r2 < 1

    body_t, body = ell(0.5, 0.55, 0.42, 0.6)
    lung_l_t, lung_l = ell(0.33, 0.45, 0.13, 0.28)
    lung_r_t, lung_r = ell(0.67, 0.45, 0.13, 0.28)
    heart_t, heart = ell(0.55, 0.62, 0.15, 0.12)
    soft = 24 * body_t - 14 * (lung_l_t + lung_r_t) + 8 * heart_t
    spine = (np.abs(xx - 0.5) < 0.035) & body
    ribs = (np.sin(yy * 60 + 8 * (xx - 0.5) ** 2) > 0.6) & (lung_l | lung_r)
    bone = 3.0 * spine + 0.8 * ribs
    lesions = []
    if findings is None:
        findings = ("Tuberculosis",) if tb else ()
    for k, name in enumerate(findings):
        cx = 0.3 if k % 2 == 0 else 0.68
        les_t, les = ell(cx, 0.3 + 0.1 * (k // 2), 0.05, 0.04)
        soft = soft + 5 * les_t
        les = les & (lung_l | lung_r)
        ys, xs = np.nonzero(les)
        lesions.append(Lesion(name, "nodule_cluster", les,
                              (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    lung = np.zeros((size, size), np.uint8)
    lung[lung_l] = 1
    lung[lung_r] = 2
    subj = Subject(sid, seed, 40.0, "M", "PA", tuple(findings))
    return Projection(subj, soft.astype(np.float32), bone.astype(np.float32), body, lung, heart,
                      lesions, pixel_spacing_mm=400 / size)


@pytest.fixture(scope="module")
def sites() -> dict[str, C.AcquisitionChain]:
    return {name: C.load_chain(name) for name in C.PRESETS}


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


# --- determinism, shape, dtype --------------------------------------------------------------

def test_same_seed_same_image_other_seed_other_image(sites):
    proj = toy_projection(64)
    for chain in sites.values():
        a = C.acquire(proj, chain, 64, seed=7)
        b = C.acquire(proj, chain, 64, seed=7)
        c = C.acquire(proj, chain, 64, seed=8)
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.lung_mask, b.lung_mask)
        assert not np.array_equal(a.image, c.image)


def test_shape_dtype_levels_and_long_side(sites):
    proj = toy_projection(64)
    for chain in sites.values():
        for seed in range(4):
            rad = C.acquire(proj, chain, 48, seed=seed)
            h, w = rad.image.shape
            assert max(h, w) == 48
            frame = rad.geometry.frame
            assert abs(w / h - frame.width / frame.height) < 0.05
            assert rad.image.dtype == np.float32 and rad.lung_mask.shape == (h, w)
            assert 0.0 <= rad.image.min() and rad.image.max() <= 1.0
            levels = rad.image * (2**chain.acquisition_bits - 1)
            assert np.allclose(levels, np.round(levels), atol=1e-3)
    # Montgomery plates are portrait 4020 x 4892 or landscape.
    shapes = {C.acquire(proj, sites["montgomery"], 64, seed=s).image.shape for s in range(30)}
    assert (64, 53) in shapes and (53, 64) in shapes


def test_pair_shares_geometry_but_not_appearance(sites):
    proj = toy_projection(64)
    pair = C.acquire_all(proj, sites.values(), sites["montgomery"], 64)
    sz, mg = pair["shenzhen"], pair["montgomery"]
    assert sz.geometry == mg.geometry and sz.image.shape == mg.image.shape
    assert np.array_equal(sz.lung_mask, mg.lung_mask)
    assert [les.box for les in sz.lesions] == [les.box for les in mg.lesions]
    assert np.abs(sz.image - mg.image).mean() > 0.02
    # the home site's image equals what a lone acquisition of it gives
    assert np.array_equal(mg.image, C.acquire(proj, sites["montgomery"], 64).image)


# --- geometry follows into masks and boxes --------------------------------------------------

def test_masks_and_boxes_follow_the_transform(sites):
    proj = toy_projection(96)
    for seed in range(6):
        rad = C.acquire(proj, sites["montgomery"], 96, seed=seed)
        geom = rad.geometry
        les_in, les_out = proj.lesions[0], rad.lesions[0]
        assert les_out.box == C.box_of(les_out.mask)
        expected = geom.forward(centroid(les_in.mask)[None])[0]
        assert np.linalg.norm(centroid(les_out.mask) - expected) < 1.5
        for label in (1, 2):
            expected = geom.forward(centroid(proj.lung_mask == label)[None])[0]
            got = centroid(rad.lung_mask == label)
            assert np.linalg.norm(got - expected) < 1.5
        # image-left lung stays image-left under slight rotations
        assert centroid(rad.lung_mask == 1)[0] < centroid(rad.lung_mask == 2)[0]
        # lesion lies inside the lung field
        assert (rad.lung_mask[les_out.mask] > 0).mean() > 0.9


def test_image_content_moves_with_the_mask(sites):
    """A dense square drawn into the line integrals lands where its warped mask says."""
    proj = toy_projection(96, tb=False)
    m = np.zeros((96, 96), bool)
    m[30:40, 20:30] = True
    proj.bone[m] += 4.0
    proj.lesions.append(Lesion("Nodule", "test", m, (20, 30, 30, 40)))
    quiet = replace(sites["montgomery"], dose=1e9, electronic_noise=0.0, usm_amount=0.0,
                    rotation_deg=8.0)
    for seed in range(3):
        rad = C.acquire(proj, quiet, 96, seed=seed)
        mask = rad.lesions[0].mask
        ring = C.box_of(mask)
        x0, y0, x1, y1 = ring
        around = np.zeros_like(mask)
        around[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4] = True
        around &= ~mask
        assert rad.image[mask].mean() > rad.image[around].mean() + 0.1


def test_transform_box_covers_rotated_corners():
    geom = C.Geometry(100, 100, ((1.0, 0.0, 10.0), (0.0, 1.0, -5.0)), (0, 0, 100, 100))
    assert C.transform_box((10, 20, 30, 40), geom) == (20, 15, 40, 35)
    assert C.transform_box((200, 200, 210, 210), geom) is None


def test_collimation_and_marker_are_burnt_in(sites):
    proj = toy_projection(96, tb=False)
    chain = replace(sites["montgomery"], collimation_prob=1.0, collimation=(0.1, 0.1),
                    marker_prob=1.0, marker_left_prob=1.0)
    rad = C.acquire(proj, chain, 96, seed=3)
    geom = rad.geometry
    x0, y0, x1, y1 = geom.field
    assert x0 > 0 and y0 > 0 and x1 < geom.width and y1 < geom.height
    # the blades stop the beam: the border is brighter than the open field's air corners
    assert rad.image[:, : x0 - 1].mean() > rad.image[y0:y1, x0:x1].mean()
    mk = geom.marker
    assert mk is not None and mk.letter == "L"
    assert mk.x > geom.width / 2  # patient's left is on the image right
    g = C.glyph("L", mk.scale)
    patch = rad.image[mk.y:mk.y + g.shape[0], mk.x:mk.x + g.shape[1]]
    assert patch[g].mean() > patch[~g].mean() + 0.2


# --- the domain gap is not a gray-level curve -----------------------------------------------

def match_histogram(src: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Exact histogram matching by rank: what simple intensity normalization can do at best."""
    order = np.argsort(src, axis=None, kind="stable")
    out = np.empty(src.size, np.float64)
    out[order] = np.sort(ref, axis=None)
    return out.reshape(src.shape)


def laplacian_var(img: np.ndarray, mask: np.ndarray) -> float:
    lap = (-4 * img[1:-1, 1:-1] + img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:])
    return float(lap[mask[1:-1, 1:-1]].var())


def develop_twice(proj: Projection, chain: C.AcquisitionChain,
                  geom: C.Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Two exposures of one pose through one site: same geometry, independent noise."""
    warped = C.warp_projection(proj, geom)
    a = C.attenuation(warped.soft, warped.bone, chain) + C.blocked_attenuation(geom, chain)
    return (C.develop(a, chain, np.random.default_rng(1)), C.develop(a, chain, np.random.default_rng(2)))


def noiseless(chain: C.AcquisitionChain) -> C.AcquisitionChain:
    return replace(chain, dose=1e12, electronic_noise=0.0, structure_noise=0.0)


def test_chains_differ_in_texture_after_histogram_matching(sites):
    """Matching the CR image's histogram to the DR image's leaves its edges and grain apart."""
    sharp, noise = [], []
    for seed in range(3):
        proj = toy_projection(128, seed=seed)
        geom = C.sample_geometry(sites["shenzhen"], 128, 128, np.random.default_rng(seed))
        everywhere = np.ones((geom.height, geom.width), bool)
        # sharpness: noise-free images, so that only blur and processing differ
        sz0, _ = develop_twice(proj, noiseless(sites["shenzhen"]), geom)
        mg0, _ = develop_twice(proj, noiseless(sites["montgomery"]), geom)
        ref0 = sz0.astype(np.float64)
        sharp.append(laplacian_var(match_histogram(mg0, ref0), everywhere) / laplacian_var(ref0, everywhere))
        # noise: two exposures of the same pose, matched to one reference, differ by their noise
        sz1, sz2 = develop_twice(proj, sites["shenzhen"], geom)
        mg1, mg2 = develop_twice(proj, sites["montgomery"], geom)
        ref = sz1.astype(np.float64)
        mg1m, mg2m, sz2m = (match_histogram(x, ref) for x in (mg1, mg2, sz2))
        assert np.allclose(np.sort(mg1m, axis=None), np.sort(ref, axis=None))  # same histogram
        lungs = C.warp_projection(proj, geom).lung_mask > 0
        noise.append((mg1m - mg2m)[lungs].std() / (ref - sz2m)[lungs].std())
    # edge profiles differ: CR detector blur against DR fine detail, CR unsharp-mask overshoot
    assert min(abs(np.log(r)) for r in sharp) > np.log(1.4), sharp
    assert min(noise) > 1.6, noise  # CR: about twice the grain


# --- pure steps -----------------------------------------------------------------------------

def test_lut_is_monotone_and_quantized(sites):
    for chain in sites.values():
        t = C.lut_table(chain)
        assert t[0] == 0.0 and t[-1] == 1.0
        assert np.all(np.diff(t) >= 0)
        assert len(np.unique(t)) <= 2**chain.acquisition_bits


def test_noise_scales_with_dose(sites):
    flat = np.full((64, 64), 0.2, np.float32)
    rng = np.random.default_rng(0)
    low = C.quantum_noise(flat, replace(sites["shenzhen"], dose=1000, electronic_noise=0), rng)
    high = C.quantum_noise(flat, replace(sites["shenzhen"], dose=100000, electronic_noise=0), rng)
    assert low.std() == pytest.approx(np.sqrt(0.2 / 1000), rel=0.1)
    assert high.std() == pytest.approx(np.sqrt(0.2 / 100000), rel=0.1)


def test_output_pixels_sum_detector_pixels(sites):
    """Noise restated per output pixel equals the noise of b x b detector pixels averaged."""
    chain, b, level = sites["montgomery"], 4, 0.3  # Montgomery: counting, readout and grain
    big = C.quantum_noise(np.full((256 * b, 64 * b), level, np.float32), chain, np.random.default_rng(0))
    binned = big.reshape(256, b, 64 * b // b, b).mean(axis=(1, 3))
    px = C.per_output_pixel(chain, b)
    direct = C.quantum_noise(np.full((256, 64), level, np.float32), px, np.random.default_rng(1))
    assert direct.std() == pytest.approx(binned.std(), rel=0.08)
    assert binned.std() < big.std() / 3  # grain fades: about b times less
    assert px.dose == chain.dose * 16 and px.detector_blur_px == pytest.approx(chain.detector_blur_px / 4)
    assert C.per_output_pixel(chain, 1.0) is chain


def test_binning_is_frame_over_output(sites):
    geom = C.sample_geometry(sites["montgomery"], 256, 128, np.random.default_rng(0))
    assert C.binning(geom) == pytest.approx(4892 / 256)
    assert C.binning(replace(geom, frame=None)) == 1.0
    assert C.binning(replace(geom, frame=C.Frame(100, 90))) == 1.0  # no grain added upwards


def test_grain_fades_at_working_resolution(sites):
    """The same exposure developed at the plate's pitch and at 1/8 of it: 8x less grain.

    Without detector blur, which at the plate's pitch already smooths the grain a little.
    """
    proj = toy_projection(96)
    chain = replace(sites["montgomery"], detector_blur_px=0.0)
    geom = C.sample_geometry(chain, 96, 96, np.random.default_rng(0))
    warped = C.warp_projection(proj, geom)
    a = C.attenuation(warped.soft, warped.bone, chain) + C.blocked_attenuation(geom, chain)
    lungs = warped.lung_mask > 0
    grain = {}
    for bins in (1.0, 8.0):
        x1, x2 = (C.develop(a, chain, np.random.default_rng(k), bins) for k in (1, 2))
        grain[bins] = (x1 - x2)[lungs].std()
    assert grain[1.0] > 0.05  # grainy at the plate's pitch
    assert 6 < grain[1.0] / grain[8.0] < 9, grain


def test_lowpass_keeps_mean_and_smooths():
    rng = np.random.default_rng(0)
    img = rng.random((64, 80), dtype=np.float32)
    for sigma in (0.5, 1.5, 8.0):
        out = C.lowpass(img, sigma)
        assert out.shape == img.shape and out.dtype == np.float32
        assert out.mean() == pytest.approx(img.mean(), abs=0.02)
        assert out.std() < img.std()


# --- YAML parameter files -------------------------------------------------------------------

def test_presets_load_with_their_documented_differences(sites):
    sz, mg = sites["shenzhen"], sites["montgomery"]
    assert sz.output_mode == "P" and mg.output_mode == "L"
    assert mg.acquisition_bits == 12
    assert mg.mu_bone / mg.mu_soft > sz.mu_bone / sz.mu_soft  # CR: lower energy, more bone contrast
    assert mg.dose < sz.dose and mg.detector_blur_px > sz.detector_blur_px
    assert mg.usm_amount > sz.usm_amount and mg.scatter_fraction > sz.scatter_fraction
    assert {(f.width, f.height) for f in mg.frames} == {(4020, 4892), (4892, 4020)}


def test_third_site_from_a_file(tmp_path):
    path = tmp_path / "my_site.yaml"
    path.write_text("base: montgomery\nname: bedside\ndose: 800\nmarker_prob: 1.0\n")
    chain = C.load_chain(path)
    assert chain.name == "bedside" and chain.dose == 800 and chain.marker_prob == 1.0
    assert chain.acquisition_bits == 12  # inherited
    path.write_text("dose: 900\n")  # no base, no name: named after the file, neutral defaults
    plain = C.load_chain(path)
    assert plain.name == "my_site" and plain.dose == 900


@pytest.mark.parametrize("text, message", [
    ("name: x\ndoze: 100\n", "unknown key 'doze' (did you mean 'dose'?)"),
    ("name: x\ndose: -1\n", "key 'dose' = -1 is outside (0.0, inf]"),
    ("name: x\nzoom: [1.2, 0.9]\n", "key 'zoom' must satisfy"),
    ("name: x\noutput_mode: RGB\n", "key 'output_mode' must be one of P, L"),
    ("name: x\nframes: [{width: 100, hieght: 90}]\n", "unknown key 'hieght' (did you mean 'height'?)"),
    ("name: x\ndose: [1\n", "not valid YAML"),
    ("base: nowhere\n", "key 'base' must be one of"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_chain_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        C.load_chain(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_chain_file(tmp_path):
    with pytest.raises(ConfigError, match="chain file not found"):
        C.load_chain(tmp_path / "nope.yaml")


def test_frame_beyond_the_projection_mirrors_it_instead_of_streaking():
    """A frame that looks past the projection's lower edge sees the body mirrored there; a
    repeated edge row would be drawn out into vertical streaks."""
    proj = toy_projection(64)
    shift = 10  # output row v shows projection row v + 10
    geom = C.Geometry(width=64, height=64, matrix=((1.0, 0.0, 0.0), (0.0, 1.0, -float(shift))),
                      field=(0, 0, 64, 64))
    warped = C.warp_projection(proj, geom)
    np.testing.assert_allclose(warped.soft[:64 - shift], proj.soft[shift:], atol=1e-4)
    for k in range(shift):  # beyond the edge: row 63 - k of the projection, mirrored
        np.testing.assert_allclose(warped.soft[64 - shift + k], proj.soft[63 - k], atol=1e-4)
    assert np.abs(np.diff(warped.soft[64 - shift:], axis=0)).max() > 0  # not one repeated row
