"""Join tiles, tumor/TIL probabilities and report summaries into train/test training stores.

Slides are matched to reports by TCGA barcode: report ids of the TCGA reports corpus are
patient-level (``TCGA-XX-XXXX.<uuid>``) and slide ids slide-level
(``TCGA-XX-XXXX-01Z-00-DX1.<uuid>``), so by default both are cut to their first 12 characters
(``--id-chars``); ``--mapping`` (CSV ``slide_id,report_id``) overrides this. The split is by
slide (by default grouped by patient, so a patient's slides stay together), from a seeded ratio
or a split file; no slide is in both. The seeded split is stable: each patient's side comes from
a hash of the seed and the patient id, so adding patients never moves existing ones. A split
file must list every slide once and keep each patient's slides together. Tiles below
``--min-tissue`` are dropped and counted. Tiles without a tumor or TIL probability (NaN, or no
probabilities at all) are kept, as the authors' loader kept them: their caption leaves that level
out and a class-conditional model gets the unconditional class 4; ``--drop-missing-probabilities``
drops them instead. Writes ``train.h5``/``test.h5`` (docs/data_format.md, section 3),
``splits.csv`` and ``dataset_card.json``/``.md``. A split store built from the same inputs and
settings is kept as is on a rerun; a store with slides is never replaced by an empty one, and the
output folder is locked while a build runs.

Example::

    python -m data_prep.build_dataset --tiles tiles/ --summaries summaries.jsonl \\
        --out dataset/ --test-fraction 0.17 --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from data_prep.common import (
    OutputLocked,
    RunSummary,
    add_logging_arg,
    atomic_output,
    output_lock,
    read_jsonl,
    remove_stale_tmp,
    setup_logging,
    write_json_atomic,
    write_text_atomic,
)
from data_prep.dataset_card import render_card, split_stats
from data_prep.hdf5io import is_complete_tile_store, read_store_attrs
from data_prep.splits import SPLITS, assign_splits, read_csv_columns
from ldm.argtypes import float_in, non_negative_int, positive_int, unit_float
from ldm.data.store import FORMAT_VERSION as DATASET_STORE_VERSION
from ldm.data.store import (
    IMAGES,
    PROBABILITIES,
    append_rows,
    create_row_datasets,
    write_attrs,
    write_slide_table,
)

logger = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    """Settings that decide the content of the stores."""

    test_fraction: float = 0.15
    seed: int = 0
    id_chars: int = 12
    group_by: str = "patient"
    min_tissue: float = 0.0
    max_summaries: int | None = None
    keep_unsummarized: bool = False
    split_file: str | None = None
    mapping: str | None = None
    drop_missing_probabilities: bool = False


@dataclass
class SlideInfo:
    """One tile store and what joins to it."""

    slide_id: str
    path: Path
    n_tiles: int
    attrs: dict
    report_id: str | None = None
    summaries: list[str] = field(default_factory=list)


def load_slides(tiles_dir: Path, summary: RunSummary) -> list[SlideInfo]:
    """Readable tile stores of ``tiles_dir``; unreadable ones go to ``summary.failed``."""
    slides = []
    for p in sorted(tiles_dir.glob("*.h5")):
        if not is_complete_tile_store(p):
            summary.failed[p.stem] = f"{p}: not a complete tile store"
            continue
        attrs = read_store_attrs(p)
        with h5py.File(p, "r") as f:
            n = len(f["tiles"])
            attrs["_content"] = _content_key(f)
        slides.append(SlideInfo(str(attrs.get("slide_id", p.stem)), p, n, attrs))
    _refuse_duplicates(slides)
    for key in ("tile_size", "magnification"):
        values = {s.attrs.get(key) for s in slides}
        if len(values) > 1:
            raise ValueError(f"tile stores disagree on {key}: {sorted(map(str, values))}; "
                             "build one dataset per setting")
    return slides


def _content_key(f: h5py.File) -> str:
    """Hash of a tile store's tile count, coordinates and first tile: equal for copies."""
    h = hashlib.sha256(str(len(f["tiles"])).encode())
    h.update(np.ascontiguousarray(f["coords"][:]).tobytes())
    if len(f["tiles"]):
        h.update(np.asarray(f["tiles"][0]).tobytes())
    return h.hexdigest()


