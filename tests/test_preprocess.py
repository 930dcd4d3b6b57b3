"""Aspect-preserving resize, windowing, CLAHE."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.data.preprocess import Preprocess, apply, fit_geometry, percentile_window, resize_square
from cxr.errors import ConfigError


def test_pad_keeps_whole_field_and_centres_it():
    img = np.ones((300, 150), np.float32)  # portrait, 2:1
    out = resize_square(img, 64, "pad")
    assert out.shape == (64, 64)
    cols = np.where(out.max(0) > 0.5)[0]
    assert out[:, cols].min() > 0.99 and len(cols) == 32  # 150/300*64 = 32 columns of image
    assert cols[0] == 16 and out[:, :16].max() == 0.0  # centred, black padding


def test_crop_fills_the_square():
    img = np.ones((300, 150), np.float32)
    out = resize_square(img, 64, "crop")
    assert out.min() > 0.99
    assert fit_geometry(300, 150, 64, "crop") == (128, 64, -32, 0)


def test_resize_of_large_image_is_antialiased():
    rng = np.random.default_rng(0)
    img = (rng.random((3000, 3000)) > 0.5).astype(np.float32)  # binary noise, mean 0.5
    out = resize_square(img, 64)
    # Antialiasing averages ~47x47 pixels per output pixel: values cluster near 0.5.
    assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.05


def test_percentile_window_and_clahe():
    img = np.linspace(0, 1, 100 * 100, dtype=np.float32).reshape(100, 100)
    w = percentile_window(img, 10, 90)
    assert w.min() == 0 and w.max() == 1 and (w == 0).mean() == pytest.approx(0.1, abs=0.01)
    out = apply(img * 0.2 + 0.4, Preprocess(size=64, clahe=True))
    assert out.shape == (64, 64) and out.std() > (img * 0.2).std()  # contrast was stretched


@pytest.mark.parametrize("kw", [{"size": 0}, {"fit": "stretch"}, {"window": (50, 10)}])
def test_bad_settings_are_config_errors(kw):
    with pytest.raises(ConfigError):
        Preprocess(**kw)


def test_key_depends_on_every_setting():
    keys = {Preprocess().key(), Preprocess(size=128).key(), Preprocess(fit="crop").key(),
            Preprocess(clahe=True).key(), Preprocess(window=(1, 99)).key()}
    assert len(keys) == 5
