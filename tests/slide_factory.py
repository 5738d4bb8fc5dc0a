"""Write small pyramidal TIFF slides that OpenSlide opens, for tiling tests.

OpenSlide detects a *generic-tiff* when the first directory is tiled; further tiled directories
are pyramid levels only if their NewSubfileType has the reduced-image bit (``subfiletype=1``).
Its microns per pixel come from XResolution with ResolutionUnit centimeter. It detects an
*aperio* (SVS) slide when the first directory is tiled and its ImageDescription starts with
``Aperio``; ``|AppMag = M|MPP = X`` fields give objective power and mpp, and every tiled
directory is a level. tifffile must write the description as the first ImageDescription tag
(``metadata=None``, or it writes its own JSON one first). Tiles are zlib-compressed (lossless,
no imagecodecs needed), so the only JPEG loss in the tests is the tiler's own.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

PINK = np.array([232, 150, 196], dtype=np.float64)
PURPLE = np.array([110, 60, 160], dtype=np.float64)
WHITE = np.array([245, 245, 245], dtype=np.float64)


def _smooth_field(h: int, w: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: bicubic upsampling of a coarse random grid."""
    coarse = rng.random((cells, max(2, cells * w // max(h, 1))))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


def tissue_image(height: int, width: int, seed: int = 0, tissue_fraction_x: float = 1.0,
                 cells: int = 8) -> np.ndarray:
    """Smooth H&E-like RGB image: pink/purple tissue left of ``tissue_fraction_x``, white after."""
    rng = np.random.default_rng(seed)
    mix = _smooth_field(height, width, rng, cells)[..., None]
    shade = 0.85 + 0.15 * _smooth_field(height, width, rng, cells * 2)[..., None]
    tissue = (PINK * (1 - mix) + PURPLE * mix) * shade
    img = np.broadcast_to(WHITE, tissue.shape).copy()
    cut = int(round(width * tissue_fraction_x))
    img[:, :cut] = tissue[:, :cut]
    return np.clip(img, 0, 255).astype(np.uint8)


def pyramid(img: np.ndarray, factors: Sequence[int]) -> list[np.ndarray]:
    """Levels of ``img`` downsampled by integer ``factors`` (block mean); factor 1 is ``img``."""
    out = []
    for f in factors:
        h, w = img.shape[0] // f * f, img.shape[1] // f * f
        block = img[:h, :w].reshape(h // f, f, w // f, f, 3).astype(np.float64).mean(axis=(1, 3))
        out.append(np.round(block).astype(np.uint8))
    return out


def write_generic_tiff(path: str | Path, img: np.ndarray, factors: Sequence[int] = (1, 2, 4),
                       mpp: float | None = None, tile: int = 128) -> Path:
    """A generic-tiff pyramid; ``mpp`` (level 0) is stored as resolution tags when given."""
    path = Path(path)
    levels = pyramid(img, factors)
    with tifffile.TiffWriter(path) as tw:
        for i, (f, lvl) in enumerate(zip(factors, levels)):
            kwargs = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * f)
                kwargs = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(lvl, tile=(tile, tile), compression="zlib", photometric="rgb",
                     subfiletype=0 if i == 0 else 1, metadata=None, **kwargs)
    return path


def write_svs(path: str | Path, img: np.ndarray, factors: Sequence[int] = (1, 4),
              app_mag: float | None = 40, mpp: float | None = 0.25, tile: int = 128) -> Path:
    """An Aperio-style SVS pyramid with ``AppMag``/``MPP`` in the first description."""
    path = Path(path)
    levels = pyramid(img, factors)
    h, w = img.shape[:2]
    fields = "".join(f"|{k} = {v}" for k, v in (("AppMag", app_mag), ("MPP", mpp)) if v)
    with tifffile.TiffWriter(path) as tw:
        for i, lvl in enumerate(levels):
            head = (f"Aperio Image Library vTEST\n{w}x{h} ({tile}x{tile}) RGB" if i == 0 else
                    f"Aperio Image Library vTEST\n{w}x{h} -> {lvl.shape[1]}x{lvl.shape[0]} RGB")
            desc = head + (fields if i == 0 else "")
            tw.write(lvl, tile=(tile, tile), compression="zlib", photometric="rgb",
                     description=desc, metadata=None)
    return path