def _refuse_duplicates(slides: list[SlideInfo]) -> None:
    """A slide stored twice (same id, or the same content under two names) would count twice."""
    for key, what in ((lambda s: s.slide_id, "slide id"),
                      (lambda s: s.attrs["_content"], "content")):
        seen: dict[str, SlideInfo] = {}
        for s in slides:
            other = seen.setdefault(key(s), s)
            if other is not s:
                raise ValueError(f"{other.path.name} and {s.path.name} hold the same {what} "
                                 f"({other.slide_id}); remove the duplicate store")


def load_summaries(path: Path, max_summaries: int | None) -> tuple[dict[str, list[str]], dict]:
    """``report_id -> summaries ordered by index`` from the JSONL, and statistics."""
    by_report: dict[str, dict[int, str]] = defaultdict(dict)
    models, misfits = Counter(), 0
    records = read_jsonl(path)
    for r in records:
        if r.get("status") != "ok" or not r.get("text"):
            continue
        by_report[r["report_id"]].setdefault(int(r["summary_index"]), r["text"])
        models[f"{r.get('model')} / prompt {r.get('prompt_version')}"] += 1
        misfits += 0 if r.get("fits", True) else 1
    if not by_report:
        raise ValueError(f"{path}: no usable summaries ({len(records)} records, none with "
                         "status 'ok' and a text); nothing was written")
    out = {rid: [t for _, t in sorted(d.items())][:max_summaries]
           for rid, d in by_report.items()}
    return out, {"summary_models": dict(models), "misfit_summaries": misfits}


def match_reports(slides: list[SlideInfo], summaries: dict[str, list[str]], id_chars: int,
                  mapping: Path | None) -> None:
    """Set each slide's report id and summaries (by mapping CSV or by id prefix)."""
    if mapping is not None:
        table = {row["slide_id"]: row["report_id"] for row in read_csv_columns(
        mapping, ("slide_id", "report_id"))}
        for s in slides:
            s.report_id = table.get(s.slide_id)
    else:
        key = (lambda x: x[:id_chars]) if id_chars > 0 else (lambda x: x)
        by_key: dict[str, list[str]] = defaultdict(list)
        for rid in sorted(summaries):
            by_key[key(rid)].append(rid)
        for s in slides:
            candidates = by_key.get(key(s.slide_id), [])
            if len(candidates) > 1:
                logger.warning("%s: %d reports match (%s); using %s", s.slide_id,
                               len(candidates), candidates, candidates[0])
            s.report_id = candidates[0] if candidates else None
    for s in slides:
        s.summaries = list(summaries.get(s.report_id, [])) if s.report_id else []


def _signature(cfg: BuildConfig, slides: list[SlideInfo], k: int) -> str:
    """Hash of everything a split store depends on (settings, inputs, summaries)."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(str(k).encode())
    for s in slides:
        st = s.path.stat()
        h.update(json.dumps([s.slide_id, st.st_size, st.st_mtime_ns, s.summaries]).encode())
    return h.hexdigest()


def tile_probabilities(f: h5py.File) -> dict[str, np.ndarray]:
    """``tumor_prob`` and ``til_prob`` of a tile store; NaN where a store has none."""
    n = len(f["tiles"])
    return {k: f[k][:].astype(np.float32) if k in f else np.full(n, np.nan, np.float32)
            for k in PROBABILITIES}


def _kept_rows(f: h5py.File, cfg: BuildConfig) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of tiles to keep, and counts of tiles dropped (or kept unlabelled) per reason."""
    probs = tile_probabilities(f)
    finite = np.isfinite(probs["tumor_prob"]) & np.isfinite(probs["til_prob"])
    enough = f["tissue"][:] >= cfg.min_tissue
    missing = int((enough & ~finite).sum())
    keep = enough & finite if cfg.drop_missing_probabilities else enough
    dropped = {"low_tissue": int((~enough).sum()),
               "nan_probability": missing if cfg.drop_missing_probabilities else 0,
               "kept_nan_probability": 0 if cfg.drop_missing_probabilities else missing}
    return np.flatnonzero(keep), dropped


def _copy_rows(src: h5py.Dataset, rows: np.ndarray, block: int = 4096) -> np.ndarray:
    """``src[rows]`` for a vlen dataset, read in contiguous blocks (fast for dense ``rows``)."""
    out = np.empty(len(rows), dtype=object)
    pos = 0
    for start in range(0, len(src), block):
        sel = rows[(rows >= start) & (rows < start + block)]
        if len(sel):
            data = src[start:min(start + block, len(src))]
            out[pos:pos + len(sel)] = data[sel - start]
            pos += len(sel)
    return out


