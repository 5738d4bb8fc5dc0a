"""Hematoxylin statistics of H&E images: the demo's stand-in labels and its adherence check.

One owner for the formulas: ``data_prep.tumor_til --stain-standin`` ranks patches by them and
:mod:`ldm.evaluation.adherence` measures generated patches with them.
"""
from __future__ import annotations

import numpy as np


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density per pixel: ``skimage.color.rgb2hed(rgb)[..., 0]``.

    Colour deconvolution with the Ruifrok & Johnston stain vectors; ``rgb`` is uint8
    ``(..., 3)`` (or float in [0, 1]).
    """
    from skimage.color import rgb2hed

    return rgb2hed(np.asarray(rgb)[..., :3])[..., 0]


def hematoxylin_stats(rgb: np.ndarray) -> tuple[float, float]:
    """``(mean, contrast)`` of an image's hematoxylin OD; contrast = 99th minus 50th percentile.

    The mean is the tumor stand-in (dense nuclei), the contrast the TIL stand-in (small dark
    nuclei on lighter tissue).
    """
    h = hematoxylin_od(rgb)
    p50, p99 = np.percentile(h, [50, 99])
    return float(h.mean()), float(p99 - p50)
