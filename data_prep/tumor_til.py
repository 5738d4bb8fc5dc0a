"""Add per-tile tumor and TIL probabilities (``tumor_prob``, ``til_prob``) to per-slide stores.

Sources, chosen separately for tumor and TIL:

* wsinfer result CSVs (``<csv-dir>/<slide_id>.csv`` with level-0 ``minx, miny, width, height``
  and ``prob_*`` columns): each tile gets the average of the classifier patches that overlap it,
  weighted by overlap area; NaN where no patch overlaps.
* a patch classifier run on the tiles: a TorchScript file, or a torchvision architecture plus
  state_dict, described by flags or a JSON spec (input size, spacing in um/px, mean/std,
  class index, softmax/sigmoid). A tile larger than the classifier's field of view is cut into
  crops at the classifier's spacing and their probabilities are averaged.
* ``--stain-standin`` (demo only): NOT a tumor/TIL classifier. Within-slide ranks of colour
  statistics: tumor = rank of the mean hematoxylin optical density, TIL = rank of the
  hematoxylin contrast (99th minus 50th percentile: small dark nuclei on lighter tissue).
  Deterministic and labelled as such in the store.

Stores are updated atomically (edited copy renamed over the original); a rerun skips slides
whose probabilities already come from the same source *and* the same input (a fingerprint of
the CSV or model file is stored), and recomputes them when the input changed. Raw values outside
[0, 1], a CSV whose patches overlap no tile, and truncated stores are named failures. The tile
folder is locked while a run works on it.

The paper's probabilities come from the models of its references [24] (Le et al. 2020, breast
tumor) and [1] (Abousamra et al. 2022, TILs), which wsinfer runs as
``breast-tumor-resnet34.tcga-brca`` (CSV column ``prob_Tumor``) and
``pancancer-lymphocytes-inceptionv4.tcga`` (``prob_Lymphocytes``). The default columns are
``prob_tumor`` and ``prob_til`` (the spelling of the authors' released split); a CSV that has
only the old spelling ``prob_tils`` is still read, with a deprecation warning.

Example::

    wsinfer run --wsi-dir slides/ --results-dir wsinfer-tumor \\
        --model breast-tumor-resnet34.tcga-brca
    wsinfer run --wsi-dir slides/ --results-dir wsinfer-til \\
        --model pancancer-lymphocytes-inceptionv4.tcga
    python -m data_prep.tumor_til --tiles tiles/ --tumor-csv-dir wsinfer-tumor/model-outputs-csv \\
        --til-csv-dir wsinfer-til/model-outputs-csv --tumor-column prob_Tumor \\
        --til-column prob_Lymphocytes
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from data_prep.common import (
    OutputLocked,
    RunSummary,
    add_logging_arg,
    file_fingerprint,
    output_lock,
    parse_shard,
    read_csv_table,
    remove_stale_tmp,
    select_shard,
    setup_logging,
)
from data_prep.hdf5io import decode_jpeg, is_complete_tile_store, update_store_atomic
from data_prep.patch_classifier import ClassifierSpec, classify_tiles, load_classifier
from ldm.argtypes import finite_float, non_negative_int, positive_float, positive_int

logger = logging.getLogger(__name__)

STANDIN_SOURCE = ("stain-standin (NOT a classifier): within-slide rank of {what}; for demos "
                  "only")


class SlideFailure(RuntimeError):
    """A slide whose probabilities cannot be computed; the message says why."""


# ----------------------------------------------------------------------------- wsinfer CSVs
TIL_COLUMN = "prob_til"  # the one spelling (the authors' released split uses it too)
OLD_SPELLINGS = {TIL_COLUMN: "prob_tils"}  # still read, with a deprecation warning


def _spelling_in(path: Path, column: str) -> str:
    """``column``, or its old spelling where the CSV has only that (with a deprecation warning)."""
    old = OLD_SPELLINGS.get(column)
    if old is None:
        return column
    with path.open(newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    if column in header or old not in header:
        return column
    message = (f"{path}: reading the TIL column by its old spelling {old!r}; name it "
               f"{column!r} (the old spelling will stop being read)")
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    logger.warning("%s", message)
    return old


def read_wsinfer_csv(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes (M, 4) minx/miny/width/height, probs (M,))`` from one wsinfer CSV."""
    if not path.is_file():
        raise SlideFailure(f"no wsinfer CSV: {path}")
    column = _spelling_in(path, column)
    need = ("minx", "miny", "width", "height", column)
    try:
        rows = [[r[c] for c in need] for r in read_csv_table(path, need)]
    except ValueError as e:
        raise SlideFailure(str(e)) from None
    if not rows:
        raise SlideFailure(f"{path}: no patch rows (header only)")
    try:
        data = np.array(rows, dtype=np.float64).reshape(-1, 5)
    except ValueError as e:
        raise SlideFailure(f"{path}: non-numeric value ({e})") from e
    probs = data[:, 4]
    bad = np.flatnonzero(np.isfinite(probs) & ((probs < 0) | (probs > 1)))
    if bad.size:
        raise SlideFailure(f"{path}:{bad[0] + 2}: {column} {probs[bad[0]]:g} is outside [0, 1] "
                           f"({bad.size} such rows); not a probability column?")
    return data[:, :4], probs


