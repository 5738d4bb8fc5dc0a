"""Metrics in any feature space: Fréchet distance, KID, precision/recall, density/coverage.

All pairwise quantities come from blocked Euclidean distances (``|x|² + |y|² - 2 x·y`` in
float64, as scikit-learn computes them for ``prdc``), so 10k x 10k sets of 2048-d features need
a few hundred MB beyond the features themselves. Definitions:

- Fréchet distance: ``|mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^½)`` (Heusel et al. 2017), the
  trace of the square root from the eigenvalues of ``L^T S2 L`` with ``S1 = L L^T`` (equal
  to pytorch-fid's ``sqrtm`` to float tolerance, several times faster). This module owns the
  formula and the statistics (:func:`feature_statistics`): FID, Crop-FID and every feature
  space use them; :mod:`ldm.evaluation.fid` only adds the Inception and the ``.npz`` files.
- KID: unbiased MMD² with the kernel ``(x·y / d + 1)³`` over random subsets (Bińkowski et al.
  2018); the subsets are drawn as the original per-subset KID drew them.
- precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) with
  k-nearest-neighbour balls, exactly as the reference ``prdc`` package.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# float64 elements per distance block: 2**24 = 128 MB (and as much again for temporaries)
BLOCK_ELEMENTS = 2 ** 24


def as_features(x: Any, name: str = "features") -> np.ndarray:
    """A 2-D float64 array of feature vectors, or a ValueError naming ``name``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name}: expected a (N, D) feature array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: {int((~np.isfinite(x)).sum())} non-finite feature values")
    return x


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]} "
                         "(features of different extractors?)")


