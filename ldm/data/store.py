"""The training store schema (docs/data_format.md §3), written once for its writers and readers.

A split store (``train.h5``/``test.h5`` of ``data_prep/build_dataset.py``, the generated stores
of ``scripts/fid.py``) holds JPEG tiles as vlen ``uint8`` rows, per-row ``slide_index``,
``coords``, ``tumor_prob``/``til_prob``, and per-slide ``slides``, ``summaries`` (padded with
``""``) and ``n_summaries``. This module owns those names and dtypes, the JPEG row codec, the
per-process lazy HDF5 handle that DataLoader workers reopen, and the cached-latents store
(``ldm/data/latents.py``) that training reads next to a split store.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

FORMAT_VERSION = 1
VLEN_UINT8 = h5py.vlen_dtype(np.dtype("uint8"))  # one JPEG file per row
STR_DTYPE = h5py.string_dtype("utf-8")

IMAGES = "images"
PROBABILITIES = ("tumor_prob", "til_prob")
# per-row datasets: dtype and the shape of one row
ROW_DATASETS: dict[str, tuple[Any, tuple[int, ...]]] = {
    IMAGES: (VLEN_UINT8, ()),
    "slide_index": (np.int32, ()),
    "coords": (np.int64, (2,)),
    "tumor_prob": (np.float32, ()),
    "til_prob": (np.float32, ()),
}
SLIDE_DATASETS = ("slides", "summaries", "n_summaries")
# what a reader needs; stores written before ``coords`` existed lack only that one
REQUIRED_DATASETS = (IMAGES, "slide_index", *PROBABILITIES, *SLIDE_DATASETS)

# the cached first-stage latents of a split store (ldm/data/latents.py)
LATENTS = "latents"
LATENTS_FORMAT_VERSION = 2  # 1 held a KL posterior's mode, 2 its mean and log-variance


def encode_jpeg(image: Image.Image | np.ndarray, quality: int = 90) -> np.ndarray:
    """JPEG-encode an RGB image into a flat uint8 array (one vlen row)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def open_jpeg(data: np.ndarray | bytes) -> Image.Image:
    """One stored row as a lazily decoded PIL image (its header gives the size for free)."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    return Image.open(io.BytesIO(raw))


def decode_jpeg(data: np.ndarray | bytes) -> np.ndarray:
    """Decode one stored row into an ``(H, W, 3)`` uint8 array."""
    with open_jpeg(data) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------- writing
def create_row_datasets(f: h5py.File, n: int | None = None) -> dict[str, h5py.Dataset]:
    """The per-row datasets of a split store: ``n`` rows, or empty and resizable (``None``).

    Resizable ones are filled with :func:`append_rows` as slides stream in.
    """
    out = {}
    for name, (dtype, row) in ROW_DATASETS.items():
        if n is not None:
            out[name] = f.create_dataset(name, (n, *row), dtype=dtype)
            continue
        chunk = 256 if name == IMAGES else 4096
        out[name] = f.create_dataset(name, (0, *row), maxshape=(None, *row), dtype=dtype,
                                     chunks=(chunk, *row))
    return out


def append_rows(datasets: Mapping[str, h5py.Dataset], rows: Mapping[str, np.ndarray]) -> None:
    """Append the same number of rows to each named resizable dataset."""
    for name, values in rows.items():
        ds = datasets[name]
        n0 = ds.shape[0]
        ds.resize(n0 + len(values), axis=0)
        ds[n0:] = values


def write_rows(f: h5py.File, images: Sequence[np.ndarray], slide_index: Sequence[int],
               tumor_prob: Sequence[float], til_prob: Sequence[float],
               coords: np.ndarray | None = None) -> None:
    """All per-row datasets in one go; ``coords`` default to -1 (no source slide position)."""
    n = len(images)
    ds = create_row_datasets(f, n)
    for i, row in enumerate(images):
        ds[IMAGES][i] = row
    ds["slide_index"][...] = np.asarray(slide_index, dtype=np.int32).reshape(n)
    ds["coords"][...] = (np.full((n, 2), -1, np.int64) if coords is None
                         else np.asarray(coords, dtype=np.int64).reshape(n, 2))
    ds["tumor_prob"][...] = np.asarray(tumor_prob, dtype=np.float32).reshape(n)
    ds["til_prob"][...] = np.asarray(til_prob, dtype=np.float32).reshape(n)


def write_slide_table(f: h5py.File, slides: Sequence[str], summaries: Sequence[Sequence[str]],
                      k: int | None = None) -> None:
    """``slides``, ``summaries`` (``""``-padded to ``k`` columns, at least 1), ``n_summaries``."""
    k = max([1, k or 0, *(len(s) for s in summaries)])
    table = np.full((len(summaries), k), "", dtype=object)
    for i, s in enumerate(summaries):
        table[i, : len(s)] = list(s)
    f.create_dataset("slides", data=np.array(list(slides), dtype=object), dtype=STR_DTYPE)
    f.create_dataset("summaries", data=table, dtype=STR_DTYPE)
    f.create_dataset("n_summaries", data=np.array([len(s) for s in summaries], dtype=np.int32))


def write_extra(f: h5py.File, name: str, values: np.ndarray | Sequence[Any]) -> None:
    """A further per-row dataset (generated stores); strings are stored as utf-8."""
    values = np.asarray(values)
    if values.dtype.kind in "OUS":
        f.create_dataset(name, data=values.astype(object), dtype=STR_DTYPE)
    else:
        f.create_dataset(name, data=values)


def write_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    """Store attributes, and the format version of this schema."""
    f.attrs.update(dict(attrs))
    f.attrs["format_version"] = FORMAT_VERSION


# ---------------------------------------------------------------------------------- reading
def missing_datasets(f: h5py.File) -> list[str]:
    """Required datasets that ``f`` lacks (empty for a split store)."""
    return [k for k in REQUIRED_DATASETS if k not in f]


def not_a_store(path: str | Path, missing: Sequence[str]) -> str:
    """The one-line message for a file that is not a split store."""
    return f"{path} is not a training store (docs/data_format.md §3): missing datasets {missing}"


def read_array(f: h5py.File, name: str) -> np.ndarray:
    """A whole dataset as a numpy array; strings decoded as utf-8."""
    ds = f[name]
    return ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) is not None else ds[()]


def read_slide_summaries(f: h5py.File) -> list[list[str]]:
    """The real (non-padding) summaries of every slide."""
    counts = f["n_summaries"][()].astype(np.int64)
    table = np.asarray(read_array(f, "summaries"), dtype=object)
    if table.ndim != 2:  # a store written with one summary column as a vector
        table = table.reshape(len(counts), -1 if len(counts) else 1)
    return [[str(s) for s in table[i, : int(counts[i])]] for i in range(len(counts))]


def plain(value: Any) -> Any:
    """An HDF5 attribute value as a JSON-friendly Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_attrs(f: h5py.File) -> dict[str, Any]:
    """Attributes of an open store as plain Python values."""
    return {k: plain(v) for k, v in f.attrs.items()}


