"""Feature-space metrics: closed forms, agreement with pytorch-fid and prdc, KID unbiasedness."""
from __future__ import annotations

import numpy as np
import pytest

from ldm.evaluation.metrics import (
    all_metrics,
    feature_statistics,
    frechet_distance,
    kid,
    knn_radii,
    pairwise_metrics,
)


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_frechet_distance_closed_form_gaussians():
    """Commuting covariances: FD = |mu1 - mu2|² + Σ (sqrt(a_i) - sqrt(b_i))²."""
    d = 12
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    q = _rotation(d, 1)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    # samples of those Gaussians converge to the closed form
    x = mu1 + rng.standard_normal((40000, d)) * np.sqrt(a) @ q.T
    y = mu2 + rng.standard_normal((40000, d)) * np.sqrt(b) @ q.T
    fd = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert fd == pytest.approx(expected, rel=0.02)


def _pytorch_fid(*stats: np.ndarray) -> float:
    """pytorch-fid's own ``calculate_frechet_distance`` (``sqrtm``, its ``eps`` retry)."""
    import warnings

    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():  # scipy's deprecated ``disp``; "Matrix is singular"
        warnings.simplefilter("ignore")
        return float(calculate_frechet_distance(*stats))


def _inception_like(rng: np.random.Generator, n: int, d: int, shift: float) -> np.ndarray:
    """Non-negative, correlated features like Inception pool3's: a rank-64 part plus noise."""
    z = rng.standard_normal((n, 64)) @ rng.standard_normal((64, d)) * 0.1
    return np.abs(z + 0.05 * rng.standard_normal((n, d)) + shift)


def _assert_equals_pytorch_fid(x: np.ndarray, y: np.ndarray) -> None:
    stats = (*feature_statistics(x), *feature_statistics(y))
    fd = frechet_distance(*stats)
    assert fd > 0 and fd == pytest.approx(_pytorch_fid(*stats), rel=1e-6)
    assert frechet_distance(*stats[:2], *stats[:2]) == pytest.approx(0, abs=1e-6 * fd)


# (n, d): full rank; fewer samples than dimensions (singular covariances, as a few hundred
# samples of 2048-d Inception features); and constant ("dead") features in both sets
@pytest.mark.parametrize("n,d,dead", [(50, 8, 0), (5, 8, 0), (600, 256, 0), (100, 256, 0),
                                      (40, 64, 8)])
def test_frechet_distance_equals_pytorch_fid(n, d, dead):
    rng = np.random.default_rng(n + d)
    x, y = _inception_like(rng, n, d, 0.2), _inception_like(rng, n + 7, d, 0.25)
    x[:, :dead], y[:, :dead] = 0.0, 0.0
    _assert_equals_pytorch_fid(x, y)
    with pytest.raises(ValueError, match="different --dims"):
        frechet_distance(x.mean(0)[:2], np.eye(2), y.mean(0), np.eye(d))


@pytest.mark.slow  # pytorch-fid's sqrtm of a 2048 x 2048 product: ~20 s each on one core
@pytest.mark.parametrize("n", [300, 2500])  # singular and full-rank covariances
def test_frechet_distance_equals_pytorch_fid_at_inception_size(n):
    rng = np.random.default_rng(n)
    _assert_equals_pytorch_fid(_inception_like(rng, n, 2048, 0.2),
                               _inception_like(rng, n + 17, 2048, 0.25))


def test_frechet_distance_needs_no_eps_where_pytorch_fid_does(capsys):
    """Rank-one covariances: pytorch-fid's ``sqrtm`` is not finite, so it adds 1e-6 to both
    diagonals and is off by ~5e-6 relative; ours is the closed form without any offset."""
    x = np.array([[1.0, 1, 0, 1, 1], [1, 0, 1, 0, 1]])
    y = np.array([[1.0, 1, 1, 2, 2], [1, 0, 1, 0, 1]])
    u, v = (x[0] - x[1]) / np.sqrt(2), (y[0] - y[1]) / np.sqrt(2)  # S1 = u u^T, S2 = v v^T
    exact = ((x.mean(0) - y.mean(0)) ** 2).sum() + u @ u + v @ v - 2 * abs(u @ v)
    stats = (*feature_statistics(x), *feature_statistics(y))
    assert frechet_distance(*stats) == pytest.approx(exact, rel=1e-12)
    theirs = _pytorch_fid(*stats)
    assert "adding 1e-06 to diagonal" in capsys.readouterr().out  # its eps branch ran
    assert theirs == pytest.approx(exact, rel=2e-5) and theirs != pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("block", [10 ** 7, 3000])  # one block; many row and column blocks
def test_prdc_equals_reference_package(k, block):
    import prdc
    from prdc.prdc import compute_nearest_neighbour_distances

    rng = np.random.default_rng(k)
    real = rng.standard_normal((180, 16))
    fake = 0.4 + 1.2 * rng.standard_normal((150, 16))
    ref = prdc.compute_prdc(real, fake, nearest_k=k)
    ours = pairwise_metrics(real, fake, nearest_k=k, kid_subsets=None, block_elements=block)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(ref[name]), abs=1e-12), name
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    np.testing.assert_allclose(knn_radii(real, k, block_elements=block),
                               compute_nearest_neighbour_distances(real, k), rtol=1e-10)


def _kid_per_subset(x, y, num_subsets, subset_size, seed):
    """Reference KID: each subset's unbiased MMD² with the whole kernel matrices in memory."""
    rng, d = np.random.default_rng(seed), x.shape[1]
    m = min(subset_size, len(x), len(y))
    values = []
    for _ in range(num_subsets):
        a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.sum() / (m * m))
    return float(np.mean(values)), float(np.std(values))


def test_kid_equals_the_per_subset_kid_and_is_unbiased():
    """Blocked KID = the per-subset KID; ~0 between two samples of one distribution."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((400, 10)), rng.standard_normal((300, 10))
    ours = kid(x, y, num_subsets=20, subset_size=100, seed=5)
    assert ours == pytest.approx(_kid_per_subset(x, y, 20, 100, seed=5), rel=1e-10)
    same = np.array([kid(rng.standard_normal((200, 10)), rng.standard_normal((200, 10)),
                         num_subsets=1, subset_size=200, seed=s)[0] for s in range(40)])
    # unbiased: the mean over independent draws is 0 within its standard error
    assert abs(same.mean()) < 3 * same.std() / np.sqrt(len(same))
    assert (same < 0).any() and (same > 0).any()
    shifted = kid(x, y + 0.5, num_subsets=20, subset_size=100, seed=5)[0]
    assert shifted > 20 * same.std()


def test_all_metrics_identical_sets_and_errors():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((60, 6))
    m = all_metrics(x, x.copy(), nearest_k=3, kid_subsets=5, kid_subset_size=30)
    assert m["fd"] == pytest.approx(0, abs=1e-8)
    assert m["precision"] == m["recall"] == m["coverage"] == 1.0
    assert m["n_real"] == m["n_fake"] == 60 and m["dims"] == 6
    with pytest.raises(ValueError, match="dimensions differ"):
        all_metrics(x, x[:, :5])
    with pytest.raises(ValueError, match="non-finite"):
        all_metrics(x, np.full((4, 6), np.nan))