def blocks(x: np.ndarray, y: np.ndarray,
           block_elements: int = BLOCK_ELEMENTS) -> Iterator[tuple[slice, slice, np.ndarray,
                                                                   np.ndarray]]:
    """``(rows, cols, dots, distances)`` over blocks of ``x`` rows against ``y`` rows.

    ``dots = x[rows] @ y[cols].T``; ``distances`` are Euclidean, clipped at 0, with exact zeros
    on the diagonal when ``x is y``.
    """
    nx, ny = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    ncol = min(len(y), max(1, block_elements // 64))
    nrow = max(1, block_elements // ncol)
    for c0 in range(0, len(y), ncol):
        cols = slice(c0, min(c0 + ncol, len(y)))
        for r0 in range(0, len(x), nrow):
            rows = slice(r0, min(r0 + nrow, len(x)))
            dots = x[rows] @ y[cols].T
            sq = nx[rows, None] + ny[None, cols] - 2 * dots
            np.maximum(sq, 0, out=sq)
            dist = np.sqrt(sq, out=sq)
            if x is y and rows.start < cols.stop and cols.start < rows.stop:
                lo, hi = max(rows.start, cols.start), min(rows.stop, cols.stop)
                idx = np.arange(lo, hi)
                dist[idx - rows.start, idx - cols.start] = 0.0
            yield rows, cols, dots, dist


def feature_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance, as pytorch-fid computes them."""
    x = as_features(x)
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_factor(s: np.ndarray) -> np.ndarray:
    """A factor ``L`` with ``L L^T = s``: Cholesky, or the symmetric root when ``s`` is singular."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(s))
    factor, info = torch.linalg.cholesky_ex(t)
    if int(info) == 0:
        return factor.numpy()
    w, v = torch.linalg.eigh(t)  # rank-deficient (fewer samples than dimensions)
    return (v * w.clamp(min=0).sqrt()).numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians (pytorch-fid's value, via symmetric eigenvalues).

    With ``S1 = L L^T``, the non-zero eigenvalues of ``S1 S2`` are those of the symmetric PSD
    ``L^T S2 L``, so ``Tr (S1 S2)^½`` is the sum of the square roots of its eigenvalues: no
    general matrix square root, no complex parts, several times faster than ``sqrtm``.

    Singular covariances (fewer samples than dimensions, constant features) need no ``eps``:
    ``L`` comes from the clipped eigenvalues of ``S1`` and roundoff's negative eigenvalues
    of ``L^T S2 L`` count as 0, so the value stays exact up to roundoff. pytorch-fid instead
    adds ``eps = 1e-6`` to both diagonals when its ``sqrtm`` comes out non-finite, which moves
    its value (by 5e-6 relative on the rank-one covariances of the tests); elsewhere the two
    agree to 1e-6 relative. Computed in float64 whatever the input dtype.
    """
    import torch

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics differ in dimension: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape} (different --dims or extractors?)")
    factor = _psd_factor(s1)
    m = factor.T @ s2 @ factor
    eig = torch.linalg.eigvalsh(torch.from_numpy((m + m.T) / 2)).numpy()
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_of(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_statistics(x), *feature_statistics(y))


def draw_kid_subsets(n1: int, n2: int, num_subsets: int, subset_size: int,
                seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The random subsets KID draws (seeded: the same seed gives the same subsets)."""
    m = min(subset_size, n1, n2)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {n1} and {n2}")
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(num_subsets):
        xs.append(rng.choice(n1, m, replace=False))
        ys.append(rng.choice(n2, m, replace=False))
    return xs, ys


class _SubsetKernelSums:
    """Sums of the KID kernel over ``rows x cols`` of each subset pair, block by block."""

    def __init__(self, rows: list[np.ndarray], cols: list[np.ndarray], dim: int) -> None:
        self.rows = [np.sort(r) for r in rows]
        self.cols = [np.sort(c) for c in cols]
        self.dim = dim
        self.sums = np.zeros(len(rows))

    def add(self, rows: slice, cols: slice, dots: np.ndarray, weight: float = 1.0) -> None:
        """Add the kernel over this block's part of each subset (``weight`` x the sum)."""
        for s, (r, c) in enumerate(zip(self.rows, self.cols)):
            ri = r[np.searchsorted(r, rows.start):np.searchsorted(r, rows.stop)] - rows.start
            ci = c[np.searchsorted(c, cols.start):np.searchsorted(c, cols.stop)] - cols.start
            if len(ri) and len(ci):
                self.sums[s] += weight * ((dots[np.ix_(ri, ci)] / self.dim + 1) ** 3).sum()


def _kid_from_sums(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, x: np.ndarray,
                   y: np.ndarray, xs: list[np.ndarray],
                   ys: list[np.ndarray]) -> tuple[float, float]:
    d, m = x.shape[1], len(xs[0])
    dx = (np.einsum("ij,ij->i", x, x) / d + 1) ** 3
    dy = (np.einsum("ij,ij->i", y, y) / d + 1) ** 3
    tx = np.array([dx[i].sum() for i in xs])
    ty = np.array([dy[i].sum() for i in ys])
    values = (kxx - tx + kyy - ty) / (m * (m - 1)) - 2 * kxy / (m * m)
    return float(values.mean()), float(values.std())


def kid(x: np.ndarray, y: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID mean and std over subsets, block by block (the one KID formula of the project)."""
    x, y = as_features(x, "first set"), as_features(y, "second set")
    _check_pair(x, y)
    return pairwise_metrics(x, y, nearest_k=None, kid_subsets=num_subsets,
                            kid_subset_size=subset_size, seed=seed)["kid"]


def _knn_update(best: np.ndarray | None, dist: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` smallest values per row of ``best`` and ``dist`` together (unordered)."""
    both = dist if best is None else np.concatenate([best, dist], axis=1)
    if both.shape[1] <= k:
        return both
    return np.partition(both, k - 1, axis=1)[:, :k]


def symmetric_blocks(x: np.ndarray, block_elements: int = BLOCK_ELEMENTS
                     ) -> Iterator[tuple[slice, slice, np.ndarray, np.ndarray]]:
    """:func:`blocks` of ``x`` against itself, only those on or above the diagonal.

    Square blocks, so a block below the diagonal is the transpose of one yielded.
    """
    nx = np.einsum("ij,ij->i", x, x)
    size = max(1, int(np.sqrt(block_elements / 4)))
    starts = range(0, len(x), size)
    for r0 in starts:
        rows = slice(r0, min(r0 + size, len(x)))
        for c0 in range(r0, len(x), size):
            cols = slice(c0, min(c0 + size, len(x)))
            dots = x[rows] @ x[cols].T
            sq = nx[rows, None] + nx[None, cols] - 2 * dots
            np.maximum(sq, 0, out=sq)
            dist = np.sqrt(sq, out=sq)
            if r0 == c0:
                np.fill_diagonal(dist, 0.0)
            yield rows, cols, dots, dist


def self_pass(x: np.ndarray, k: int | None, kernel: _SubsetKernelSums | None = None,
              block_elements: int = BLOCK_ELEMENTS) -> np.ndarray | None:
    """Distance to the k-th nearest neighbour of each row within ``x`` (itself not counted).

    Like ``prdc``, the radius is the (k+1)-th smallest distance with the zero to itself.
    Each off-diagonal block serves both its rows and (transposed) its columns.
    """
    partial: dict[int, np.ndarray] = {}
    for rows, cols, dots, dist in symmetric_blocks(x, block_elements):
        off_diagonal = rows.start != cols.start
        if kernel is not None:
            kernel.add(rows, cols, dots, weight=2.0 if off_diagonal else 1.0)
        if k is not None:
            partial[rows.start] = _knn_update(partial.get(rows.start), dist, k + 1)
            if off_diagonal:
                partial[cols.start] = _knn_update(partial.get(cols.start), dist.T, k + 1)
    if k is None:
        return None
    radii = np.empty(len(x))
    for start, best in partial.items():
        radii[start:start + len(best)] = best.max(axis=1)
    return radii


def knn_radii(x: np.ndarray, k: int, block_elements: int = BLOCK_ELEMENTS) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row (``prdc``'s radii)."""
    x = as_features(x)
    if len(x) <= k:
        raise ValueError(f"k-nearest neighbours with k={k} need more than {k} features, "
                         f"got {len(x)}")
    return self_pass(x, k, block_elements=block_elements)


def pairwise_metrics(real: np.ndarray, fake: np.ndarray, nearest_k: int | None = 5,
                     kid_subsets: int | None = 100, kid_subset_size: int = 1000, seed: int = 0,
                     block_elements: int = BLOCK_ELEMENTS) -> dict[str, Any]:
    """Precision, recall, density, coverage (k=``nearest_k``) and KID in three blocked passes.

    Passes: real x real (radii, KID's real kernel), fake x fake (radii, KID's fake kernel),
    real x fake (the ball tests, KID's cross kernel). ``None`` skips PRDC or KID.
    """
    real, fake = as_features(real, "real features"), as_features(fake, "fake features")
    _check_pair(real, fake)
    if nearest_k is not None and min(len(real), len(fake)) <= nearest_k:
        raise ValueError(f"precision/recall with k={nearest_k} need more than {nearest_k} "
                         f"real and fake features, got {len(real)} and {len(fake)}")
    kernels = None
    if kid_subsets:
        xs, ys = draw_kid_subsets(len(real), len(fake), kid_subsets, kid_subset_size, seed)
        d = real.shape[1]
        kernels = (_SubsetKernelSums(xs, xs, d), _SubsetKernelSums(ys, ys, d),
                   _SubsetKernelSums(xs, ys, d))
    r_real = self_pass(real, nearest_k, kernels and kernels[0], block_elements)
    r_fake = self_pass(fake, nearest_k, kernels and kernels[1], block_elements)
    out: dict[str, Any] = {}
    if nearest_k is not None:
        out.update(_cross_pass(real, fake, r_real, r_fake, nearest_k,
                               kernels and kernels[2], block_elements))
    elif kernels is not None:
        for rows, cols, dots, _ in blocks(real, fake, block_elements):
            kernels[2].add(rows, cols, dots)
    if kernels is not None:
        out["kid"] = _kid_from_sums(kernels[0].sums, kernels[1].sums, kernels[2].sums, real,
                                    fake, xs, ys)
    return out


def _cross_pass(real: np.ndarray, fake: np.ndarray, r_real: np.ndarray, r_fake: np.ndarray,
                k: int, kernel: _SubsetKernelSums | None,
                block_elements: int) -> dict[str, float]:
    """The ball tests of PRDC over real x fake distance blocks."""
    in_real_ball = np.zeros(len(fake), dtype=bool)  # precision
    real_ball_count = np.zeros(len(fake), dtype=np.int64)  # density
    in_fake_ball = np.zeros(len(real), dtype=bool)  # recall
    nearest_fake = np.full(len(real), np.inf)  # coverage
    for rows, cols, dots, dist in blocks(real, fake, block_elements):
        if kernel is not None:
            kernel.add(rows, cols, dots)
        inside = dist < r_real[rows, None]
        in_real_ball[cols] |= inside.any(axis=0)
        real_ball_count[cols] += inside.sum(axis=0)
        in_fake_ball[rows] |= (dist < r_fake[None, cols]).any(axis=1)
        np.minimum(nearest_fake[rows], dist.min(axis=1), out=nearest_fake[rows])
    return {"precision": float(in_real_ball.mean()), "recall": float(in_fake_ball.mean()),
            "density": float(real_ball_count.mean() / k),
            "coverage": float((nearest_fake < r_real).mean()), "nearest_k": k}


def all_metrics(real: np.ndarray, fake: np.ndarray, nearest_k: int = 5, kid_subsets: int = 100,
                kid_subset_size: int = 1000, seed: int = 0,
                block_elements: int = BLOCK_ELEMENTS) -> dict[str, Any]:
    """Fréchet distance, KID (mean, std), precision, recall, density, coverage; JSON-ready."""
    real, fake = as_features(real, "real features"), as_features(fake, "fake features")
    _check_pair(real, fake)
    out: dict[str, Any] = {"n_real": len(real), "n_fake": len(fake), "dims": real.shape[1]}
    if min(len(real), len(fake)) >= 2:
        out["fd"] = frechet_distance_of(real, fake)
    k = nearest_k if min(len(real), len(fake)) > nearest_k else None
    subsets = kid_subsets if min(len(real), len(fake)) >= 2 else None
    res = pairwise_metrics(real, fake, k, subsets, kid_subset_size, seed, block_elements)
    if "kid" in res:
        out["kid"], out["kid_std"] = res.pop("kid")
    out.update(res)
    return out