def source_id(f: h5py.File) -> str:
    """What cached latents record as their source: the build signature, else the row count."""
    return str(f.attrs.get("signature", "")) or f"{len(f[IMAGES])} images"


def store_problem(path: str | Path, split: str = "train") -> str | None:
    """Why ``path`` cannot serve as a ``split`` store (None when it can): cheap, metadata only."""
    try:
        with h5py.File(path, "r") as f:
            missing = missing_datasets(f)
            n = len(f[IMAGES]) if IMAGES in f else 0
    except OSError as e:
        return f"{path} is not a readable HDF5 store: {' '.join(str(e).split())}"
    if missing:
        return not_a_store(path, missing)
    if n == 0:
        return (f"{path} is an empty store (0 patches): nothing to {split} on; rebuild it with "
                "python -m data_prep.build_dataset")
    return None


class LazyFile:
    """A read-only HDF5 handle opened on first use in each process.

    Pickling keeps only the path, so a dataset holding one can go to DataLoader workers (forked
    or spawned): each worker opens its own handle, as HDF5 handles must not be shared.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def get(self) -> h5py.File:
        """The handle of this process."""
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    @property
    def is_open(self) -> bool:
        """Whether this process has opened its handle."""
        return self._file is not None and self._pid == os.getpid()

    def __getitem__(self, name: str) -> h5py.Dataset:
        return self.get()[name]

    def close(self) -> None:
        """Close the handle of this process."""
        if self.is_open:
            self._file.close()
        self._file = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None, "_pid": None}


# ---------------------------------------------------------------------------------- latents
def create_latents(f: h5py.File, shape: tuple[int, ...], source: str, image_size: int) -> None:
    """The ``latents`` ``(N, V, C, h, w)`` float16 dataset of a new cache and its attributes."""
    f.create_dataset(LATENTS, shape=shape, dtype=np.float16, chunks=(1, *shape[1:]))
    f.attrs.update({"n_done": 0, "source": source, "image_size": image_size,
                    "n_variants": shape[1], "format_version": LATENTS_FORMAT_VERSION})


def read_latents_info(path: str | Path) -> tuple[tuple[int, ...], int, str]:
    """``(shape, image_size, source)`` of a cached-latents store."""
    with h5py.File(path, "r") as f:
        if LATENTS not in f:
            raise KeyError(f"{path}: no {LATENTS!r} dataset")
        return (tuple(f[LATENTS].shape), int(f.attrs.get("image_size", 0)),
                str(f.attrs.get("source", "")))
