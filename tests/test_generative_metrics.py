"""Generated-set metrics on feature arrays: FD, KID, precision/recall/density/coverage, memorization."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.metrics import generative as g


def _gauss(n: int, d: int = 8, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = _gauss(400)
    assert abs(g.frechet_distance(x, x)) < 1e-6
    fds = [g.frechet_distance(x, x + s) for s in (0.5, 1.0, 2.0)]
    # a pure mean shift s in every one of 8 dimensions adds exactly 8 s²
    assert fds == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    # |Δμ|² + Σ (σ1 − σ2)² per dimension = 5 + (1 − 2)² + (2 − 3)² = 7
    assert g.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(7.0, abs=1e-9)
    assert g._frechet(mu1, s1, mu2, s2, 1e-6) == pytest.approx(7.0, abs=1e-9)


def test_relative_fd():
    assert g.relative_fd(6.0, 3.0) == 2.0
    assert np.isnan(g.relative_fd(1.0, 0.0))


def test_mmd2_unbiased_by_hand():
    x = np.array([[0.0], [1.0]])
    y = np.array([[2.0], [3.0]])
    k = lambda a, b: (a * b + 1.0) ** 3  # noqa: E731 (D = 1)
    want = (2 * k(0, 1)) / 2 + (2 * k(2, 3)) / 2 - 2 * np.mean([k(a, b) for a in (0, 1) for b in (2, 3)])
    assert g.mmd2_unbiased(x, y) == pytest.approx(want)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    same_mean, same_std = g.kernel_distance(_gauss(300, seed=1), _gauss(300, seed=2), n_subsets=20, subset_size=100)
    shifted, _ = g.kernel_distance(_gauss(300, seed=1), _gauss(300, shift=1.0, seed=2), n_subsets=20,
                                   subset_size=100)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted > 0.5 and shifted > 20 * abs(same_mean)


def test_prdc_by_hand_on_a_line():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [11.0], [12.0]])
    # k = 1: real radii 1, 1, 1, 1; fake radii 9.5, 1, 1, 1
    out = g.prdc(real, fake, k=1)
    assert out["precision"] == 0.25  # only 0.5 lies inside a real ball
    assert out["recall"] == 1.0  # every real point lies inside 0.5's ball of radius 9.5
    assert out["density"] == 0.5  # 0.5 is inside the balls of 0 and 1: 2 / (k · 4)
    assert out["coverage"] == 0.5  # the balls of 0 and 1 hold a generated point


def test_prdc_on_toy_gaussians():
    real = _gauss(1000, d=4, seed=3)
    same = g.prdc(real, real)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(4 / 3, abs=0.05)  # each real ball holds itself and its k = 3 neighbours
    twin = g.prdc(real, _gauss(1000, d=4, seed=4))
    assert twin["precision"] > 0.9 and twin["recall"] > 0.9
    assert twin["coverage"] == pytest.approx(1 - 0.5 ** 3, abs=0.04)  # Naeem et al.: 1 − 2^−k for M = N
    assert twin["density"] == pytest.approx(1.0, abs=0.15)
    apart = g.prdc(real, _gauss(1000, d=4, shift=50.0, seed=4))
    assert apart == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_refuses_too_few_points():
    with pytest.raises(ValueError, match="k = 3"):
        g.prdc(_gauss(3), _gauss(10))


def test_nearest_neighbours_and_memorization_share():
    train = np.array([[0.0, 0.0], [10.0, 0.0]])
    d, idx = g.nearest_neighbours(np.array([[9.0, 0.0], [0.0, 0.5]]), train)
    assert idx.tolist() == [1, 0] and d.tolist() == [1.0, 0.5]
    heldout = np.arange(1.0, 101.0)  # 1st percentile: 1.99
    share, threshold = g.memorization_share(np.array([0.0, 0.5, 5.0, 50.0]), heldout)
    assert threshold == pytest.approx(1.99) and share == 0.5
    share, threshold = g.memorization_share(np.array([0.995, 0.5]), np.linspace(0, 1, 101), higher_is_closer=True)
    assert threshold == pytest.approx(0.99) and share == 0.5


def test_pair_indices():
    assert g.pair_indices(3, 10).tolist() == [[0, 1], [0, 2], [1, 2]]
    some = g.pair_indices(100, 50, seed=1)
    assert some.shape == (50, 2) and (some[:, 0] < some[:, 1]).all() and len({tuple(p) for p in some}) == 50
    assert g.pair_indices(1, 5).shape == (0, 2)