def write_split(path: Path, split: str, slides: list[SlideInfo], cfg: BuildConfig, k: int,
                signature: str) -> None:
    """Write one split store atomically (docs/data_format.md, section 3)."""
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        ds = create_row_datasets(f)
        kept, dropped, empty = [], Counter(), []
        for s in tqdm(slides, desc=split, unit="slide"):
            with h5py.File(s.path, "r") as src:
                rows, d = _kept_rows(src, cfg)
                dropped.update(d)
                if len(rows) == 0:
                    empty.append(s.slide_id)
                    continue
                probs = {key: v[rows] for key, v in tile_probabilities(src).items()}
                append_rows(ds, {IMAGES: _copy_rows(src["tiles"], rows),
                                 "slide_index": np.full(len(rows), len(kept), np.int32),
                                 "coords": src["coords"][:][rows], **probs})
            kept.append(s)
        write_slide_table(f, [s.slide_id for s in kept], [s.summaries for s in kept], k)
        write_attrs(f, {
            "split": split, "seed": cfg.seed,
            "tile_size": int(slides[0].attrs["tile_size"]) if slides else 0,
            "magnification": float(slides[0].attrs["magnification"]) if slides else 0.0,
            "signature": signature, "build_config": json.dumps(asdict(cfg)),
            "dropped_low_tissue": dropped["low_tissue"],
            "dropped_nan_probability": dropped["nan_probability"],
            "kept_nan_probability": dropped["kept_nan_probability"],
            "slides_without_patches": json.dumps(empty),
        })


def _store_signature(path: Path) -> str | None:
    try:
        return str(read_store_attrs(path).get("signature"))
    except OSError:
        return None


def check_inputs(tiles_dir: Path, summaries_path: Path | None, out_dir: Path,
                 cfg: BuildConfig) -> None:
    """Every named input exists and the output can be a folder, before anything is written."""
    if not tiles_dir.is_dir():
        raise ValueError(f"--tiles {tiles_dir}: no such folder")
    for flag, value in (("--summaries", summaries_path), ("--split-file", cfg.split_file),
                        ("--mapping", cfg.mapping)):
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{flag} {value}: no such file")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")


def _refuse_emptying(out_dir: Path, members: dict[str, list[SlideInfo]]) -> None:
    """A split store that holds slides is never replaced by an empty one."""
    for split, slides in members.items():
        path = out_dir / f"{split}.h5"
        if slides or not path.is_file():
            continue
        try:
            n = split_stats(path)["slides"]
        except (OSError, KeyError):
            continue  # unreadable: replacing it loses nothing
        if n:
            raise ValueError(f"{path} holds {n} slides and this build would leave {split} "
                             "empty; check --summaries/--split-file/--test-fraction, or pass "
                             "--overwrite to replace it")


def build(tiles_dir: Path, summaries_path: Path | None, out_dir: Path, cfg: BuildConfig,
          overwrite: bool = False) -> tuple[RunSummary, dict]:
    """Build both split stores, ``splits.csv`` and the dataset card; returns (summary, card).

    Everything is read and checked before the first write; the output folder is locked.
    """
    check_inputs(tiles_dir, summaries_path, out_dir, cfg)
    summary = RunSummary("build_dataset")
    slides = load_slides(tiles_dir, summary)
    if not slides:
        raise ValueError(f"no tile stores in {tiles_dir}")
    summaries, sum_stats = (load_summaries(summaries_path, cfg.max_summaries)
                            if summaries_path else ({}, {}))
    match_reports(slides, summaries, cfg.id_chars, Path(cfg.mapping) if cfg.mapping else None)
    without = sorted(s.slide_id for s in slides if not s.summaries)
    if without:
        logger.warning("%d slides have no summary%s: %s", len(without),
                       "" if cfg.keep_unsummarized else " and are left out", without[:20])
    included = slides if cfg.keep_unsummarized else [s for s in slides if s.summaries]
    if not included:
        raise ValueError(f"none of the {len(slides)} slides has a summary (check --summaries, "
                         "--mapping, --id-chars, or pass --keep-unsummarized); nothing was "
                         "written")
    assignment = assign_splits(included, cfg)
    members = {split: [s for s in included if assignment.get(s.slide_id) == split]
               for split in SPLITS}
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir):
        remove_stale_tmp(out_dir / n for n in ("train.h5", "test.h5", "splits.csv",
                                                  "dataset_card.json", "dataset_card.md"))
        if not overwrite:
            _refuse_emptying(out_dir, members)
        card = _write_outputs(out_dir, slides, included, members, assignment, cfg, overwrite,
                              summary)
    card.update(sum_stats)
    card["slides_without_summary"] = without
    write_json_atomic(out_dir / "dataset_card.json", card)
    write_text_atomic(out_dir / "dataset_card.md", render_card(card))
    summary.extra.update({s: f"{card['splits'][s]['slides']} slides, "
                             f"{card['splits'][s]['patches']} patches" for s in SPLITS})
    summary.extra["slides without summary"] = len(without)
    summary.extra["output"] = str(out_dir)
    return summary, card


