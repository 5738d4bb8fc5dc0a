"""Image sets for evaluation: names, pixels, captions, tumor/TIL levels, format and content hash.

A set is a split store (``.h5``), a folder of generated images (``scripts/sample.py`` with its
``metadata.json``, ``scripts/fid.py generate`` with its ``samples.jsonl``, or bare images), or
a folder of generated store parts (``part-*.h5`` of ``scripts/fid.py generate --format store``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.captions import build_caption, level_name, levels_from_caption, prob_to_level
from ldm.evaluation.images import (
    PilTransform,
    SplitStore,
    is_store,
    list_image_files,
)

logger = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """``n`` images with per-image metadata; :meth:`load` gives image ``i`` (transformed)."""

    path: Path
    kind: str  # "store", "folder" or "store-parts"
    names: list[str]
    captions: list[str | None]
    levels: list[tuple[str, str] | None]  # (tumor, til) level names
    formats: list[str]  # encoded format per image: PNG, JPEG, ...
    _loaders: list[tuple[Any, Any]] = field(repr=False, default_factory=list)
    transform: PilTransform | None = None

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as RGB, after the protocol's crop/resize."""
        source, item = self._loaders[i]
        if isinstance(source, SplitStore):
            img = source.image(int(item))
        else:
            try:
                img = Image.open(item).convert("RGB")
            except Exception as e:
                raise ValueError(f"cannot read image {item}: {e}") from e
        return img if self.transform is None else self.transform(img)

    def subset(self, indices: np.ndarray) -> ImageSet:
        """The images at ``indices`` (order kept)."""
        pick = [int(i) for i in indices]
        return ImageSet(self.path, self.kind, [self.names[i] for i in pick],
                        [self.captions[i] for i in pick], [self.levels[i] for i in pick],
                        [self.formats[i] for i in pick], [self._loaders[i] for i in pick],
                        self.transform)

    def content_hash(self) -> str:
        """SHA-256 of the source files' bytes (the store files, or every image file)."""
        from ldm.evaluation.protocol import files_sha256

        return files_sha256([Path(s.path) if isinstance(s, SplitStore) else Path(item)
                             for s, item in self._loaders])

    def format_counts(self) -> dict[str, int]:
        """How many images of each encoded format."""
        out: dict[str, int] = {}
        for f in self.formats:
            out[f] = out.get(f, 0) + 1
        return out


def _file_format(path: Path) -> str:
    """The encoded format of an image file from its header (not its extension)."""
    try:
        with Image.open(path) as img:
            return str(img.format or "unknown")
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _store_rows(store: SplitStore, captions: list[str] | None, seed: int) -> dict[str, list]:
    """Names, captions, levels and formats of a split store's rows."""
    n = len(store)
    tumor, til = store.array("tumor_prob"), store.array("til_prob")
    if captions is None:
        summaries = store.slide_summaries()
        slide = store.array("slide_index")
        rng = np.random.default_rng(seed)
        captions = []
        for i in range(n):
            options = summaries[int(slide[i])] or [""]
            known = not (np.isnan(tumor[i]) or np.isnan(til[i]))
            captions.append(build_caption(tumor[i], til[i], options[rng.integers(len(options))])
                            if known else None)
    levels = [None if np.isnan(a) or np.isnan(b) else
              (level_name(prob_to_level(a)), level_name(prob_to_level(b)))
              for a, b in zip(tumor, til)]
    formats = ["JPEG"] * n  # split stores keep JPEG rows (ldm.data.store)
    return {"names": [f"{store.path.name}[{i}]" for i in range(n)], "captions": list(captions),
            "levels": levels, "formats": formats, "loaders": [(store, i) for i in range(n)]}


def _folder_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Per-file records of a generated folder: samples.jsonl or metadata.json, else none."""
    jsonl = folder / "samples.jsonl"
    if jsonl.is_file():
        return {r["file"]: r for r in map(json.loads, jsonl.read_text().splitlines()) if r}
    meta = folder / "metadata.json"
    if meta.is_file():
        images = json.loads(meta.read_text()).get("images", [])
        return {r["file"]: {**r, "caption": r.get("caption", r.get("prompt"))} for r in images
                if isinstance(r, dict) and "file" in r}
    return {}


def _folder_rows(folder: Path) -> dict[str, list]:
    files = list_image_files(folder)
    records = _folder_records(folder)
    captions, levels = [], []
    for f in files:
        r = records.get(f.name, {})
        caption = r.get("caption")
        lv = (r["tumor"], r["til"]) if "tumor" in r and "til" in r else (
            levels_from_caption(caption) if isinstance(caption, str) else None)
        captions.append(caption if isinstance(caption, str) else None)
        levels.append(lv)
    return {"names": [f.name for f in files], "captions": captions, "levels": levels,
            "formats": [_file_format(f) for f in files], "loaders": [(None, f) for f in files]}


def open_image_set(path: str | Path, n: int | None = None, seed: int = 0,
                   transform: PilTransform | None = None) -> ImageSet:
    """The images of ``path``; ``n`` draws a seeded random subset (kept in order)."""
    path = Path(path)
    if is_store(path):
        kind, stores = "store", [SplitStore(path)]
    elif path.is_dir() and sorted(path.glob("part-*.h5")):
        kind, stores = "store-parts", [SplitStore(p) for p in sorted(path.glob("part-*.h5"))]
    elif path.is_dir():
        kind, stores = "folder", []
    else:
        raise FileNotFoundError(f"{path}: neither an image folder, a split store (.h5) nor a "
                                "folder of generated store parts (part-*.h5)")
    if stores:
        rows: dict[str, list] = {"names": [], "captions": [], "levels": [], "formats": [],
                                 "loaders": []}
        for s in stores:
            caps = list(s.array("caption")) if kind == "store-parts" else None
            for key, values in _store_rows(s, caps, seed).items():
                rows[key] += values
    else:
        rows = _folder_rows(path)
    if not rows["names"]:
        raise ValueError(f"{path}: no images found")
    images = ImageSet(path, kind, rows["names"], rows["captions"], rows["levels"],
                      rows["formats"], rows["loaders"], transform)
    if n is not None and n < len(images):
        rng = np.random.default_rng(seed)
        images = images.subset(np.sort(rng.choice(len(images), size=n, replace=False)))
    elif n is not None and n > len(images):
        logger.warning("%s has %d images, fewer than the %d requested; using all", path,
                       len(images), n)
    return images
