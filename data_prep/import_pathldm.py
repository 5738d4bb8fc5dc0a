"""Convert the authors' released PathLDM data into this project's stores and summaries file.

The PathLDM authors released what their training read (cvlab-stonybrook/PathLDM, README):

* ``TCGA_BRCA_10x_448_tumor.hdf5``: per row ``X`` (JPEG bytes of a 448-px tile at 10x, tiled by
  DSMIL), ``wsi`` (slide name) and ``folder_name`` (the tile's DSMIL name, ``col_row``);
* ``train_test_brca_tumor/{train,test}.npz``: ``indices`` (the split's rows of the HDF5),
  ``summaries`` (slide -> GPT summary, or a list of them), ``prob_tumor`` and ``prob_til``
  (slide -> {folder_name -> probability}; a tile missing there has no probability);
* the GPT summaries of all BRCA reports (``--report-summaries``: a JSON object
  ``{id: text or [texts]}`` or a CSV with an id and a summary column).

This command converts whatever of these a user has, so the paper's captions can be used as they
were: one tile store per slide under ``OUT/tiles/`` (tiles copied byte for byte, ``coords`` from
the ``col_row`` names in 10x pixels, ``tumor_prob``/``til_prob`` with NaN where the release has
none, ``tissue`` 1.0 since every released tile passed DSMIL's filter), ``OUT/summaries.jsonl``
(the split files' per-slide summaries, report id = slide name), ``OUT/slide_map.csv`` and
``OUT/release_splits.csv`` (the release's split, slide by slide), then ``OUT/train.h5`` and
``OUT/test.h5`` with their dataset card through ``data_prep.build_dataset``. Tiles without a
probability are kept (the caption leaves that level out, as the authors' loader did). With
``--report-summaries`` it also writes ``OUT/report_summaries.jsonl`` in the summaries format.
Slides already converted from the same inputs are skipped on a rerun.

Example::

    python -m data_prep.import_pathldm --root pathldm_release/ --out data/tcga_brca \\
        --report-summaries pathldm_release/brca_report_summaries.csv
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep import build_dataset
from data_prep.common import (
    RunSummary,
    add_logging_arg,
    file_fingerprint,
    setup_logging,
    write_text_atomic,
)
from data_prep.hdf5io import is_complete_tile_store, read_store_attrs, write_tile_store
from ldm.config import read_json_object

logger = logging.getLogger(__name__)

HDF5_NAME = "TCGA_BRCA_10x_448_tumor.hdf5"
SPLIT_DIR = "train_test_brca_tumor"
HDF5_KEYS = ("X", "wsi", "folder_name")
NPZ_KEYS = ("indices", "summaries", "prob_tumor", "prob_til")
RELEASE_MODEL = "gpt-3.5-turbo (the PathLDM authors' release)"
ID_COLUMNS = ("report_id", "patient_filename", "id", "wsi", "slide_id", "patient_id")
TEXT_COLUMNS = ("summary", "text", "summaries")
COL_ROW = re.compile(r"^(\d+)_(\d+)")


@dataclass
class ReleasedSplit:
    """One ``{split}.npz`` of the release."""

    name: str
    path: Path
    indices: np.ndarray
    summaries: dict[str, list[str]]
    prob_tumor: dict[str, dict[str, float]]
    prob_til: dict[str, dict[str, float]]


def _text(value) -> str:
    """A str from an HDF5/NumPy string value (bytes are UTF-8)."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _summary_list(value) -> list[str]:
    """A slide's summaries: one string, or a list of them (the five-summaries release)."""
    if isinstance(value, (str, bytes, np.str_, np.bytes_)):
        return [_text(value)]
    return [_text(v) for v in value]


def _object(npz, key: str, path: Path) -> dict:
    """A pickled dict stored under ``key`` (``arr.tolist()`` as the authors' loader reads it)."""
    value = npz[key].tolist()
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, expected the pickled "
                         "dict of the release (slide -> ...)")
    return value