def _write_outputs(out_dir: Path, slides: list[SlideInfo], included: list[SlideInfo],
                   members: dict[str, list[SlideInfo]], assignment: dict[str, str],
                   cfg: BuildConfig, overwrite: bool, summary: RunSummary) -> dict:
    """Write (or keep) both split stores and ``splits.csv``; returns the card's core."""
    k = max([len(s.summaries) for s in included] + [1])
    card: dict = {"format_version": DATASET_STORE_VERSION,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": asdict(cfg),
                  "splits": {}}
    for split in SPLITS:
        path = out_dir / f"{split}.h5"
        sig = _signature(cfg, members[split], k)
        if not overwrite and path.is_file() and _store_signature(path) == sig:
            summary.skipped.append(split)
        else:
            write_split(path, split, members[split], cfg, k, sig)
            summary.done.append(split)
        card["splits"][split] = split_stats(path)
    write_text_atomic(out_dir / "splits.csv", "slide_id,split\n" + "".join(
        f"{sid},{sp}\n" for sid, sp in sorted(assignment.items())))
    card["unassigned_slides"] = sorted(s.slide_id for s in included
                                       if s.slide_id not in assignment)
    card["probability_sources"] = dict(Counter(
        f"tumor: {s.attrs.get('tumor_source', 'none')} | til: {s.attrs.get('til_source', 'none')}"
        for s in slides))
    return card


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m data_prep.build_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=Path, required=True, help="folder of per-slide tile stores")
    p.add_argument("--summaries", type=Path, default=None, help="summaries JSONL")
    p.add_argument("--out", type=Path, required=True, help="dataset folder")
    p.add_argument("--mapping", type=Path, default=None, help="CSV slide_id,report_id")
    p.add_argument("--id-chars", type=non_negative_int, default=12,
                   help="match slide and report ids on this many leading characters "
                        "(12 = TCGA patient barcode; 0 = whole id) (default: %(default)s)")
    p.add_argument("--test-fraction", type=float_in(0.0, 1.0, hi_open=True), default=0.15,
                   help="expected share of patients (or slides) in the test split; each one's "
                        "side is a seeded hash of its id, so the realised share varies on small "
                        "sets (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    p.add_argument("--group-by", choices=["patient", "slide"], default="patient",
                   help="keep a patient's slides in one split (default) or split slides freely")
    p.add_argument("--split-file", type=Path, default=None,
                   help="CSV slide_id,split (train/test) instead of a random split; it must "
                        "list every slide once and keep a patient's slides together")
    p.add_argument("--min-tissue", type=unit_float, default=0.0,
                   help="drop tiles with less tissue than this (default: %(default)s)")
    p.add_argument("--max-summaries", type=positive_int, default=None,
                   help="use at most K per slide")
    p.add_argument("--drop-missing-probabilities", action="store_true",
                   help="drop tiles without a tumor or TIL probability (default: keep them as "
                        "the original did; their caption omits that level, class label 4)")
    p.add_argument("--keep-unsummarized", action="store_true",
                   help="keep slides without a summary (n_summaries 0), e.g. for class "
                        "conditioning")
    p.add_argument("--overwrite", action="store_true", help="rewrite stores even if up to date")
    add_logging_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    cfg = BuildConfig(args.test_fraction, args.seed, args.id_chars, args.group_by,
                      args.min_tissue, args.max_summaries, args.keep_unsummarized,
                      str(args.split_file) if args.split_file else None,
                      str(args.mapping) if args.mapping else None,
                      args.drop_missing_probabilities)
    try:
        summary, card = build(args.tiles, args.summaries, args.out, cfg, args.overwrite)
    except (ValueError, OSError, OutputLocked) as e:
        raise SystemExit(f"error: {e}") from e
    print(render_card(card))
    return summary.report()


if __name__ == "__main__":
    sys.exit(main())
