"""Decoding every pixel format real chest X-ray files use, and refusing broken files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from builders import gradient, write_dicom, write_png
from cxr.data.image import check_image, image_info, load_image
from cxr.errors import DataError


@pytest.mark.parametrize("mode", ["L", "I;16", "P", "RGB", "LA", "RGBA"])
def test_png_modes_decode_to_the_same_gray_image(tmp_path, mode):
    img = load_image(write_png(tmp_path / "x.png", mode=mode))
    assert img.dtype == np.float32 and img.shape == (24, 20)
    ref = gradient(24, 20, 16 if mode == "I;16" else 8)
    expected = ref / (65535.0 if mode == "I;16" else 255.0)
    # Palette quantization may merge neighbouring gray levels; everything else is exact.
    tol = 2 / 255 if mode == "P" else 1e-6
    np.testing.assert_allclose(img, expected, atol=tol)


def test_sixteen_bit_png_keeps_its_depth(tmp_path):
    path = tmp_path / "deep.png"
    arr = np.array([[0, 1, 2, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(path)
    img = load_image(path)
    assert image_info(path).bit_depth == 16
    # Levels 1 and 2 out of 65535 stay distinct: no 8-bit round trip happened.
    assert 0 < img[0, 1] < img[0, 2] < 1e-4 and img[0, 3] == 1.0


def test_rgb_with_unequal_channels_uses_luma(tmp_path):
    path = tmp_path / "c.png"
    Image.fromarray(np.full((4, 4, 3), [255, 0, 0], np.uint8)).save(path)
    assert load_image(path)[0, 0] == pytest.approx(0.299, abs=1e-3)


def test_jpeg(tmp_path):
    path = tmp_path / "x.jpeg"
    Image.fromarray(gradient(32, 32)).save(path, quality=95)
    img = load_image(path)
    assert img.shape == (32, 32)
    np.testing.assert_allclose(img, gradient(32, 32) / 255.0, atol=0.05)


@pytest.mark.parametrize("bits", [12, 15])
def test_dicom_monochrome2_uses_bits_stored_range(tmp_path, bits):
    img = load_image(write_dicom(tmp_path / "a.dcm", bits_stored=bits))
    np.testing.assert_allclose(img, gradient(24, 20, bits) / (2**bits - 1), atol=1e-6)
    assert image_info(tmp_path / "a.dcm").bit_depth == bits


def test_dicom_monochrome1_is_inverted(tmp_path):
    m2 = load_image(write_dicom(tmp_path / "m2.dcm", photometric="MONOCHROME2"))
    m1 = load_image(write_dicom(tmp_path / "m1.dcm", photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_window_and_rescale(tmp_path):
    # Window [1536, 2560] of stored values: values below map to 0, above to 1, linear between.
    img = load_image(write_dicom(tmp_path / "w.dcm", bits_stored=12, window=(2048, 1024)))
    raw = gradient(24, 20, 12).astype(np.float64)
    np.testing.assert_allclose(img, np.clip((raw - 1536) / 1024, 0, 1), atol=1e-6)
    # Rescale to "HU-like" units with a window in those units gives the same picture.
    img2 = load_image(write_dicom(tmp_path / "r.dcm", bits_stored=12, slope=2.0, intercept=-1000,
                                  window=(2048 * 2 - 1000, 2048)))
    np.testing.assert_allclose(img2, img, atol=1e-6)


def test_broken_files_give_one_line_naming_the_file(tmp_path):
    good = write_png(tmp_path / "good.png", 256, 256).read_bytes()
    cases = {
        "zero.png": (b"", "empty file"),
        "trunc.png": (good[: len(good) // 2], "truncated"),
        "text.png": (b"this is not an image\n", "not an image"),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        for fn in (load_image, check_image):
            with pytest.raises(DataError) as e:
                fn(tmp_path / name)
            msg = str(e.value)
            assert name in msg and words in msg and "\n" not in msg
    write_dicom(tmp_path / "nopix.dcm", pixels=False)
    for fn in (load_image, check_image):
        with pytest.raises(DataError, match="nopix.dcm: DICOM file has no pixel data"):
            fn(tmp_path / "nopix.dcm")
    with pytest.raises(DataError, match="missing.png: file not found"):
        load_image(tmp_path / "missing.png")


def test_dicom_with_impossible_bit_depth_is_refused(tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "x.dcm", bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.BitsStored = 20  # more bits stored than the 16 allocated
    ds.save_as(path)
    with pytest.raises(DataError, match=r"x.dcm: BitsStored=20 is outside 1..BitsAllocated=16"):
        load_image(path)
