"""Per-slide tile stores (docs/data_format.md §1) and the split-store writer of §3.

The split-store schema and the JPEG row codec are owned by :mod:`ldm.data.store` (re-exported
here for the pipeline stages); this module adds atomic writes on top.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from data_prep.common import atomic_output
from ldm.data.store import (  # noqa: F401  (the JPEG codec, re-exported for the stages)
    VLEN_UINT8,
    decode_jpeg,
    encode_jpeg,
    plain,
    write_attrs,
    write_extra,
    write_rows,
    write_slide_table,
)

logger = logging.getLogger(__name__)

TILE_STORE_VERSION = 1
TILE_STORE_REQUIRED = ("tiles", "coords", "tissue")


def write_tile_store(path: str | Path, tiles: Sequence[np.ndarray], coords: np.ndarray,
                     tissue: np.ndarray, attrs: Mapping[str, Any],
                     extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Write a per-slide tile store atomically (``NAME.tmp`` then rename).

    ``extra``: further per-tile float32 datasets (e.g. ``edge_score``), one value per tile.
    """
    n = len(tiles)
    coords = np.asarray(coords, dtype=np.int64).reshape(n, 2)
    tissue = np.asarray(tissue, dtype=np.float32).reshape(n)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("tiles", shape=(n,), dtype=VLEN_UINT8)
        for i, t in enumerate(tiles):
            ds[i] = t
        f.create_dataset("coords", data=coords)
        f.create_dataset("tissue", data=tissue)
        for name, values in (extra or {}).items():
            f.create_dataset(name, data=np.asarray(values, dtype=np.float32).reshape(n))
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["format_version"] = TILE_STORE_VERSION


def is_complete_tile_store(path: str | Path) -> bool:
    """True when ``path`` is a readable tile store with all required datasets."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if "format_version" not in f.attrs:
                return False
            return all(k in f for k in TILE_STORE_REQUIRED)
    except OSError:
        return False


def read_store_attrs(path: str | Path) -> dict[str, Any]:
    """Attributes of an HDF5 store as plain Python values."""
    with h5py.File(path, "r") as f:
        return {k: plain(v) for k, v in f.attrs.items()}


def read_tiles(path: str | Path, indices: np.ndarray | None = None) -> list[np.ndarray]:
    """Decode tiles of a per-slide store (all, or the given sorted indices)."""
    with h5py.File(path, "r") as f:
        ds = f["tiles"]
        idx = range(len(ds)) if indices is None else indices
        return [decode_jpeg(ds[int(i)]) for i in idx]


def update_store_atomic(path: str | Path, datasets: Mapping[str, np.ndarray],
                        attrs: Mapping[str, Any]) -> None:
    """Add or replace datasets and attributes of a store via a copy renamed over it.

    A crash never leaves a half-written original: the copy is edited, then renamed.
    """
    path = Path(path)
    with atomic_output(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            for name, data in datasets.items():
                if name in f:
                    del f[name]
                f.create_dataset(name, data=data)
            for k, v in attrs.items():
                f.attrs[k] = v


def write_split_store(path: str | Path, images: Sequence[np.ndarray], slide_index: np.ndarray,
                      tumor_prob: np.ndarray, til_prob: np.ndarray, slides: Sequence[str],
                      summaries: Sequence[Sequence[str]], attrs: Mapping[str, Any],
                      coords: np.ndarray | None = None,
                      extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Write a split store (docs/data_format.md §3) in one go, atomically.

    ``images`` are encoded rows (``encode_jpeg``); ``coords`` default to -1 (no source slide
    position); ``extra`` adds per-row datasets (string arrays are stored as utf-8).
    """
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        write_rows(f, images, slide_index, tumor_prob, til_prob, coords)
        write_slide_table(f, slides, summaries)
        for name, values in (extra or {}).items():
            write_extra(f, name, values)
        write_attrs(f, attrs)
