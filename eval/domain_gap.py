"""How separable two acquisition sites are from intensity statistics alone.

A linear classifier on normalized 32-bin intensity histograms (5-fold cross-validated
accuracy) is the cheapest "site detector". Near 0.5 means the sites share their gray-level
statistics; near 1.0 means a classifier can tell the hospital from the histogram, the
shortcut that makes cross-site evaluation necessary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def histogram_features(images: Sequence[np.ndarray], bins: int = 32) -> np.ndarray:
    """(N, bins) normalized intensity histograms of [0, 1] images."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    feats = [np.histogram(np.clip(img, 0, 1), bins=edges)[0] / img.size for img in images]
    return np.asarray(feats, dtype=np.float64)


def domain_gap_accuracy(images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray],
                        bins: int = 32, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the k-fold accuracy of logistic regression telling site A from site B."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([histogram_features(images_a, bins), histogram_features(images_b, bins)])
    y = np.concatenate([np.zeros(len(images_a)), np.ones(len(images_b))])
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(model, x, y, cv=cv)
    return float(scores.mean()), float(scores.std())
