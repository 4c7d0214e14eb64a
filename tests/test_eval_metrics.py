"""FID, KID and precision/recall: parity with torchmetrics and an independent scipy reference, known answers."""

import numpy as np
import pytest
import scipy.linalg
import torch

from latentdiff.eval.metrics import GaussianStats, fid, frechet_distance, kid, mmd2_unbiased, precision_recall


def _features(seed, n, d, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mixing) * scale + shift


def _scipy_fid(x, y):
    """The published formula as pytorch-fid writes it: scipy.linalg.sqrtm of the product, real part."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d,n,shift,scale", [(8, 200, 0.0, 1.0), (32, 400, 0.3, 1.5), (64, 300, 1.0, 0.5)])
def test_fid_matches_scipy_reference_and_torchmetrics(d, n, shift, scale):
    fm = pytest.importorskip("torchmetrics.image.fid")
    x, y = _features(0, n, d), _features(1, n, d, shift, scale)
    ours = fid(x, y)
    assert ours == pytest.approx(_scipy_fid(x, y), rel=1e-3, abs=1e-3)
    t = lambda a: torch.from_numpy(a)
    theirs = fm._compute_fid(t(x.mean(0)), t(np.cov(x, rowvar=False)), t(y.mean(0)), t(np.cov(y, rowvar=False)))
    assert ours == pytest.approx(float(theirs), rel=1e-3, abs=1e-3)


def test_fid_gaussian_closed_form_and_identity():
    # Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    s1 = GaussianStats(np.zeros(3), np.diag(a), 10)
    s2 = GaussianStats(np.array([1.0, 2.0, 0.0]), np.diag(b), 10)
    assert frechet_distance(s1, s2) == pytest.approx(5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), abs=1e-9)
    x = _features(3, 100, 16)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_rank_deficient_covariance_stays_real_and_close_to_scipy():
    x, y = _features(0, 40, 64), _features(1, 40, 64, 0.2)  # 40 samples in 64-D: singular covariances
    value = fid(x, y, min_samples=2)
    assert np.isfinite(value) and value == pytest.approx(_scipy_fid(x, y), rel=1e-3, abs=1e-3)


def test_fid_errors_say_what_is_needed():
    with pytest.raises(ValueError, match="at least 17 samples per set"):
        fid(_features(0, 10, 16), _features(1, 100, 16))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fid(_features(0, 100, 16), _features(1, 100, 8))
    with pytest.raises(ValueError, match="2-D"):
        fid(np.zeros(10), np.zeros(10))
    bad = _features(0, 100, 4)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fid(bad, _features(1, 100, 4))


def test_kid_matches_torchmetrics_on_full_sets():
    km = pytest.importorskip("torchmetrics.image.kid")
    x, y = _features(0, 120, 16), _features(1, 120, 16, 0.3)
    theirs = float(km.poly_mmd(torch.from_numpy(x), torch.from_numpy(y), degree=3, gamma=None, coef=1.0))
    assert mmd2_unbiased(x, y) == pytest.approx(theirs, rel=1e-6)
    out = kid(x, y, subset_size=1000, num_subsets=3)  # capped at 120: every subset is the full set
    assert out["subset_size"] == 120 and out["mean"] == pytest.approx(theirs, rel=1e-6)
    assert out["std"] == pytest.approx(0.0, abs=1e-9)


def test_kid_is_unbiased_and_reports_its_error():
    # Same distribution: the unbiased estimate averages to ~0 (a biased one stays positive).
    x = _features(0, 2000, 8)  # one distribution, two disjoint halves
    same = kid(x[:1000], x[1000:], subset_size=100, num_subsets=200)
    assert abs(same["mean"]) < 3 * same["stderr"] + 1e-4
    apart = kid(x[:500], x[500:1000] + 1.0, subset_size=100, num_subsets=50)
    assert apart["mean"] > 10 * apart["stderr"] > 0
    with pytest.raises(ValueError, match="at least 2 generated samples"):
        kid(x[:10], x[:1])


def _brute_pr(real, fake, k):
    """Independent reference: loops over points with explicit sorting."""
    def radius(points, i):
        return np.sort(np.linalg.norm(points - points[i], axis=1))[k]

    rr = np.array([radius(real, i) for i in range(len(real))])
    fr = np.array([radius(fake, i) for i in range(len(fake))])
    precision = np.mean([np.any(np.linalg.norm(real - f, axis=1) <= rr) for f in fake])
    recall = np.mean([np.any(np.linalg.norm(fake - r, axis=1) <= fr) for r in real])
    return precision, recall


def test_precision_recall_matches_brute_force():
    real, fake = _features(0, 150, 5), _features(1, 120, 5, shift=0.7, scale=0.6)
    out = precision_recall(real, fake, k=3)
    p, r = _brute_pr(real, fake, 3)
    assert out["precision"] == pytest.approx(p) and out["recall"] == pytest.approx(r)


def test_precision_recall_known_answers():
    rng = np.random.default_rng(0)
    modes = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])

    def mixture(n, which):
        return modes[rng.choice(which, n)] + rng.normal(size=(n, 2))

    real = mixture(2000, [0, 1, 2, 3])
    identical = precision_recall(real, real)
    assert identical["precision"] == 1.0 and identical["recall"] == 1.0
    # Mode dropping: half the modes -> full precision, recall ~ 1/2.
    dropped = precision_recall(real, mixture(2000, [0, 1]))
    assert dropped["precision"] > 0.97 and 0.45 < dropped["recall"] < 0.55
    # Half the samples off the data: precision ~ 1/2, full recall.
    off = np.concatenate([mixture(1000, [0, 1, 2, 3]), rng.normal(size=(1000, 2)) + [100.0, 100.0]])
    fake = precision_recall(real, off)
    assert 0.45 < fake["precision"] < 0.55 and fake["recall"] > 0.97
    far = precision_recall(real, real + 1000.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    with pytest.raises(ValueError, match="needs at least 4 generated samples"):
        precision_recall(real, real[:3], k=3)