def overlap_average(coords: np.ndarray, tile_l0: int, boxes: np.ndarray,
                    probs: np.ndarray) -> np.ndarray:
    """Per tile, the overlap-area-weighted mean of the patch probabilities; NaN if none."""
    ok = np.isfinite(probs) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    boxes, probs = boxes[ok], probs[ok]
    out = np.full(len(coords), np.nan, dtype=np.float32)
    if len(boxes) == 0:
        return out
    cell = float(max(boxes[:, 2].max(), boxes[:, 3].max()))
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (bx, by) in enumerate(np.floor(boxes[:, :2] / cell).astype(np.int64)):
        buckets[(int(bx), int(by))].append(i)
    for t, (x0, y0) in enumerate(coords.astype(np.float64)):
        x1, y1 = x0 + tile_l0, y0 + tile_l0
        # a patch starting more than one cell before the tile cannot reach it
        cx = range(int(math.floor((x0 - cell) / cell)), int(math.floor(x1 / cell)) + 1)
        cy = range(int(math.floor((y0 - cell) / cell)), int(math.floor(y1 / cell)) + 1)
        idx = [i for bx in cx for by in cy for i in buckets.get((bx, by), ())]
        if not idx:
            continue
        b = boxes[idx]
        ox = np.clip(np.minimum(x1, b[:, 0] + b[:, 2]) - np.maximum(x0, b[:, 0]), 0, None)
        oy = np.clip(np.minimum(y1, b[:, 1] + b[:, 3]) - np.maximum(y0, b[:, 1]), 0, None)
        area = ox * oy
        if area.sum() > 0:
            out[t] = float((area * probs[idx]).sum() / area.sum())
    return out


# -------------------------------------------------------------------------- stain stand-in
def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks scaled into (0, 1), ties sharing their average rank."""
    from scipy.stats import rankdata

    return ((rankdata(values, method="average") - 0.5) / max(len(values), 1)).astype(np.float32)


def stain_standin(tiles: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Demo stand-in ``(tumor, til)``: within-slide ranks of hematoxylin statistics.

    The statistics (:func:`ldm.data.stain.hematoxylin_stats`) are the ones the demo's caption
    adherence check measures on generated patches.
    """
    from ldm.data.stain import hematoxylin_stats

    stats = np.array([hematoxylin_stats(tile) for tile in tiles]).reshape(-1, 2)
    return _ranks(stats[:, 0]), _ranks(stats[:, 1])


# ------------------------------------------------------------------------------ the command
@dataclass
class Source:
    """Where one target's (``tumor`` or ``til``) probabilities come from."""

    target: str
    kind: str  # "csv", "classifier" or "standin"
    csv_dir: Path | None = None
    column: str | None = None
    spec: ClassifierSpec | None = None

    def describe(self) -> str:
        """Provenance stored as the ``<target>_source`` attribute."""
        if self.kind == "csv":
            return (f"wsinfer CSV column {self.column} from {self.csv_dir.name}/ "
                    "(overlap-area weighted mean)")
        if self.kind == "classifier":
            return self.spec.describe()
        what = ("mean hematoxylin optical density" if self.target == "tumor"
                else "hematoxylin contrast (99th minus 50th percentile optical density)")
        return STANDIN_SOURCE.format(what=what)

    def input_key(self, sid: str) -> str:
        """Fingerprint of the input file the values of slide ``sid`` come from ("" if none)."""
        path = (self.csv_dir / f"{sid}.csv" if self.kind == "csv"
                else Path(self.spec.path) if self.kind == "classifier" else None)
        return file_fingerprint(path) if path is not None and path.is_file() else ""


def _tile_mpp(attrs: dict) -> float:
    mpp = float(attrs.get("mpp", math.nan))
    if not math.isfinite(mpp):  # unknown spacing: the 10x = 1 um/px convention
        return 10.0 / float(attrs["magnification"])
    return mpp * float(attrs["level0_tile_size"]) / float(attrs["tile_size"])


