"""Tumor/TIL layouts of a large image: a grid of regions, each with its levels, and one summary.

A layout is read from JSON (``{"summary": "...", "grid": [["high/low", "low/high"], ...]}``),
CSV (one grid row per line, cells ``high/low``), a PNG mask (red >= 128: high tumor, green >=
128: high TIL; one cell per pixel) or a real slide's tiles in a split store. Cells may also be
class labels 0-3 (0 low/low, 1 low/high TIL, 2 high/low, 3 high/high). The grid is stretched
over the canvas; every window takes the cell under its centre, or a blend of the cells it
covers weighted by area.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm.data.captions import LEVEL_NAMES, class_label_from_levels, level_name, prob_to_level

Levels = tuple[str, str]  # (tumor, til), each "low" or "high"
CLASS_LEVELS: tuple[Levels, ...] = tuple((t, i) for t in LEVEL_NAMES[2] for i in LEVEL_NAMES[2])
MODES = ("centre", "blend")


@dataclass
class Layout:
    """Rows of cells (tumor, til levels), top to bottom, and the slide's summary."""

    grid: list[list[Levels]]
    summary: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)``."""
        return len(self.grid), len(self.grid[0])

    def distinct(self) -> list[Levels]:
        """The different cells, in first-seen row-major order."""
        return list(dict.fromkeys(c for row in self.grid for c in row))

    def to_json(self) -> dict[str, Any]:
        """JSON form (``read_layout`` reads it back)."""
        return {"summary": self.summary, "grid": [[f"{t}/{i}" for t, i in row]
                                                  for row in self.grid]}


def parse_cell(value: Any, where: str) -> Levels:
    """Levels of a cell: ``"high/low"``, ``{"tumor": .., "til": ..}`` or a class label 0-3."""
    if isinstance(value, dict):
        value = f"{value.get('tumor')}/{value.get('til')}"
    text = str(value).strip().lower()
    if text.isdigit():
        if int(text) >= len(CLASS_LEVELS):
            raise ValueError(f"{where}: class label {text} is not one of 0-3")
        return CLASS_LEVELS[int(text)]
    parts = [p.strip() for p in text.split("/")]
    if len(parts) != 2 or not all(p in LEVEL_NAMES[2] for p in parts):
        raise ValueError(f"{where}: cell {value!r} is not 'tumor/til' levels (low or high, e.g. "
                         "'high/low') or a class label 0-3")
    return parts[0], parts[1]


def _check_grid(rows: list[list[Any]], source: str) -> list[list[Levels]]:
    """Parsed cells of a rectangular, non-empty grid (errors name the row and column)."""
    if not rows or not rows[0]:
        raise ValueError(f"{source}: the layout grid is empty")
    if any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(f"{source}: layout rows differ in length "
                         f"({sorted({len(r) for r in rows})})")
    return [[parse_cell(c, f"{source} row {r + 1} column {k + 1}") for k, c in enumerate(row)]
            for r, row in enumerate(rows)]


def read_layout(path: str | Path, summary: str | None = None) -> Layout:
    """A layout from a JSON, CSV or PNG file; ``summary`` overrides the file's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"layout file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "grid" not in data:
            raise ValueError(f"{path}: a JSON layout is an object with a 'grid' (list of rows)")
        layout = Layout(_check_grid(data["grid"], str(path)), data.get("summary"))
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
        layout = Layout(_check_grid(rows, str(path)))
    elif suffix == ".png":
        layout = Layout(mask_levels(path))
    else:
        raise ValueError(f"{path}: layout must be .json, .csv or .png")
    if summary is not None:
        layout.summary = summary
    return layout


