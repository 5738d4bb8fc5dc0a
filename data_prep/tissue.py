"""Tissue criteria of the tiler: DSMIL's edge score and an Otsu saturation mask per tile.

``edges`` is the authors' recipe (DSMIL's ``deepzoom_tiler.py``); ``otsu`` is kept as an option.
Both are evaluated on every tile of the grid so the tiling summary can report what each keeps.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageStat

THUMB_PX_PER_TILE = 32  # thumbnail resolution of the tissue mask, in pixels per tile side
MAX_THUMB_SIDE = 8192  # bounds the thumbnail's memory for very large slides
SATURATION_RANGE = (15, 40)  # clamp of the Otsu threshold on 0-255 saturation
MIN_VALUE = 30  # pixels darker than this (0-255) are scanner borders, not tissue
TISSUE_FILTERS = ("edges", "otsu")
DSMIL_EDGE_THRESHOLD = 15.0  # deepzoom_tiler.py's --background_t default


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises the between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(np.argmax(between)) + 0.5


def tissue_mask(thumb: Image.Image) -> np.ndarray:
    """Tissue mask: saturation above a clamped Otsu threshold, not near-black, then closed."""
    hsv = np.asarray(thumb.convert("RGB").convert("HSV"))
    sat, val = hsv[..., 1], hsv[..., 2]
    lo, hi = SATURATION_RANGE
    thr = min(max(otsu_threshold(sat), lo), hi)
    mask = Image.fromarray(((sat > thr) & (val > MIN_VALUE)).astype(np.uint8) * 255)
    # closing fills the pale gaps inside loose stroma so they count as tissue
    mask = mask.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.MinFilter(5))
    return np.asarray(mask) > 0


def tissue_fractions(slide, geom: Any, coords: np.ndarray) -> np.ndarray:
    """Tissue fraction of each tile, from a thumbnail mask and an integral image."""
    w0, h0 = slide.dimensions
    td = max(geom.level0_tile / THUMB_PX_PER_TILE, max(w0, h0) / MAX_THUMB_SIDE, 1.0)
    thumb = slide.get_thumbnail((max(1, math.ceil(w0 / td)), max(1, math.ceil(h0 / td))))
    mask = tissue_mask(thumb).astype(np.float64)
    sx, sy = mask.shape[1] / w0, mask.shape[0] / h0
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    x0 = np.clip(np.round(coords[:, 0] * sx).astype(int), 0, mask.shape[1])
    y0 = np.clip(np.round(coords[:, 1] * sy).astype(int), 0, mask.shape[0])
    x1 = np.clip(np.round((coords[:, 0] + geom.level0_tile) * sx).astype(int), 0, mask.shape[1])
    y1 = np.clip(np.round((coords[:, 1] + geom.level0_tile) * sy).astype(int), 0, mask.shape[0])
    x1, y1 = np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)
    x1, y1 = np.minimum(x1, mask.shape[1]), np.minimum(y1, mask.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (sums / area).astype(np.float32)


def edge_score(tile: Image.Image) -> float:
    """DSMIL's background score: ``FIND_EDGES`` of the RGB tile, band sums averaged, per pixel.

    As ``deepzoom_tiler.py`` computes it (``np.mean(ImageStat.Stat(edges).sum) / tile_size**2``);
    the tile is kept when the score exceeds the threshold.
    """
    edges = tile.filter(ImageFilter.FIND_EDGES)
    return float(np.mean(ImageStat.Stat(edges).sum)) / (tile.size[0] * tile.size[1])