def load_split(path: Path) -> ReleasedSplit:
    """Read one ``{split}.npz``; a one-line error names the file and what is wrong."""
    try:
        npz = np.load(path, allow_pickle=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from e
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; keys are {npz.files}")
        indices = np.asarray(npz["indices"]).astype(np.int64).ravel()
        summaries = {str(k): _summary_list(v)
                     for k, v in _object(npz, "summaries", path).items()}
        probs = [{str(s): {str(t): float(p) for t, p in d.items()}
                  for s, d in _object(npz, key, path).items()}
                 for key in ("prob_tumor", "prob_til")]
    return ReleasedSplit(path.stem, path, indices, summaries, *probs)


def _tile_bytes(value) -> np.ndarray:
    """One ``X`` row as a flat uint8 array (vlen uint8, bytes or opaque)."""
    if isinstance(value, np.void):
        value = value.tobytes()
    if isinstance(value, (bytes, np.bytes_)):
        return np.frombuffer(bytes(value), dtype=np.uint8)
    return np.asarray(value, dtype=np.uint8).ravel()


def _tile_size(data: np.ndarray) -> int:
    """Side of a JPEG tile from its header."""
    with Image.open(io.BytesIO(data.tobytes())) as im:
        return int(im.size[0])


def _coords(names: list[str]) -> np.ndarray:
    """``(col, row)`` of DSMIL's ``col_row`` names, -1 where a name has another form."""
    out = np.full((len(names), 2), -1, dtype=np.int64)
    for i, name in enumerate(names):
        m = COL_ROW.match(name)
        if m:
            out[i] = int(m.group(1)), int(m.group(2))
    return out


def slide_rows(splits: list[ReleasedSplit], wsi: np.ndarray,
               hdf5: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """HDF5 rows of each slide over the splits, and each slide's split."""
    rows: dict[str, list[int]] = defaultdict(list)
    side: dict[str, str] = {}
    for split in splits:
        bad = split.indices[(split.indices < 0) | (split.indices >= len(wsi))]
        if bad.size:
            raise ValueError(f"{split.name}.npz: index {int(bad[0])} is outside {hdf5.name} "
                             f"({len(wsi)} rows)")
        for r in split.indices.tolist():
            name = wsi[r]
            if side.setdefault(name, split.name) != split.name:
                raise ValueError(f"slide {name} has rows in both {side[name]}.npz and "
                                 f"{split.name}.npz; a slide can be in one split only")
            rows[name].append(r)
    return {k: np.unique(v) for k, v in rows.items()}, side


def _fingerprint(paths: list[Path]) -> str:
    """One fingerprint of the input files (a rerun on the same inputs skips done slides)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}:{file_fingerprint(p)}".encode())
    return h.hexdigest()[:32]


def _read_rows(ds: h5py.Dataset, rows: np.ndarray) -> list[np.ndarray]:
    """``ds[rows]`` for sorted ``rows``, reading each contiguous run in one slice."""
    out: list[np.ndarray] = []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        if len(run):
            out += [_tile_bytes(v) for v in ds[int(run[0]):int(run[-1]) + 1]]
    return out


def write_slide(f: h5py.File, slide: str, rows: np.ndarray, names: np.ndarray,
                split: ReleasedSplit, out: Path, fingerprint: str) -> int:
    """One tile store for ``slide`` from its HDF5 rows; returns the tiles written."""
    tiles = _read_rows(f["X"], rows)
    folders = [str(names[r]) for r in rows]
    probs = {}
    for key, table in (("tumor_prob", split.prob_tumor), ("til_prob", split.prob_til)):
        per_tile = table.get(slide, {})
        probs[key] = np.array([per_tile.get(t, np.nan) for t in folders], dtype=np.float32)
    size = _tile_size(tiles[0])
    source = f"the PathLDM authors' release ({split.name}.npz: prob_tumor / prob_til)"
    attrs = {"slide_id": slide, "source_file": Path(f.filename).name, "mpp": np.nan,
             "objective_power": np.nan, "magnification": 10.0, "tile_size": size,
             "stride": size, "level0_tile_size": size, "level0_stride": size,
             "coords_unit": "10x tile grid of DSMIL's col_row names (-1: unparsed)",
             "tissue_filter": "edges (DSMIL, applied by the authors)",
             "tumor_source": source, "til_source": source, "release_fingerprint": fingerprint}
    write_tile_store(out, tiles, _coords(folders) * size, np.ones(len(tiles)), attrs,
                     extra=probs)
    return len(tiles)


def summaries_jsonl(summaries: dict[str, list[str]], prompt_version: str) -> str:
    """Summaries in the format of ``summarize_reports`` (docs/data_format.md §2)."""
    lines = [json.dumps({"report_id": rid, "summary_index": i, "text": text,
                         "model": RELEASE_MODEL, "prompt_version": prompt_version,
                         "status": "ok"}, ensure_ascii=False)
             for rid, texts in sorted(summaries.items()) for i, text in enumerate(texts)]
    return "".join(line + "\n" for line in lines)


def read_report_summaries(path: Path) -> dict[str, list[str]]:
    """The release's summaries of all BRCA reports: JSON ``{id: text or [texts]}`` or CSV."""
    if path.suffix.lower() == ".json":
        data = read_json_object(path, "a JSON object {id: summary}")
        return {str(k): _summary_list(v) for k, v in data.items()}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        id_col = next((c for c in ID_COLUMNS if c in cols), None)
        text_col = next((c for c in TEXT_COLUMNS if c in cols), None)
        if id_col is None or text_col is None:
            raise ValueError(f"{path}: needs an id column ({', '.join(ID_COLUMNS)}) and a "
                             f"summary column ({', '.join(TEXT_COLUMNS)}); columns are {cols}")
        out: dict[str, list[str]] = defaultdict(list)
        for row in reader:
            if (row.get(text_col) or "").strip():
                out[row[id_col].strip()].append(row[text_col].strip())
    return dict(out)


def convert_tiles(hdf5: Path, splits: list[ReleasedSplit], out: Path,
                  overwrite: bool = False) -> tuple[RunSummary, dict[str, str]]:
    """Per-slide tile stores under ``out/tiles``; returns the summary and each slide's split."""
    summary = RunSummary("import_pathldm")
    tiles_dir = out / "tiles"
    tiles_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint([hdf5] + [s.path for s in splits])
    with h5py.File(hdf5, "r") as f:
        missing = [k for k in HDF5_KEYS if k not in f]
        if missing:
            raise ValueError(f"{hdf5}: missing dataset(s) {missing}; has {sorted(f)}")
        if not len(f["X"]) == len(f["wsi"]) == len(f["folder_name"]):
            raise ValueError(f"{hdf5}: X, wsi and folder_name differ in length")
        wsi = np.array([_text(v) for v in f["wsi"][()]], dtype=object)
        names = np.array([_text(v) for v in f["folder_name"][()]], dtype=object)
        rows, side = slide_rows(splits, wsi, hdf5)
        by_name = {s.name: s for s in splits}
        for slide in tqdm(sorted(rows), desc="slides", unit="slide"):
            store = tiles_dir / f"{slide}.h5"
            if (not overwrite and is_complete_tile_store(store)
                    and read_store_attrs(store).get("release_fingerprint") == fingerprint):
                summary.skipped.append(slide)
                continue
            n = write_slide(f, slide, rows[slide], names, by_name[side[slide]], store,
                            fingerprint)
            summary.done.append(slide)
            logger.debug("%s: %d tiles", slide, n)
    summary.extra["slides per split"] = {s.name: sum(v == s.name for v in side.values())
                                         for s in splits}
    summary.extra["tiles"] = int(sum(len(r) for r in rows.values()))
    return summary, side


def import_release(out: Path, hdf5: Path | None, split_files: list[Path],
                   report_summaries: Path | None = None, overwrite: bool = False) -> RunSummary:
    """Convert what the user has of the release; returns the run summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = RunSummary("import_pathldm")
    if report_summaries is not None:
        reports = read_report_summaries(report_summaries)
        write_text_atomic(out / "report_summaries.jsonl",
                          summaries_jsonl(reports, "release: summaries of all BRCA reports"))
        summary.extra["report summaries"] = f"{len(reports)} reports -> report_summaries.jsonl"
    if hdf5 is None or not split_files:
        summary.extra["stores"] = "not written (needs the HDF5 and at least one split file)"
        return summary
    splits = [load_split(p) for p in split_files]
    converted, side = convert_tiles(hdf5, splits, out, overwrite)
    summary = _merge(summary, converted)
    per_slide: dict[str, list[str]] = {}
    for split in splits:
        per_slide.update(split.summaries)
    write_text_atomic(out / "summaries.jsonl",
                      summaries_jsonl(per_slide, f"release: {SPLIT_DIR} split summaries"))
    write_text_atomic(out / "slide_map.csv", "slide_id,report_id\n"
                      + "".join(f"{s},{s}\n" for s in sorted(side)))
    write_text_atomic(out / "release_splits.csv", "slide_id,split\n"
                      + "".join(f"{s},{side[s]}\n" for s in sorted(side)))
    cfg = build_dataset.BuildConfig(test_fraction=0.0, group_by="slide",
                                    split_file=str(out / "release_splits.csv"),
                                    mapping=str(out / "slide_map.csv"))
    built, card = build_dataset.build(out / "tiles", out / "summaries.jsonl", out, cfg, overwrite)
    summary.extra.update(built.extra)
    summary.failed.update(built.failed)
    return summary


def _merge(a: RunSummary, b: RunSummary) -> RunSummary:
    """``b`` with ``a``'s extra entries first."""
    b.extra = {**a.extra, **b.extra}
    return b


def _split_files(args: argparse.Namespace) -> list[Path]:
    """The split files asked for (``--splits`` under ``--split-dir``) that exist."""
    folder = args.split_dir or (args.root / SPLIT_DIR if args.root else None)
    if folder is None:
        return []
    found = [folder / f"{name}.npz" for name in args.splits if (folder / f"{name}.npz").is_file()]
    absent = [name for name in args.splits if not (folder / f"{name}.npz").is_file()]
    if absent:
        logger.warning("no %s in %s", ", ".join(f"{n}.npz" for n in absent), folder)
    return found


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m data_prep.import_pathldm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=None,
                   help=f"folder of the release ({HDF5_NAME} and {SPLIT_DIR}/)")
    p.add_argument("--hdf5", type=Path, default=None,
                   help=f"the tiles HDF5 (default: ROOT/{HDF5_NAME})")
    p.add_argument("--split-dir", type=Path, default=None,
                   help=f"folder of the split .npz files (default: ROOT/{SPLIT_DIR})")
    p.add_argument("--splits", nargs="+", default=["train", "test"],
                   help="split files to import, by name (default: train test)")
    p.add_argument("--report-summaries", type=Path, default=None,
                   help="the release's summaries of all BRCA reports (.json or .csv)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="convert again what is done")
    add_logging_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    hdf5 = args.hdf5 or (args.root / HDF5_NAME if args.root else None)
    if hdf5 is not None and not hdf5.is_file():
        raise SystemExit(f"error: {hdf5}: file not found")
    splits = _split_files(args)
    if args.report_summaries is not None and not args.report_summaries.is_file():
        raise SystemExit(f"error: {args.report_summaries}: file not found")
    if (hdf5 is None or not splits) and args.report_summaries is None:
        raise SystemExit("error: nothing to import: give --root (or --hdf5 and --split-dir) "
                         "and/or --report-summaries")
    try:
        summary = import_release(args.out, hdf5, splits, args.report_summaries, args.overwrite)
    except (ValueError, OSError, KeyError) as e:
        raise SystemExit(f"error: {e}") from e
    return summary.report()


if __name__ == "__main__":
    sys.exit(main())
