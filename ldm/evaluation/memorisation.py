"""Memorisation: how close each sample comes to its nearest training patch, in a feature space.

For every sample the nearest training patch (Euclidean, in the chosen extractor's features) is
compared with the training set's own nearest-neighbour distances: a sample closer to a
training patch than the ``percentile``-th percentile of the train-train nearest-neighbour
distances is flagged (an exact copy of a training patch has distance 0 and is always flagged).
The ratio ``d(sample, nearest train) / d(that train patch, its nearest other train patch)``
is below 1 for a sample nearer to a training patch than that patch's own neighbour.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ldm.evaluation.metrics import BLOCK_ELEMENTS, as_features, blocks, knn_radii


def nearest(x: np.ndarray, y: np.ndarray,
            block_elements: int = BLOCK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """Index in ``y`` and distance of each row of ``x``'s nearest row of ``y``."""
    best_d = np.full(len(x), np.inf)
    best_i = np.zeros(len(x), dtype=np.int64)
    for rows, cols, _, dist in blocks(x, y, block_elements):
        j = dist.argmin(axis=1)
        d = dist[np.arange(len(j)), j]
        better = d < best_d[rows]
        best_d[rows] = np.where(better, d, best_d[rows])
        best_i[rows] = np.where(better, j + cols.start, best_i[rows])
    return best_i, best_d


def memorisation(samples: np.ndarray, train: np.ndarray, percentile: float = 1.0,
                 top: int = 8, block_elements: int = BLOCK_ELEMENTS) -> dict[str, Any]:
    """Nearest training patch of every sample and the flagged fraction (see module docstring).

    Returns JSON-ready summary numbers, the per-sample ``nearest_index``/``distance``/``ratio``
    arrays and ``closest``: the ``top`` sample indices nearest to a training patch.
    """
    samples, train = as_features(samples, "sample features"), as_features(train, "train "
                                                                                 "features")
    if len(train) < 2:
        raise ValueError(f"memorisation needs at least 2 training features, got {len(train)}")
    train_nn = knn_radii(train, 1, block_elements)
    threshold = float(np.percentile(train_nn, percentile))
    idx, dist = nearest(samples, train, block_elements)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(train_nn[idx] > 0, dist / train_nn[idx], np.where(dist > 0, np.inf, 0))
    flagged = dist <= threshold
    order = np.argsort(dist, kind="stable")
    return {"percentile": percentile, "threshold": threshold,
            "train_nn_median": float(np.median(train_nn)),
            "fraction_flagged": float(flagged.mean()), "n_flagged": int(flagged.sum()),
            "n_exact_copies": int((dist == 0).sum()),
            "sample_nn_median": float(np.median(dist)),
            "ratio_median": float(np.median(ratio)),
            "fraction_ratio_below_1": float((ratio < 1).mean()),
            "nearest_index": idx, "distance": dist, "ratio": ratio, "flagged": flagged,
            "closest": order[:top]}


def summary(result: dict[str, Any], sample_names: Sequence[str],
            train_names: Sequence[str]) -> dict[str, Any]:
    """The JSON part of :func:`memorisation` with the closest pairs named."""
    plain = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
    plain["closest_pairs"] = [
        {"sample": sample_names[i], "train": train_names[int(result["nearest_index"][i])],
         "distance": float(result["distance"][i]), "ratio": float(result["ratio"][i])}
        for i in result["closest"]]
    return plain
