"""The histogram site detector: chance on one distribution, perfect on two distinct ones."""

from __future__ import annotations

import numpy as np

from eval.domain_gap import domain_gap_accuracy, histogram_features


def test_features_are_normalized_histograms():
    f = histogram_features([np.zeros((4, 4)), np.ones((2, 8))], bins=4)
    assert f.shape == (2, 4)
    np.testing.assert_allclose(f, [[1, 0, 0, 0], [0, 0, 0, 1]])


def test_accuracy_separates_shifted_sites_but_not_identical_ones():
    rng = np.random.default_rng(0)
    a = [rng.beta(2, 2, (16, 16)) for _ in range(60)]
    same = [rng.beta(2, 2, (16, 16)) for _ in range(60)]
    shifted = [rng.beta(2, 2, (16, 16)) ** 1.6 for _ in range(60)]  # a gamma curve
    acc_same, _ = domain_gap_accuracy(a, same)
    acc_shift, _ = domain_gap_accuracy(a, shifted)
    assert acc_same < 0.7 and acc_shift > 0.95
