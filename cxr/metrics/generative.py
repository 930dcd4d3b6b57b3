"""Distances between a real and a generated image set, computed on feature arrays.

Every function takes ``(N, D)`` feature arrays (rows are images) from one extractor; absolute
values depend on that extractor, so the headline is a ratio (:func:`relative_fd`).

* Fréchet distance (Heusel et al. 2017): ``‖μr − μg‖² + Tr(Σr + Σg − 2 (Σr Σg)^½)`` over
  Gaussian fits of the two sets (pytorch-fid's ``calculate_frechet_distance``).
* Kernel inception distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic kernel
  ``k(a, b) = (a·b / D + 1)³``, averaged over random subsets (mean and std over subsets):
  ``MMD² = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(n(n−1)) − 2 Σ_{i,j} k(x_i, y_j)/(mn)``.
* Relative FD: FD(real train, generated) / FD(real train, real held-out); 1 means the generated
  set is as far from the training images as unseen real images are (Woodland et al. 2024:
  absolute FIDs are not comparable across feature extractors).
* Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020),
  with ``r_k(x)`` the distance from ``x`` to its k-th nearest neighbour in its own set:
  precision = share of generated points inside some real ball ``B(r_i, r_k(r_i))``; recall =
  share of real points inside some generated ball; density = ``1/(kM) Σ_j Σ_i 1[f_j ∈ B(r_i)]``
  (≈ 1 for two samples of one distribution); coverage = share of real points whose own ball
  holds a generated point.
* Memorization: each generated image's nearest training image, compared with how near unseen
  real images come to the training set (:func:`memorization_share`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import linalg
from scipy.spatial.distance import cdist

PRDC_K = 3  # Kynkäänniemi et al. 2019 and Naeem et al. 2020 both recommend k = 3 for precision/recall


def _features(x: np.ndarray, name: str = "features") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an (N, D) array, got shape {x.shape}")
    return x


def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N−1) covariance of an (N, D) feature array, N >= 2."""
    x = _features(x)
    if len(x) < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 feature vectors, got {len(x)}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                                eps: float = 1e-6) -> float:
    """The Fréchet distance of two Gaussians (pytorch-fid's implementation when installed).

    A covariance fitted on no more images than dimensions is singular; the square root is then
    approximate (scipy's LinAlgWarning, silenced here: callers say so where it applies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes sqrtm's retired `disp`
        try:
            from pytorch_fid.fid_score import calculate_frechet_distance
        except ImportError:  # the same formula, with the same near-singular offset
            return _frechet(mu1, sigma1, mu2, sigma2, eps)
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps))


def _frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two (N, D) feature arrays."""
    return frechet_distance_from_stats(*gaussian_fit(x), *gaussian_fit(y))


def relative_fd(fd_generated: float, fd_heldout: float) -> float:
    """FD(train, generated) / FD(train, held-out); NaN when the reference distance is not positive."""
    if not (fd_heldout > 0) or not math.isfinite(fd_generated):
        return float("nan")
    return float(fd_generated / fd_heldout)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic kernel ``(x·y / D + 1)³`` between the rows of two (·, D) arrays."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two samples with the cubic polynomial kernel (each set >= 2 rows)."""
    x, y = _features(x, "x"), _features(y, "y")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"unbiased MMD² needs at least 2 rows per set, got {m} and {n}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_distance(x: np.ndarray, y: np.ndarray, n_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of :func:`mmd2_unbiased` over ``n_subsets`` random subsets
    of ``min(subset_size, len(x), len(y))`` rows of each set, drawn without replacement."""
    x, y = _features(x, "x"), _features(y, "y")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 rows per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(n_subsets)]
    return float(np.mean(values)), float(np.std(values))


def kth_neighbour_radii(x: np.ndarray, k: int = PRDC_K) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row (Euclidean)."""
    x = _features(x)
    if not 1 <= k < len(x):
        raise ValueError(f"k = {k} nearest neighbours need more than {k} feature vectors, got {len(x)}")
    d = cdist(x, x)
    return np.partition(d, k, axis=1)[:, k]  # column 0 holds each row's zero distance to itself


def prdc(real: np.ndarray, fake: np.ndarray, k: int = PRDC_K) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (see the module
    docstring); both sets need more than ``k`` rows."""
    real, fake = _features(real, "real"), _features(fake, "fake")
    real_r, fake_r = kth_neighbour_radii(real, k), kth_neighbour_radii(fake, k)
    d = cdist(real, fake)  # (N real, M fake)
    inside_real = d <= real_r[:, None]  # fake j inside real i's ball
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((d <= fake_r[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum() / (k * fake.shape[0])),
        "coverage": float((d.min(axis=1) <= real_r).mean()),
    }


def nearest_neighbours(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the Euclidean distance to its nearest reference row, and that row's index."""
    d = cdist(_features(query, "query"), _features(reference, "reference"))
    idx = d.argmin(axis=1)
    return d[np.arange(len(d)), idx], idx


def memorization_share(generated: np.ndarray, heldout: np.ndarray, percentile: float = 1.0,
                       higher_is_closer: bool = False) -> tuple[float, float]:
    """Share of generated images closer to the training set than the ``percentile``-th closest
    held-out real image, and that threshold.

    ``generated``/``heldout``: each image's nearness to its nearest training image: a distance
    (smaller is closer), or with ``higher_is_closer`` a similarity such as SSIM, whose threshold
    is then the (100 − ``percentile``)-th percentile.
    """
    generated, heldout = np.asarray(generated, dtype=np.float64), np.asarray(heldout, dtype=np.float64)
    if not len(heldout) or not len(generated):
        return float("nan"), float("nan")
    if higher_is_closer:
        threshold = float(np.percentile(heldout, 100.0 - percentile))
        return float(np.mean(generated > threshold)), threshold
    threshold = float(np.percentile(heldout, percentile))
    return float(np.mean(generated < threshold)), threshold


def pair_indices(n: int, max_pairs: int, seed: int = 0) -> np.ndarray:
    """(P, 2) distinct unordered index pairs i < j of ``n`` items: all of them when there are at
    most ``max_pairs``, else ``max_pairs`` drawn at random without repetition."""
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    i, j = np.triu_indices(n, k=1)
    pairs = np.stack([i, j], axis=1).astype(np.int64)
    if len(pairs) > max_pairs:
        pairs = pairs[np.sort(np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False))]
    return pairs
