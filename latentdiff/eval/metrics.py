"""Distribution metrics on feature vectors: FID, KID, precision and recall.

Every function takes two sets of features, ``(N, D)`` arrays or tensors (the real / reference set
first, the generated set second), and computes in float64 with numpy. Which network made the
features is the caller's choice (see ``latentdiff.eval.features``); the numbers match pytorch-fid,
torchmetrics and clean-fid given the same features (``tests/test_eval_metrics.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- input checks -------------------------------------------------------------------------------------


def as_features(x, name: str = "features") -> np.ndarray:
    """(N, D) float64 array from an array or tensor; refuses other shapes and non-finite values."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, feature_dim) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values; check the images and the feature extractor")
    return x


def _check_pair(real, fake, metric: str, need: int) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets as float64, the same width, each with at least ``need`` samples."""
    real, fake = as_features(real, "real features"), as_features(fake, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"{metric}: feature dimensions differ (real {real.shape[1]}, generated {fake.shape[1]}); "
                         "both sets must come from the same feature extractor")
    for label, x in (("real", real), ("generated", fake)):
        if len(x) < need:
            raise ValueError(f"{metric} needs at least {need} {label} samples, got {len(x)}")
    return real, fake


# --- FID ----------------------------------------------------------------------------------------------


@dataclass
class GaussianStats:
    """Mean and covariance (ddof=1) of a feature set: what FID compares, and what gets cached."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    n: int  # samples behind the estimate

    @classmethod
    def of(cls, features, min_samples: int | None = None) -> GaussianStats:
        """Statistics of (N, D) features; ``min_samples`` defaults to D + 1 (a full-rank covariance)."""
        x = as_features(features)
        need = x.shape[1] + 1 if min_samples is None else max(2, min_samples)
        if len(x) < need:
            raise ValueError(
                f"FID with {x.shape[1]}-dimensional features needs at least {need} samples per set "
                f"(got {len(x)}); below D + 1 the covariance is singular and FID is biased. Generate more "
                "samples, use a smaller feature extractor, or pass min_samples (at least 2) to accept the bias")
        return cls(x.mean(0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1]), len(x))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by its eigendecomposition."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), Heusel et al. 2017.

    Tr (S_a S_b)^(1/2) is computed in the symmetric form Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): both factors
    are symmetric PSD, so their eigenvalues are real and non-negative up to rounding (clipped at 0), and no
    complex parts appear, unlike scipy.linalg.sqrtm on the non-symmetric product S_a S_b.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"FID: feature dimensions differ ({a.mu.shape[0]} vs {b.mu.shape[0]}); both statistics "
                         "must come from the same feature extractor")
    root_a = _psd_sqrt(a.sigma)
    middle = root_a @ b.sigma @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt)


def fid(real, fake, min_samples: int | None = None) -> float:
    """Frechet distance between two feature sets (see :func:`frechet_distance`)."""
    real, fake = _check_pair(real, fake, "FID", 2)
    return frechet_distance(GaussianStats.of(real, min_samples), GaussianStats.of(fake, min_samples))


# --- KID ----------------------------------------------------------------------------------------------


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / D + 1)^3, the KID kernel of Binkowski et al. 2018."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of MMD^2 between two samples with the cubic polynomial kernel."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def kid(real, fake, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0) -> dict:
    """Kernel Inception Distance, Binkowski et al. 2018: unbiased MMD^2 averaged over random subsets.

    ``subset_size`` is capped at the smaller set (the mean over subsets of the full sets is then the MMD of
    the full sets). Returns mean, std over subsets (what torchmetrics reports as its second value) and the
    standard error std / sqrt(num_subsets), plus the settings used. The standard error covers the choice
    of subsets only, not the draw of the sets themselves: when a set is used whole in every subset (it is
    no larger than ``subset_size``), its own sampling noise is not in it.
    """
    real, fake = _check_pair(real, fake, "KID", 2)
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples, got subset_size {subset_size}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be positive, got {num_subsets}")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                                     fake[rng.choice(len(fake), size, replace=False)])
                       for _ in range(num_subsets)])
    std = float(values.std(ddof=1)) if num_subsets > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "stderr": std / np.sqrt(num_subsets),
            "subset_size": int(size), "num_subsets": int(num_subsets)}


# --- precision and recall -----------------------------------------------------------------------------


def _sq_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(x), len(y)), clipped at 0 against rounding."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.clip(d, 0, None)


def knn_radii(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Distance from each point of x to its k-th nearest other point of x."""
    radii = np.empty(len(x))
    for start in range(0, len(x), chunk):
        d = _sq_distances(x[start:start + chunk], x)  # (c, N), column `start + i` is the point itself
        radii[start:start + chunk] = np.sqrt(np.partition(d, k, axis=1)[:, k])  # index 0 is self (distance 0)
    return radii


def manifold_coverage(support: np.ndarray, radii: np.ndarray, queries: np.ndarray, chunk: int = 2048) -> float:
    """Share of queries inside at least one ball (support_i, radii_i): the k-NN manifold estimate."""
    inside = np.zeros(len(queries), bool)
    r2 = radii**2
    for start in range(0, len(queries), chunk):
        d = _sq_distances(queries[start:start + chunk], support)  # (c, N)
        inside[start:start + chunk] = (d <= r2[None, :]).any(1)
    return float(inside.mean())


def precision_recall(real, fake, k: int = 3) -> dict:
    """Improved precision and recall, Kynkaanniemi et al. 2019.

    Each set's manifold is the union of balls around its points, each reaching the point's k-th nearest
    neighbour in the same set. Precision: share of generated samples inside the real manifold (fidelity);
    recall: share of real samples inside the generated manifold (coverage).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    real, fake = _check_pair(real, fake, "precision/recall", k + 1)
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return {"precision": precision, "recall": recall, "k": k}
