"""Histogram matching to a reference set (the classical harmonization baseline)."""

from __future__ import annotations

import numpy as np
import pytest

from harmonize.histogram import fit_reference, match_batch, match_histogram, quantile_function


def _image(seed: int, shape=(48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.clip(0.5 + 0.3 * np.sin(xx / 5.0 + seed) * np.cos(yy / 7.0) + rng.normal(0, 0.05, shape), 0, 1)


def test_matching_inverts_a_monotone_intensity_change():
    # The same anatomy through a different tone curve: matching to the original's histogram
    # must undo the curve (up to the quantile resolution).
    x = _image(0)
    y = x ** 2.2
    out = match_histogram(y, fit_reference([x], n_levels=2048))
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.abs(out - x).mean() < 0.005
    assert np.abs(y - x).mean() > 0.15  # the change was large


def test_matched_quantiles_follow_the_reference():
    ref = fit_reference([_image(s) ** 0.5 for s in range(4)])
    out = match_histogram(_image(9) ** 3, ref)
    q = quantile_function(out, 11)
    want = np.interp(np.linspace(0, 1, 11), ref.levels, ref.quantiles)
    assert np.abs(q[1:-1] - want[1:-1]).max() < 0.02


def test_matching_keeps_gray_level_order_and_maps_constants_to_the_median():
    x = _image(3)
    ref = fit_reference([_image(4) ** 0.7])
    out = match_histogram(x, ref)
    order = np.argsort(x.ravel(), kind="stable")
    assert (np.diff(out.ravel()[order]) >= -1e-7).all()  # monotone non-decreasing
    const = match_histogram(np.full((5, 5), 0.3), ref)
    median = np.interp(0.5, ref.levels, ref.quantiles)
    assert np.allclose(const, median, atol=1e-6)


def test_reference_is_the_average_quantile_function():
    # Wasserstein barycenter of U[0, 0.5] and U[0.5, 1] is U[0.25, 0.75].
    lo = np.linspace(0, 0.5, 9_999).reshape(101, 99)
    hi = lo + 0.5
    ref = fit_reference([lo, hi], n_levels=5)
    assert ref.n_images == 2
    assert ref.quantiles == pytest.approx([0.25, 0.375, 0.5, 0.625, 0.75], abs=1e-3)


def test_mask_batch_and_bad_input():
    x = _image(1)
    mask = np.zeros_like(x, dtype=bool)
    mask[:10] = True
    assert quantile_function(x, 3, mask)[-1] == pytest.approx(x[:10].max())
    ref = fit_reference([x])
    batch = match_batch(np.stack([x, x ** 2]), ref)
    assert batch.shape == (2,) + x.shape
    assert np.allclose(batch[0], batch[1], atol=0.01)  # same order statistics, same result
    with pytest.raises(ValueError, match="zero images"):
        fit_reference([])
    with pytest.raises(ValueError, match="empty"):
        match_histogram(np.zeros((0, 3)), ref)
    with pytest.raises(ValueError, match="n_levels"):
        quantile_function(x, 1)


def _framed(x: np.ndarray, pad: int, value: float) -> np.ndarray:
    """``x`` inside a frame of ``pad`` pixels of one gray level (blades, air beside the body)."""
    return np.pad(x, pad, constant_values=value)


def test_central_field_matching_ignores_the_frame():
    # Target and source: the same anatomy under different tone curves; the reference images
    # are framed tight, the source with a wide white frame. Whole-image matching counts the
    # frame and shifts the anatomy; matching the central 60 % inverts the curve as if unframed.
    anatomy = [_image(s, (40, 40)) for s in range(3)]
    ref_imgs = [_framed(a, 2, 0.0) for a in anatomy]
    source = _framed(_image(7, (40, 40)) ** 2.2, 12, 1.0)
    truth = _framed(_image(7, (40, 40)), 12, 1.0)
    centre = np.zeros(source.shape, bool)
    centre[12:-12, 12:-12] = True
    whole = match_histogram(source, fit_reference(ref_imgs))
    central = match_histogram(source, fit_reference(ref_imgs, field=0.6))
    err_whole = np.abs(whole - truth)[centre].mean()
    err_central = np.abs(central - truth)[centre].mean()
    assert err_central < 0.03 and err_whole > 3 * err_central, (err_whole, err_central)
    assert fit_reference(ref_imgs, field=0.6).field == 0.6
    assert np.all(np.diff(central[centre][np.argsort(source[centre])]) >= 0)  # gray-level order kept
    with pytest.raises(ValueError, match="field"):
        fit_reference(ref_imgs, field=0.0)
    with pytest.raises(ValueError, match="field"):
        fit_reference(ref_imgs, field=1.5)
