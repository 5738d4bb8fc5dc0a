"""The train/test split of ``build_dataset``: a stable seeded hash per patient, or a split file.

The dataclasses it reads (slides with a ``slide_id``; a config with ``seed``, ``test_fraction``,
``group_by``, ``id_chars`` and ``split_file``) belong to :mod:`data_prep.build_dataset`.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.common import read_csv_table

logger = logging.getLogger(__name__)
SPLITS = ("train", "test")


def read_csv_columns(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """Rows of ``path`` restricted to ``columns``, values stripped."""
    return [{c: row[c].strip() for c in columns} for row in read_csv_table(path, columns)]


def _group_fn(cfg: Any) -> Callable[[str], str]:
    """Slide id -> split group (the patient barcode, or the slide itself)."""
    if cfg.group_by != "patient":
        return lambda sid: sid
    return (lambda sid: sid[: cfg.id_chars]) if cfg.id_chars > 0 else (lambda sid: sid)


def hashed_side(group: str, seed: int, test_fraction: float) -> str:
    """``"test"`` when the seeded hash of ``group`` falls below ``test_fraction``.

    Each group's side depends on the seed and its own id only, so adding or removing other
    groups never moves it.
    """
    digest = hashlib.sha256(f"{seed}\0{group}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2.0 ** 64 < test_fraction else "train"


def assign_splits(slides: list[Any], cfg: Any) -> dict[str, str]:
    """``slide_id -> "train"|"test"`` from the split file or a seeded hash per group."""
    group = _group_fn(cfg)
    if cfg.split_file:
        return _split_from_file(Path(cfg.split_file), slides, group, cfg.group_by == "patient")
    out = {s.slide_id: hashed_side(group(s.slide_id), cfg.seed, cfg.test_fraction)
           for s in slides}
    if cfg.test_fraction > 0 and len({group(s.slide_id) for s in slides}) >= 2 \
            and "test" not in out.values():
        logger.warning("the test split is empty: no %s hashed below --test-fraction %g with "
                       "seed %d (too few %ss for this fraction?)", cfg.group_by,
                       cfg.test_fraction, cfg.seed, cfg.group_by)
    return out


def _split_from_file(path: Path, slides: list[Any], group: Callable[[str], str],
                     by_patient: bool) -> dict[str, str]:
    """The split file's assignment, refusing conflicts, split patients and unlisted slides."""
    rows = read_csv_columns(path, ("slide_id", "split"))
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise ValueError(f"{path}: unknown split name(s) {bad}; use train/test")
    table: dict[str, str] = {}
    for n, r in enumerate(rows, 2):
        prev = table.setdefault(r["slide_id"], r["split"])
        if prev != r["split"]:
            raise ValueError(f"{path}:{n}: slide {r['slide_id']} is listed as both {prev} and "
                             f"{r['split']}")
    missing = sorted(s.slide_id for s in slides if s.slide_id not in table)
    if missing:
        raise ValueError(f"{path}: {len(missing)} slide(s) with tiles and a summary are not "
                         f"listed: {missing[:5]}; list each as train or test (or move its store "
                         "out of --tiles)")
    out = {s.slide_id: table[s.slide_id] for s in slides}
    absent = len(set(table) - set(out))
    if absent:
        logger.warning("%s lists %d slide(s) that have no tile store or no summary here",
                       path, absent)
    if by_patient:
        sides: dict[str, set[str]] = defaultdict(set)
        for sid, side in out.items():
            sides[group(sid)].add(side)
        split = sorted(g for g, v in sides.items() if len(v) > 1)
        if split:
            raise ValueError(f"{path}: patient {split[0]} has slides in both train and test "
                             f"({len(split)} patient(s) split); keep a patient's slides together "
                             "or pass --group-by slide")
    return out