def _decoded(ds: h5py.Dataset, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """Decoded tiles ``start:stop`` of a store, one at a time (slides can be large)."""
    for i in range(start, len(ds) if stop is None else min(stop, len(ds))):
        yield decode_jpeg(ds[i])


def _span(xy: np.ndarray) -> str:
    """``x a..b, y c..d`` of an ``(N, 2+)`` coordinate array."""
    return (f"x {xy[:, 0].min():g}..{xy[:, 0].max():g}, "
            f"y {xy[:, 1].min():g}..{xy[:, 1].max():g}")


def _probabilities(src: Source, sid: str, f: h5py.File, models: dict, device: str,
                   standin: dict, chunk: int = 512) -> np.ndarray:
    attrs = dict(f.attrs)
    if src.kind == "csv":
        path = src.csv_dir / f"{sid}.csv"
        boxes, probs = read_wsinfer_csv(path, src.column)
        coords, l0 = f["coords"][:], int(attrs["level0_tile_size"])
        vals = overlap_average(coords, l0, boxes, probs)
        if len(vals) and not np.isfinite(vals).any():
            raise SlideFailure(f"{path}: none of its {len(boxes)} patches overlaps any of the "
                               f"{len(coords)} tiles (patches span {_span(boxes[:, :2])}, tiles "
                               f"{_span(coords)}; level-0 coordinates of this slide?)")
        return vals
    if src.kind == "classifier":
        ds = f["tiles"]
        parts = [classify_tiles(models[src.target], src.spec, list(_decoded(ds, s, s + chunk)),
                                _tile_mpp(attrs), device) for s in range(0, len(ds), chunk)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if not standin:
        standin["tumor"], standin["til"] = stain_standin(_decoded(f["tiles"]))
    return standin[src.target]


def _stale(f: h5py.File, src: Source, sid: str) -> bool:
    """True when the store lacks ``src``'s values, or has them from another source or input."""
    if f"{src.target}_prob" not in f or f.attrs.get(f"{src.target}_source") != src.describe():
        return True
    stored = f.attrs.get(f"{src.target}_input")
    if stored is not None and stored != src.input_key(sid):
        logger.warning("%s: the %s input changed since its values were stored; recomputing",
                       sid, src.target)
        return True
    return False


def process_slide(store: Path, sources: list[Source], models: dict, device: str = "cpu",
                  overwrite: bool = False) -> dict:
    """Compute and store the probabilities of one slide; returns a result record."""
    with h5py.File(store, "r") as f:
        sid = str(f.attrs.get("slide_id", store.stem))
        todo = [s for s in sources if overwrite or _stale(f, s, sid)]
        if not todo:
            return {"slide_id": sid, "status": "skipped"}
        datasets, attrs, standin = {}, {}, {}
        for src in todo:
            vals = np.asarray(_probabilities(src, sid, f, models, device, standin),
                              dtype=np.float32)
            finite = vals[np.isfinite(vals)]
            if finite.size and (finite.min() < 0 or finite.max() > 1):
                raise SlideFailure(f"{src.describe()}: values outside [0, 1] "
                                   f"({finite.min():g}..{finite.max():g})")
            datasets[f"{src.target}_prob"] = vals
            attrs[f"{src.target}_source"] = src.describe()
            attrs[f"{src.target}_input"] = src.input_key(sid)
    update_store_atomic(store, datasets, attrs)
    n_nan = {k: int(np.isnan(v).sum()) for k, v in datasets.items()}
    return {"slide_id": sid, "status": "done", "nan": n_nan, "tiles": len(next(iter(
        datasets.values())))}


def build_sources(args: argparse.Namespace) -> list[Source]:
    """One source per target from the flags; a clear error when ambiguous or missing."""
    sources = []
    for target in ("tumor", "til"):
        csv_dir = getattr(args, f"{target}_csv_dir")
        clf = getattr(args, f"{target}_classifier")
        if csv_dir and clf:
            raise ValueError(f"give either --{target}-csv-dir or --{target}-classifier, not both")
        if csv_dir:
            sources.append(Source(target, "csv", csv_dir=csv_dir,
                                  column=getattr(args, f"{target}_column")))
        elif clf:
            defaults = {"kind": args.classifier_kind, "arch": args.arch,
                        "num_classes": args.num_classes, "input_size": args.input_size,
                        "mpp": args.classifier_mpp, "mean": args.mean, "std": args.std,
                        "class_index": getattr(args, f"{target}_class_index"),
                        "activation": args.activation, "batch_size": args.batch_size}
            sources.append(Source(target, "classifier", spec=ClassifierSpec.from_arg(clf,
                                                                                   defaults)))
        elif args.stain_standin:
            sources.append(Source(target, "standin"))
    if not sources:
        raise ValueError("no probability source: give --tumor-csv-dir/--til-csv-dir, "
                         "--tumor-classifier/--til-classifier, or --stain-standin")
    return sources


def run(stores: list[Path], sources: list[Source], device: str = "cpu",
        overwrite: bool = False) -> RunSummary:
    """Add probabilities to every store; returns the run summary."""
    models = {s.target: load_classifier(s.spec, device) for s in sources if s.kind == "classifier"}
    for s in sources:
        logger.info("%s probabilities: %s", s.target, s.describe())
        if s.kind == "standin":
            logger.warning("%s probabilities come from the stain STAND-IN, not a classifier",
                           s.target)
    summary = RunSummary("tumor_til")
    nan_tiles, total = 0, 0
    for store in tqdm(stores, desc="slides", unit="slide"):
        try:
            res = process_slide(store, sources, models, device, overwrite)
        except (SlideFailure, OSError, KeyError, ValueError) as e:
            summary.failed[store.stem] = f"{store.name}: {e}"
            continue
        if res["status"] == "skipped":
            summary.skipped.append(res["slide_id"])
            continue
        summary.done.append(res["slide_id"])
        total += res["tiles"]
        nan_tiles += max(res["nan"].values())
    summary.extra["tiles updated"] = total
    summary.extra["tiles without a probability (NaN, no overlapping patch)"] = nan_tiles
    summary.extra["sources"] = "; ".join(f"{s.target}: {s.describe()}" for s in sources)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m data_prep.tumor_til", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=Path, required=True, help="folder of per-slide tile stores")
    for t, col in (("tumor", "prob_tumor"), ("til", TIL_COLUMN)):
        p.add_argument(f"--{t}-csv-dir", type=Path, help=f"wsinfer CSVs for {t} (<slide_id>.csv)")
        p.add_argument(f"--{t}-column", default=col, help=f"{t} column (default: %(default)s)")
        p.add_argument(f"--{t}-classifier", help=f"{t} classifier: TorchScript/state_dict file "
                                                 "or a JSON spec")
        p.add_argument(f"--{t}-class-index", type=non_negative_int, default=1,
                       help=f"output index of the {t}-positive class (default: %(default)s)")
    p.add_argument("--classifier-kind", choices=["torchscript", "torchvision"],
                   default="torchscript", help="model file type (default: %(default)s)")
    p.add_argument("--arch", help="torchvision architecture for --classifier-kind torchvision")
    p.add_argument("--num-classes", type=positive_int, default=2, help="classifier outputs")
    p.add_argument("--input-size", type=positive_int, default=224,
                   help="classifier input side (px)")
    p.add_argument("--classifier-mpp", type=positive_float, default=None,
                   help="um/px the classifier expects (default: feed the whole tile resized)")
    p.add_argument("--mean", type=finite_float, nargs=3, default=[0.485, 0.456, 0.406])
    p.add_argument("--std", type=positive_float, nargs=3, default=[0.229, 0.224, 0.225])
    p.add_argument("--activation", choices=["softmax", "sigmoid"], default="softmax")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="cpu", help="torch device of the classifier")
    p.add_argument("--stain-standin", action="store_true",
                   help="demo only: fill targets without another source from the labelled "
                        "stain stand-in (not a classifier)")
    p.add_argument("--overwrite", action="store_true", help="recompute existing probabilities")
    p.add_argument("--shard", default=None, help="process shard i of n ('i/n', 0-based)")
    add_logging_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        sources = build_sources(args)
        shard = parse_shard(args.shard)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    if not args.tiles.is_dir():
        raise SystemExit(f"error: --tiles {args.tiles} is not a directory")
    stores = select_shard(sorted(args.tiles.glob("*.h5")), shard)
    if not stores:
        raise SystemExit(f"error: no tile stores in {args.tiles}")
    tag = "" if args.shard is None else "-shard-{}-of-{}".format(*shard)
    try:
        with output_lock(args.tiles, tag):
            remove_stale_tmp(stores)
            broken = [p for p in stores if not is_complete_tile_store(p)]
            summary = run([p for p in stores if p not in broken], sources, args.device,
                          args.overwrite)
    except (FileNotFoundError, ValueError, RuntimeError, OutputLocked) as e:
        raise SystemExit(f"error: {e}") from e
    for p in broken:
        summary.failed[p.stem] = (f"{p}: not a complete tile store (truncated or corrupt?); "
                                  "delete it and tile its slide again")
    return summary.report()


if __name__ == "__main__":
    sys.exit(main())