def mask_levels(path: str | Path) -> list[list[Levels]]:
    """Cells of a PNG mask: red channel >= 128 is high tumor, green >= 128 high TIL."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    high = rgb >= 128
    return [[(LEVEL_NAMES[2][int(high[r, c, 0])], LEVEL_NAMES[2][int(high[r, c, 1])])
             for c in range(rgb.shape[1])] for r in range(rgb.shape[0])]


def window_cells(layout: Layout, box: tuple[float, float, float, float],
                 canvas: tuple[int, int], mode: str = "centre") -> list[tuple[Levels, float]]:
    """Cells of a window ``box = (top, left, height, width)`` on a ``(height, width)`` canvas.

    ``centre``: the one cell under the window's centre, weight 1. ``blend``: every cell the
    window overlaps, weighted by the share of the window's area it covers (weights sum to 1).
    """
    rows, cols = layout.shape
    top, left, bh, bw = box
    ch, cw = canvas[0] / rows, canvas[1] / cols
    if mode == "centre":
        r = min(rows - 1, int((top + bh / 2) / ch))
        c = min(cols - 1, int((left + bw / 2) / cw))
        return [(layout.grid[r][c], 1.0)]
    if mode != "blend":
        raise ValueError(f"layout mode must be one of {MODES}, got {mode!r}")
    shares: dict[Levels, float] = {}
    for r in range(int(top // ch), min(rows, math.ceil((top + bh) / ch))):
        dy = min(top + bh, (r + 1) * ch) - max(top, r * ch)
        for c in range(int(left // cw), min(cols, math.ceil((left + bw) / cw))):
            dx = min(left + bw, (c + 1) * cw) - max(left, c * cw)
            if dy > 0 and dx > 0:
                cell = layout.grid[r][c]
                shares[cell] = shares.get(cell, 0.0) + dy * dx / (bh * bw)
    return list(shares.items())


def class_label(levels: Levels) -> int:
    """Class label of a cell's levels."""
    return class_label_from_levels(*levels)


def layout_from_store(store: Any, slide: str, region: Sequence[int]) -> Layout:
    """Levels of a real slide's tiles in a split store over a level-0 ``region = (x, y, w, h)``.

    One cell per tile position (the slide's tile stride, from its coordinates); a cell takes the
    levels of the mean tumor/TIL probabilities of its tiles; cells without tiles (background,
    or probabilities unknown) take the nearest cell's. The summary is the slide's first.
    """
    x0, y0, w, h = (int(v) for v in region)
    if w <= 0 or h <= 0:
        raise ValueError(f"--region {x0} {y0} {w} {h}: width and height must be positive")
    slides = [str(s) for s in store.array("slides")]
    if slide not in slides:
        raise KeyError(f"{store.path}: no slide {slide!r} (has {len(slides)} slides, e.g. "
                       f"{slides[:3]})")
    s = slides.index(slide)
    on_slide = np.flatnonzero(store.array("slide_index") == s)
    coords = store.array("coords")[on_slide]
    step = _stride(coords, f"{store.path} slide {slide}")
    tumor, til = store.array("tumor_prob")[on_slide], store.array("til_prob")[on_slide]
    rows, cols = max(1, math.ceil(h / step)), max(1, math.ceil(w / step))
    sums = np.zeros((rows, cols, 2))
    counts = np.zeros((rows, cols))
    for (x, y), p, q in zip(coords, tumor, til):
        r, c = (int(y) - y0) // step, (int(x) - x0) // step
        if 0 <= r < rows and 0 <= c < cols and np.isfinite(p) and np.isfinite(q):
            sums[r, c] += (p, q)
            counts[r, c] += 1
    if not counts.any():
        raise ValueError(f"{store.path}: slide {slide} has no tile with tumor/TIL probabilities "
                         f"in region x={x0} y={y0} w={w} h={h}")
    known = np.argwhere(counts > 0)
    grid = []
    for r in range(rows):
        row = []
        for c in range(cols):
            kr, kc = known[np.argmin(np.abs(known - (r, c)).sum(axis=1))]
            p, q = sums[kr, kc] / counts[kr, kc]
            row.append((level_name(prob_to_level(p)), level_name(prob_to_level(q))))
        grid.append(row)
    summaries = store.slide_summaries()[s]
    return Layout(grid, summaries[0] if summaries else None)


def _stride(coords: np.ndarray, where: str) -> int:
    """Smallest positive spacing of the tiles' x or y coordinates (the tiling stride)."""
    gaps = [np.diff(np.unique(coords[:, k])) for k in range(2)]
    gaps = [g[g > 0] for g in gaps]
    positive = np.concatenate(gaps) if gaps else np.array([])
    if coords.size == 0 or positive.size == 0:
        raise ValueError(f"{where}: needs tiles at two or more positions to know the stride")
    return int(positive.min())
