"""HDF5 stores of JPEG tiles (docs/data_format.md): encoding, writing and reading."""
from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from data_prep.common import atomic_output

logger = logging.getLogger(__name__)

TILE_STORE_VERSION = 1
DATASET_STORE_VERSION = 1
VLEN_UINT8 = h5py.vlen_dtype(np.dtype("uint8"))
STR_DTYPE = h5py.string_dtype("utf-8")
TILE_STORE_REQUIRED = ("tiles", "coords", "tissue")


def encode_jpeg(image: Image.Image | np.ndarray, quality: int = 90) -> np.ndarray:
    """JPEG-encode an RGB image into a flat uint8 array (one vlen row)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def decode_jpeg(data: np.ndarray | bytes) -> np.ndarray:
    """Decode one stored tile into an ``(H, W, 3)`` uint8 array."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("RGB"))


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
        return {k: _plain(v) for k, v in f.attrs.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8")
    return v


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
    n = len(images)
    k = max([1, *(len(s) for s in summaries)])
    table = np.array([[*s, *[""] * (k - len(s))] for s in summaries], dtype=object).reshape(-1, k)
    coords = np.full((n, 2), -1, dtype=np.int64) if coords is None else coords
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("images", shape=(n,), dtype=VLEN_UINT8)
        for i, row in enumerate(images):
            ds[i] = row
        f.create_dataset("slide_index", data=np.asarray(slide_index, dtype=np.int32).reshape(n))
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(n, 2))
        f.create_dataset("tumor_prob", data=np.asarray(tumor_prob, dtype=np.float32).reshape(n))
        f.create_dataset("til_prob", data=np.asarray(til_prob, dtype=np.float32).reshape(n))
        f.create_dataset("slides", data=np.array(list(slides), dtype=object), dtype=STR_DTYPE)
        f.create_dataset("summaries", data=table, dtype=STR_DTYPE)
        f.create_dataset("n_summaries", data=np.array([len(s) for s in summaries], np.int32))
        for name, values in (extra or {}).items():
            values = np.asarray(values)
            if values.dtype.kind in "OUS":
                f.create_dataset(name, data=values.astype(object), dtype=STR_DTYPE)
            else:
                f.create_dataset(name, data=values)
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["format_version"] = DATASET_STORE_VERSION
