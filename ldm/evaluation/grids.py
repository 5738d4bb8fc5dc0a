"""Labelled image grids: one row per condition, a label left of each row, a title on top.

Figures 3 and 4 of the paper show generated patches of the four tumor/TIL combinations for one
report summary; :func:`labelled_grid` draws such a figure from uint8 tiles.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm.evaluation.images import make_labelled_grid

LINE_HEIGHT = 14  # pixels per text line of PIL's default bitmap font, with spacing
CHAR_WIDTH = 6


def labelled_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                  title: str | None = None, pad: int = 2) -> np.ndarray:
    """uint8 ``(H, W, 3)`` figure: each row of tiles with its label at the left, ``title`` on top.

    Rows must have the same number of equally sized ``(h, w, 3)`` uint8 tiles; the rows are
    drawn by :func:`ldm.evaluation.images.make_labelled_grid` with a margin fitted to the
    labels, and the title is wrapped to the figure's width.
    """
    if not rows or len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows for {len(row_labels)} labels")
    ncol = len(rows[0])
    if ncol == 0 or any(len(r) != ncol for r in rows):
        raise ValueError("every row needs the same, non-zero number of images")
    label_w = CHAR_WIDTH * max(len(s) for s in row_labels) + 3 * pad
    body = make_labelled_grid(list(zip(row_labels, rows)), pad=pad, label_width=label_w)
    width = body.shape[1]
    title_lines = textwrap.wrap(title, max(20, (width - 2 * pad) // CHAR_WIDTH)) if title else []
    if not title_lines:
        return body
    top = LINE_HEIGHT * len(title_lines) + 2 * pad
    canvas = Image.new("RGB", (width, top + body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (0, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * LINE_HEIGHT), line, fill="black", font=font)
    return np.asarray(canvas)
