"""Tiled pyramidal BigTIFF with an Aperio (SVS) description, so OpenSlide opens it as a slide.

OpenSlide reads a TIFF as an Aperio slide when the first directory is tiled and its
ImageDescription starts with ``Aperio``; every further tiled directory is a pyramid level, and
the ``|MPP = x|AppMag = m`` fields give ``openslide.mpp-x/y`` and the objective power. Tiles are
zlib-compressed (lossless, no extra codec). tifffile comes with the ``[large]`` extra.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ldm.optional import require

TILE = 256


def mpp_of_magnification(magnification: float) -> float:
    """Microns per pixel by the usual convention (40x: 0.25, 20x: 0.5, 10x: 1.0)."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return 10.0 / magnification


def pyramid_levels(image: np.ndarray, tile: int = TILE) -> list[np.ndarray]:
    """``image`` and its 2x box-filtered reductions until both sides fit in one tile."""
    from PIL import Image

    levels = [image]
    while max(levels[-1].shape[:2]) > tile:
        img = Image.fromarray(levels[-1])
        levels.append(np.asarray(img.reduce(2)))
    return levels


def svs_description(width: int, height: int, tile: int, mpp: float, magnification: float,
                    extra: dict[str, Any] | None = None) -> str:
    """An Aperio-style ImageDescription: header line, then ``|key = value`` fields."""
    fields = {"AppMag": f"{magnification:g}", "MPP": f"{mpp:g}", **(extra or {})}
    head = f"Aperio Image Library (PathLDM)\r\n{width}x{height} ({tile}x{tile}) RGB"
    return head + "".join(f"|{k} = {v}" for k, v in fields.items())


def write_pyramid_tiff(path: str | Path, image: np.ndarray, mpp: float, magnification: float,
                       tile: int = TILE, extra: dict[str, Any] | None = None
                       ) -> list[tuple[int, int]]:
    """Write uint8 RGB ``image`` as a tiled pyramidal BigTIFF; returns each level's (w, h).

    Written to a temporary name and renamed, so a killed run leaves no partial slide.
    """
    tifffile = require("tifffile", "large", "writing pyramidal TIFF slides")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    levels = pyramid_levels(image, tile)
    h, w = image.shape[:2]
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, lvl in enumerate(levels):
            desc = (svs_description(w, h, tile, mpp, magnification, extra) if i == 0 else
                    f"Aperio Image Library (PathLDM)\r\n{w}x{h} -> "
                    f"{lvl.shape[1]}x{lvl.shape[0]} RGB")
            tw.write(np.ascontiguousarray(lvl), tile=(tile, tile), compression="zlib",
                     photometric="rgb", description=desc, metadata=None,
                     subfiletype=0 if i == 0 else 1)
    os.replace(tmp, path)
    return [(lvl.shape[1], lvl.shape[0]) for lvl in levels]
