"""Blinded real-vs-synthetic reader study: a seeded, balanced plan and key-free image serving.

Real images come from a split store, synthetic ones from a folder written by
``scripts/sample.py`` (its ``metadata.json`` gives each image's tumor/TIL levels). Every item
gets an opaque random id; the browser only ever sees that id and a re-encoded PNG of the same
size and format for both sources, so nothing but the pixels tells them apart.
"""
from __future__ import annotations

import io
import json
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.captions import level_name, prob_to_level
from ldm.evaluation.images import SplitStore, list_image_files
from pathldm_app.stats import study_statistics
from pathldm_app.storage import Database

ALL = "all"


def stratum_name(tumor: str, til: str) -> str:
    """``"high tumor / low til"``."""
    return f"{tumor} tumor / {til} til"


@dataclass(frozen=True)
class StudyConfig:
    """What defines a study (a database holds one)."""

    store: Path
    generated: Path
    n: int = 20
    seed: int = 0
    stratify: bool = False

    def key(self) -> str:
        """Canonical JSON of the settings, stored with the plan."""
        return json.dumps({"store": str(self.store.resolve()),
                           "generated": str(self.generated.resolve()), "n": self.n,
                           "seed": self.seed, "stratify": self.stratify}, sort_keys=True)


def real_strata(store: SplitStore) -> list[str]:
    """Tumor/TIL stratum of every patch of a split store."""
    tumor, til = store.array("tumor_prob"), store.array("til_prob")
    return [stratum_name(level_name(prob_to_level(a)), level_name(prob_to_level(b)))
            for a, b in zip(tumor, til)]


def synthetic_strata(folder: Path, files: list[Path]) -> list[str | None]:
    """Stratum of every generated image from the folder's ``metadata.json`` (None: unknown)."""
    levels: dict[str, tuple[str, str]] = {}
    meta_path = folder / "metadata.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from e
        for rec in meta.get("images", []) if isinstance(meta, dict) else []:
            if "tumor" in rec and "til" in rec:
                levels[str(rec.get("file"))] = (rec["tumor"], rec["til"])
    return [stratum_name(*levels[f.name]) if f.name in levels else None for f in files]


def _pick(pool: list[int], k: int, rng: np.random.Generator) -> list[int]:
    return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]


def build_plan(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Balanced items (as many real as synthetic per stratum), in a seeded random order."""
    if cfg.n < 1:
        raise ValueError(f"study size per class must be >= 1, got {cfg.n}")
    store = SplitStore(cfg.store)
    files = list_image_files(cfg.generated)
    if not files:
        raise ValueError(f"{cfg.generated}: no generated images for the reader study")
    rs, ss = real_strata(store), synthetic_strata(cfg.generated, files)
    if cfg.stratify:
        unknown = [f.name for f, s in zip(files, ss) if s is None]
        if unknown:
            raise ValueError(f"{cfg.generated}/metadata.json gives no tumor/TIL levels for "
                             f"{unknown[0]} ({len(unknown)} images); stratification needs them")
    else:
        rs, ss = [ALL] * len(rs), [ALL] * len(ss)
    rng = np.random.default_rng(cfg.seed)
    items = []
    for stratum in sorted(set(rs) & set(ss)):
        real = [i for i, s in enumerate(rs) if s == stratum]
        synth = [i for i, s in enumerate(ss) if s == stratum]
        k = min(cfg.n, len(real), len(synth))
        items += [{"source": "real", "ref": str(i), "stratum": stratum}
                  for i in _pick(real, k, rng)]
        items += [{"source": "synthetic", "ref": files[i].name, "stratum": stratum}
                  for i in _pick(synth, k, rng)]
    if not items:
        raise ValueError(f"no stratum has both real ({cfg.store}) and synthetic "
                         f"({cfg.generated}) images")
    order = rng.permutation(len(items))
    return [{**items[j], "position": p, "item": secrets.token_urlsafe(12)}
            for p, j in enumerate(order)]


def study_report(db: Database) -> dict[str, Any]:
    """The exported statistics: metrics and agreement, with the settings answers were given in."""
    return {"items": len(db.study_items()), "positive_class": "synthetic",
            "settings": db.answer_settings(), **study_statistics(db.answers())}


def reader_order(n_items: int, seed: int, reader: str) -> list[int]:
    """The order (item positions) in which ``reader`` sees the items; fixed per reader name."""
    rng = np.random.default_rng([seed, zlib.crc32(reader.encode("utf-8"))])
    return [int(p) for p in rng.permutation(n_items)]


class ImageSource:
    """Renders study items as PNG bytes of one common square size."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.store = SplitStore(cfg.store)
        self.folder = cfg.generated
        files = list_image_files(cfg.generated)
        with Image.open(files[0]) as im:
            self.size = min(im.size)

    def load(self, item: dict[str, Any]) -> Image.Image:
        """The item's image as RGB (before normalisation)."""
        if item["source"] == "real":
            return self.store.image(int(item["ref"]))
        path = self.folder / item["ref"]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read generated image {path}: {e}") from e

    def png(self, item: dict[str, Any]) -> bytes:
        """Centre-cropped, resized to the study size, re-encoded without metadata."""
        img = self.load(item)
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != self.size:
            img = img.resize((self.size, self.size), Image.BICUBIC)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="PNG")
        return buf.getvalue()
