"""Classical harmonizers: each keeps the property it promises, fitted state round-trips, and
`cxr harmonize --method X` rewrites a tree that reads back with the same labels."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.cli.main import main
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.splits import split_records
from cxr.errors import ConfigError, DataError
from cyclegan_helpers import nlm_site
from harmonize.histogram import fit_reference, quantile_function
from harmonize.methods import (
    HARMONIZERS,
    create_harmonizer,
    load_harmonizer,
    low_frequency_square,
    register_harmonizer,
    standardize,
)
from harmonize.trees import FITTED, MANIFEST, harmonize_tree, lung_mask_finder, match_tree

METHODS = ("histogram", "lung-histogram", "percentile", "zscore", "clahe", "fda")


def _images(n: int, shape=(32, 32), seed: int = 0, lo: float = 0.2, hi: float = 0.9) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [lo + (hi - lo) * rng.random(shape) ** (1 + k / 4) for k in range(n)]


def _lungs(shape=(32, 32)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[6:26, 4:14] = True
    mask[6:26, 18:28] = True
    return mask


def test_registry_holds_every_classical_method_and_checks_options():
    assert set(METHODS) <= set(HARMONIZERS)
    with pytest.raises(ConfigError, match="unknown harmonization method 'nope'"):
        create_harmonizer("nope")
    with pytest.raises(ConfigError, match="method clahe takes no option 'beta'"):
        create_harmonizer("clahe", beta=0.1)
    with pytest.raises(ConfigError, match="beta must be a number in"):
        create_harmonizer("fda", beta=0.0)
    with pytest.raises(ConfigError, match="low .* must be below high"):
        create_harmonizer("percentile", low=90, high=10)
    with pytest.raises(ValueError, match="registered twice"):
        register_harmonizer("histogram")(type("Again", (HARMONIZERS["histogram"],), {}))
    with pytest.raises(RuntimeError, match="not fitted"):
        create_harmonizer("zscore").apply(np.zeros((4, 4)))


def test_histogram_matching_gives_the_reference_histogram():
    refs = _images(4)
    h = create_harmonizer("histogram").fit(refs)
    out = h.apply(np.random.default_rng(9).random((40, 36)) * 0.3)
    target = fit_reference(refs).quantiles
    assert np.abs(quantile_function(out, 1024) - target).max() < 0.01
    assert out.shape == (40, 36) and out.dtype == np.float32


def test_lung_histogram_uses_only_lung_pixels_and_falls_back_to_the_whole_image():
    lungs = _lungs()
    refs = _images(3, seed=1)
    h = create_harmonizer("lung-histogram").fit(refs, [lungs] * 3)
    # The fit reads lung pixels only: other pixels outside the lungs fit the same state.
    other = [np.where(lungs, r, 1.0 - r) for r in refs]
    assert np.array_equal(create_harmonizer("lung-histogram").fit(other, [lungs] * 3).state()["quantiles"],
                          h.state()["quantiles"])
    src = _images(1, seed=2, lo=0.0, hi=0.4)[0]
    out = h.apply(src, lungs)
    # Inside the lungs the histogram becomes the reference lungs' histogram ...
    assert np.abs(quantile_function(out, 1024, lungs) - h.state()["quantiles"]).max() < 0.01
    # ... and the curve depends on the lung pixels' statistics alone: new pixels outside them
    # leave every lung pixel where it was.
    changed = np.where(lungs, src, np.random.default_rng(3).random(src.shape))
    assert np.array_equal(h.apply(changed, lungs)[lungs], out[lungs])
    # Without a mask (or an empty one): whole-image matching to the same reference.
    whole = h.apply(src)
    assert np.array_equal(h.apply(src, np.zeros_like(lungs)), whole)
    assert np.abs(quantile_function(whole, 1024) - h.state()["quantiles"]).max() < 0.01


def test_percentile_maps_each_images_range_onto_the_references():
    refs = _images(5)
    h = create_harmonizer("percentile", low=1, high=99).fit(refs)
    ref_lo, ref_hi = np.mean([np.percentile(r, [1, 99]) for r in refs], axis=0)
    out = h.apply(0.1 + 0.2 * np.random.default_rng(4).random((30, 30)))
    assert np.allclose(np.percentile(out, [1, 99]), [ref_lo, ref_hi], atol=1e-6)
    flat = h.apply(np.full((8, 8), 0.3))
    assert np.allclose(flat, (ref_lo + ref_hi) / 2)


@pytest.mark.parametrize("region", ["image", "lungs"])
def test_zscore_standardizes_to_zero_mean_unit_variance_and_takes_the_reference_moments(region):
    lungs = _lungs()
    src = _images(1, seed=5, lo=0.0, hi=0.3)[0]
    mask = lungs if region == "lungs" else None
    z = standardize(src, mask)
    inside = z[lungs] if region == "lungs" else z
    assert abs(inside.mean()) < 1e-12 and abs(inside.var() - 1.0) < 1e-12
    refs = _images(4, seed=6)
    h = create_harmonizer("zscore", region=region).fit(refs, [lungs] * 4)
    sel = (lambda a: a[lungs]) if region == "lungs" else (lambda a: a.ravel())
    mean, std = np.mean([sel(r).mean() for r in refs]), np.mean([sel(r).std() for r in refs])
    out = sel(h.apply(src, lungs).astype(np.float64))
    assert abs(out.mean() - mean) < 1e-6 and abs(out.std() - std) < 1e-6


def _local_contrast(image: np.ndarray, k: int = 8) -> float:
    h, w = image.shape
    blocks = image[:h // k * k, :w // k * k].reshape(h // k, k, w // k, k)
    return float(blocks.std(axis=(1, 3)).mean())


def test_clahe_raises_local_contrast_and_needs_no_reference():
    y, x = np.mgrid[0:64, 0:64] / 64.0
    dull = 0.45 + 0.05 * np.sin(12 * x) * np.cos(9 * y)  # gray levels in [0.4, 0.5]
    h = create_harmonizer("clahe", clip_limit=4.0, grid=4)
    out = h.apply(dull)
    assert out.shape == dull.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert _local_contrast(out) > 3 * _local_contrast(dull)
    assert h.state() == {}


def test_fda_keeps_the_phase_and_takes_the_references_low_frequency_amplitude():
    size, beta = 32, 0.1
    refs = _images(4, seed=7)
    h = create_harmonizer("fda", beta=beta, size=size).fit(refs)
    mean_amp = np.mean([np.abs(np.fft.fft2(r)) for r in refs], axis=0)
    assert np.allclose(h.state()["amplitude"], mean_amp)
    src = _images(1, seed=8, lo=0.0, hi=0.5)[0]
    out = h.apply(src).astype(np.float64)
    square = low_frequency_square((size, size), beta)
    assert square.sum() == (2 * 3 + 1) ** 2  # half-width floor(32 * 0.1) = 3 around DC
    f_src, f_out = np.fft.fft2(src), np.fft.fft2(out)
    tol = 1e-4 * np.abs(f_src).max()
    assert np.abs(np.abs(f_out)[square] - mean_amp[square]).max() < tol
    assert np.abs(np.abs(f_out)[~square] - np.abs(f_src)[~square]).max() < tol
    keep = np.abs(f_src) > 1e-3 * np.abs(f_src).max()
    assert np.abs(np.angle(f_out[keep] / f_src[keep])).max() < 1e-3
    # Another size: the change is computed at the working size and the image keeps its shape.
    other = h.apply(np.full((40, 48), 0.2))
    assert other.shape == (40, 48) and abs(other.mean() - np.mean(refs)) < 0.01


@pytest.mark.parametrize("method", METHODS)
def test_fitted_state_round_trips_to_the_same_bytes(method, tmp_path):
    lungs = _lungs()
    h = create_harmonizer(method).fit(_images(3, seed=10), [lungs] * 3)
    digest = h.save(tmp_path / "h.safetensors")
    assert digest == hashlib.sha256((tmp_path / "h.safetensors").read_bytes()).hexdigest() == h.state_hash()
    back = load_harmonizer(tmp_path / "h.safetensors", method)
    assert back.options == h.options and back.state_hash() == digest
    src = _images(1, seed=11, lo=0.05, hi=0.6)[0]
    assert back.apply(src, lungs).tobytes() == h.apply(src, lungs).tobytes()


def test_loading_a_wrong_or_foreign_file_is_one_clear_error(tmp_path):
    create_harmonizer("percentile").fit(_images(2)).save(tmp_path / "p.safetensors")
    with pytest.raises(DataError, match="fitted state of method percentile, not fda"):
        load_harmonizer(tmp_path / "p.safetensors", "fda")
    (tmp_path / "junk.safetensors").write_bytes(b"not a state")
    with pytest.raises(DataError, match="not a fitted harmonizer"):
        load_harmonizer(tmp_path / "junk.safetensors")
    with pytest.raises(DataError, match="fitted harmonizer not found"):
        load_harmonizer(tmp_path / "none.safetensors")


# ----------------------------------------------------------------------------------------------
# Trees


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    src = nlm_site(root / "m", "montgomery", 4, sizes=[(40, 34), (30, 44)])
    ref = nlm_site(root / "s", "shenzhen", 10)
    return src, ref


def _pixels(tree: Path) -> list[bytes]:
    return [Path(r.image).read_bytes() for r in load_tree(tree).records]


@pytest.mark.parametrize("method", METHODS)
def test_cli_harmonize_every_method_keeps_the_labels_and_records_the_fit(method, trees, tmp_path, capsys):
    src, ref = trees
    out = tmp_path / "out"
    assert main(["harmonize", "--method", method, "--reference", str(ref), "--in", str(src), "--out", str(out),
                 "--fitted", str(tmp_path / "state.safetensors")]) == 0
    assert f"harmonized 4 images (montgomery, {method})" in capsys.readouterr().out
    before, after = load_tree(src), load_tree(out)
    assert np.array_equal(before.label_matrix(), after.label_matrix())
    assert [r.masks.keys() for r in before.records] == [r.masks.keys() for r in after.records]
    manifest = json.loads((out / MANIFEST).read_text())
    state = (out / FITTED).read_bytes()
    assert manifest["method"] == method and manifest["options"] == create_harmonizer(method).options
    assert manifest["fitted_state_sha256"] == hashlib.sha256(state).hexdigest()
    assert (tmp_path / "state.safetensors").read_bytes() == state
    if method != "clahe":
        assert manifest["reference_images"] == len(split_records(load_tree(ref).records, seed=0)["train"])
    # The saved state, loaded without the reference, writes the same images.
    assert main(["harmonize", "--method", method, "--fitted", str(tmp_path / "state.safetensors"),
                 "--in", str(src), "--out", str(tmp_path / "again")]) == 0
    assert _pixels(tmp_path / "again") == _pixels(out)


def test_histogram_through_the_interface_writes_the_same_bytes_as_before(trees, tmp_path):
    src, ref = trees
    train = split_records(load_tree(ref).records, seed=0)["train"]
    for field in (1.0, 0.8):
        harmonize_tree(src, tmp_path / f"new{field}", ref, field=field)
        match_tree(src, tmp_path / f"old{field}", fit_reference((load_image(r.image) for r in train), field=field),
                   {"method": "histogram"})
        assert _pixels(tmp_path / f"new{field}") == _pixels(tmp_path / f"old{field}")


def test_cli_options_of_another_method_and_a_wrong_state_are_one_line(trees, tmp_path, capsys):
    src, ref = trees
    assert main(["harmonize", "--method", "clahe", "--beta", "0.1", "--in", str(src),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "cxr: error: --beta does not apply to --method clahe"
    create_harmonizer("percentile").fit(_images(2)).save(tmp_path / "p.safetensors")
    assert main(["harmonize", "--method", "fda", "--fitted", str(tmp_path / "p.safetensors"), "--in", str(src),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "fitted state of method percentile, not fda" in err and len(err.strip().splitlines()) == 1
    assert main(["harmonize", "--method", "zscore", "--in", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "needs --reference" in capsys.readouterr().err
    one = nlm_site(tmp_path / "one", "shenzhen", 1)
    assert main(["harmonize", "--method", "fda", "--reference", str(one), "--reference-split", "all",
                 "--in", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"cxr: error: {one}: only one reference image in split 'all': too few to fit fda "
                           "(needs at least 2)")
    assert not (tmp_path / "o").exists()


def test_lung_histogram_tree_reads_masks_and_says_once_where_they_are_missing(trees, tmp_path, capsys):
    src, ref = trees
    # The Montgomery-like tree has its ManualMask lungs, the Shenzhen-like one none: one note.
    capsys.readouterr()
    harmonize_tree(ref, tmp_path / "out", src, method="lung-histogram")
    assert capsys.readouterr().err.strip().splitlines() == [
        "cxr: note: no lung mask for 10 of 10 source images: matched on the whole image instead"]
    # A phantom keeps the truth lungs beside its trees: those count as masks (here all but one).
    phantom = tmp_path / "phantom"
    tree = phantom / "ChinaSet_AllFiles"
    shutil.copytree(ref, tree)
    lung_dir = phantom / "phantom_truth" / "lung"
    lung_dir.mkdir(parents=True)
    rows = []
    records = load_tree(tree).records
    for i, r in enumerate(records[1:]):
        h, w = load_image(r.image).shape
        left = (np.arange(w)[None, :].repeat(h, 0) < w // 2).astype(np.uint8)
        Image.fromarray(left).save(lung_dir / f"{i}.png")
        rows.append({"image": str(Path(r.image).relative_to(phantom)), "lung_mask": f"phantom_truth/lung/{i}.png"})
    with open(phantom / "phantom_truth" / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "lung_mask"])
        writer.writeheader()
        writer.writerows(rows)
    find = lung_mask_finder(tree)
    masks = [find(r) for r in records]
    assert masks[0] is None
    assert all(m is not None and m[:, 0].all() and not m[:, -1].any() for m in masks[1:])
    harmonize_tree(tree, tmp_path / "out2", src, method="lung-histogram")
    assert capsys.readouterr().err.strip().splitlines() == [
        "cxr: note: no lung mask for 1 of 10 source images: matched on the whole image instead"]
