"""What a rerun of the tiler keeps: slide ids, the settings a store shares with a run, and
whether its slide file changed since it was tiled (``data_prep/tile_wsi.py``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.common import file_fingerprint
from data_prep.hdf5io import is_complete_tile_store, read_store_attrs

if TYPE_CHECKING:
    from data_prep.tile_wsi import TileConfig

# store attribute -> TileConfig field: the settings a store must share with a run to be kept
SETTING_ATTRS = {"magnification": "magnification", "tile_size": "tile_size", "stride": "step",
                 "min_tissue": "min_tissue", "jpeg_quality": "jpeg_quality",
                 "tissue_filter": "tissue_filter", "edge_threshold": "edge_threshold"}
# what a store written before a setting existed was tiled with
SETTING_BEFORE = {"tissue_filter": "otsu"}


def slide_id_of(path: Path) -> str:
    """Slide id: the file name without its last extension."""
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def source_changed(store: Path, path: Path) -> str | None:
    """Why ``store`` no longer matches the slide file ``path`` (None: it matches)."""
    try:
        stored = read_store_attrs(store).get("source_fingerprint")
        now = file_fingerprint(path)
    except OSError:
        return None  # the slide is unreadable: tiling it again would only fail
    if stored is not None and stored != now:
        return f"its slide file {path.name} changed since it was tiled"
    return None


def _differs(stored, now) -> bool:
    """Whether a stored setting differs from a run's (names exactly, numbers within rounding)."""
    if isinstance(now, str) or isinstance(stored, str):
        return str(stored) != str(now)
    return not math.isclose(float(stored), float(now))


def settings_conflicts(paths: list[Path], out_dir: Path, cfg: TileConfig) -> list[str]:
    """Existing stores of ``paths`` tiled with other settings, one description each."""
    conflicts = []
    for p in paths:
        store = out_dir / f"{slide_id_of(p)}.h5"
        if not is_complete_tile_store(store):
            continue
        attrs = {**SETTING_BEFORE, **read_store_attrs(store)}
        diffs = [f"{a} {attrs[a]} (now {getattr(cfg, f)})" for a, f in SETTING_ATTRS.items()
                 if a in attrs and _differs(attrs[a], getattr(cfg, f))]
        if diffs:
            conflicts.append(f"{store.name}: " + ", ".join(diffs))
    return conflicts
