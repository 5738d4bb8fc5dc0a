"""Tile whole-slide images into per-slide HDF5 stores of JPEG tiles at a target magnification.

Reads any format OpenSlide reads (SVS, generic tiled TIFF, NDPI, MRXS, SCN, BIF, VMS, ...).
For each slide: the level-0 magnification comes from the objective power, else from the microns
per pixel (magnification = 10 / mpp, the usual 10x = 1 um/px convention), else from ``--mpp``;
tiles are read from the best pyramid level for the needed downsample and resized.

The recipe default is the authors' (PathLDM tiled with DSMIL's ``deepzoom_tiler.py``): 448-px
tiles at 10x (training takes random 256 crops, evaluation centre crops), JPEG quality 70, and
DSMIL's background filter ``--tissue-filter edges``: a tile is kept when PIL's ``FIND_EDGES`` on
the RGB tile, summed per band, averaged over the bands and divided by the tile's pixel count,
exceeds ``--edge-threshold`` (15). ``--tissue-filter otsu`` keeps tiles whose tissue fraction on a
thumbnail mask (Otsu threshold on HSV saturation, clamped to a sane range) is at least
``--min-tissue``. Both criteria are evaluated on every tile of the grid, and the summary reports
how many tiles each keeps.

One store per slide is written atomically; rerunning skips slides whose store exists, so an
interrupted run resumes. A store records the settings and a fingerprint of its slide file: a
rerun with other settings is refused (nothing is redone or deleted), and a slide whose file
changed is tiled again. The output folder is locked while a run works on it (per ``--shard``),
and worker processes die with the run.

Example::

    python -m data_prep.tile_wsi slides/ --out tiles/ --workers 8 --shard 0/4
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.common import (
    OutputLocked,
    RunSummary,
    add_logging_arg,
    file_fingerprint,
    output_lock,
    parse_shard,
    remove_stale_tmp,
    select_shard,
    setup_logging,
)
from data_prep.hdf5io import (
    encode_jpeg,
    is_complete_tile_store,
    write_tile_store,
)
from data_prep.tile_rerun import settings_conflicts, slide_id_of, source_changed
from data_prep.tissue import (  # noqa: F401  (re-exported: the tiler's criteria)
    DSMIL_EDGE_THRESHOLD,
    TISSUE_FILTERS,
    edge_score,
    otsu_threshold,
    tissue_fractions,
    tissue_mask,
)
from data_prep.workers import exit_description, run_per_item
from ldm.argtypes import float_in, int_in, positive_float, positive_int, unit_float

logger = logging.getLogger(__name__)

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif",
                    ".svslide")
CRITERIA_COUNTS = ("grid_tiles", "kept_by_edges", "kept_by_otsu", "kept_by_both")


class SlideError(RuntimeError):
    """A slide that cannot be tiled; the message names the file and the reason."""


@dataclass(frozen=True)
class TileConfig:
    """How to tile: target magnification, tile geometry, tissue filter, encoding.

    The defaults are the authors' recipe: 448-px tiles at 10x, DSMIL's edge filter, quality 70.
    """

    magnification: float = 10.0
    tile_size: int = 448
    stride: int | None = None
    min_tissue: float = 0.5
    jpeg_quality: int = 70
    mpp: float | None = None
    show_progress: bool = True
    tissue_filter: str = "edges"
    edge_threshold: float = DSMIL_EDGE_THRESHOLD

    @property
    def step(self) -> int:
        """Stride in output pixels (defaults to the tile size: no overlap)."""
        return self.stride or self.tile_size


@dataclass(frozen=True)
class Geometry:
    """Where and how to read one slide's tiles."""

    objective_power: float
    mpp: float
    base_magnification: float
    downsample: float
    level: int
    level_downsample: float
    level0_tile: int
    level0_stride: int
    read_size: int
    origin: tuple[int, int]
    extent: tuple[int, int]


def _float_prop(props, key: str) -> float:
    try:
        v = float(props.get(key, "nan"))
    except ValueError:
        return math.nan
    return v if v > 0 else math.nan


def slide_geometry(slide, cfg: TileConfig, name: str) -> Geometry:
    """Level-0 magnification, downsample and best pyramid level of ``slide`` for ``cfg``."""
    import openslide

    props = slide.properties
    objective = _float_prop(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    mpp = _float_prop(props, openslide.PROPERTY_NAME_MPP_X)
    if math.isnan(mpp) and cfg.mpp:
        mpp = float(cfg.mpp)
    if not math.isnan(objective):
        base = objective
    elif not math.isnan(mpp):
        base = 10.0 / mpp
    else:
        raise SlideError(f"{name}: neither objective power nor microns per pixel is known; "
                         "pass --mpp with the level-0 microns per pixel")
    downsample = base / cfg.magnification
    if downsample < 1 - 1e-6:
        raise SlideError(f"{name}: level 0 is {base:g}x, cannot tile at {cfg.magnification:g}x "
                         "without upsampling")
    # a hair of tolerance so a level whose downsample is 4.0001 still counts for 4
    level = slide.get_best_level_for_downsample(downsample * (1 + 1e-3))
    level_ds = float(slide.level_downsamples[level])
    l0_tile = int(round(cfg.tile_size * downsample))
    l0_stride = int(round(cfg.step * downsample))
    w0, h0 = slide.dimensions
    ox = int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0))
    oy = int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0))
    ew = int(props.get(openslide.PROPERTY_NAME_BOUNDS_WIDTH, w0 - ox))
    eh = int(props.get(openslide.PROPERTY_NAME_BOUNDS_HEIGHT, h0 - oy))
    return Geometry(objective, mpp, base, downsample, level, level_ds, l0_tile, l0_stride,
                    int(round(l0_tile / level_ds)), (ox, oy), (ew, eh))


def grid_positions(geom: Geometry) -> np.ndarray:
    """Level-0 ``(x, y)`` of every full tile of the grid, row-major, shape ``(N, 2)``."""
    (ox, oy), (ew, eh) = geom.origin, geom.extent
    xs = np.arange(ox, ox + ew - geom.level0_tile + 1, geom.level0_stride, dtype=np.int64)
    ys = np.arange(oy, oy + eh - geom.level0_tile + 1, geom.level0_stride, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def read_tile(slide, geom: Geometry, x: int, y: int, tile_size: int) -> Image.Image:
    """The tile at level-0 ``(x, y)``: best-level read, alpha on white, resized to tile_size."""
    region = slide.read_region((int(x), int(y)), geom.level, (geom.read_size, geom.read_size))
    if region.getextrema()[3][0] == 255:  # fully opaque: no compositing needed
        rgb = region.convert("RGB")
    else:  # outside the scanned area: transparent pixels become white background
        background = Image.new("RGBA", region.size, (255, 255, 255, 255))
        background.alpha_composite(region)
        rgb = background.convert("RGB")
    if rgb.size != (tile_size, tile_size):
        rgb = rgb.resize((tile_size, tile_size), Image.Resampling.LANCZOS)
    return rgb


def _open_slide(path: Path):
    import openslide

    if not path.is_file():
        raise SlideError(f"{path}: file not found")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise SlideError(f"{path}: {_diagnose_unreadable(path)}") from e
    except openslide.OpenSlideError as e:
        raise SlideError(f"{path}: OpenSlide cannot open it (corrupt or truncated?): {e}") from e


def _diagnose_unreadable(path: Path) -> str:
    """Why OpenSlide rejected a file: empty, truncated TIFF, unrecognised TIFF, or not a slide."""
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with path.open("rb") as fh:
        head = fh.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 16:
        return "not a slide OpenSlide can read (unrecognised format)"
    magic = int.from_bytes(head[2:4], "little" if order == "<" else "big")
    byteorder = "little" if order == "<" else "big"
    if magic == 42:
        ifd = int.from_bytes(head[4:8], byteorder)
    elif magic == 43:
        ifd = int.from_bytes(head[8:16], byteorder)
    else:
        return "not a slide OpenSlide can read (unrecognised format)"
    if ifd >= size:
        return (f"truncated or corrupt TIFF: its first directory is at byte {ifd} but the file "
                f"has only {size} bytes")
    return ("a TIFF that OpenSlide does not recognise as a slide (not tiled, unsupported "
            "vendor variant, or corrupt)")


def tile_slide(path: Path, out_dir: Path, cfg: TileConfig, overwrite: bool = False) -> dict:
    """Tile one slide into ``out_dir/<slide_id>.h5``; returns a result record, never raises."""
    import openslide

    sid = slide_id_of(path)
    out = out_dir / f"{sid}.h5"
    t0 = time.perf_counter()
    if not overwrite and is_complete_tile_store(out):
        changed = source_changed(out, path)
        if not changed:
            return {"slide_id": sid, "status": "skipped", "tiles": 0, "seconds": 0.0}
        logger.warning("%s: %s; tiling it again", out.name, changed)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        slide = _open_slide(path)
        try:
            counts = _tile_open_slide(slide, path, out, cfg)
        finally:
            slide.close()
    except SlideError as e:
        return {"slide_id": sid, "status": "failed", "error": str(e)}
    except openslide.OpenSlideError as e:
        return {"slide_id": sid, "status": "failed",
                "error": f"{path}: OpenSlide read error (corrupt or truncated file?): {e}"}
    except Exception as e:  # keep the other slides going whatever happens to this one
        logger.debug("tiling %s failed", path, exc_info=True)
        return {"slide_id": sid, "status": "failed", "error": f"{path}: {type(e).__name__}: {e}"}
    return {"slide_id": sid, "status": "done", **counts, "seconds": time.perf_counter() - t0}


def _tile_open_slide(slide, path: Path, out: Path, cfg: TileConfig) -> dict[str, int]:
    """Tile an open slide into ``out``; returns the tile counts of the grid and each criterion."""
    sid = slide_id_of(path)
    geom = slide_geometry(slide, cfg, str(path))
    coords = grid_positions(geom)
    tissue = tissue_fractions(slide, geom, coords) if len(coords) else np.zeros(0, np.float32)
    otsu_keep = tissue >= cfg.min_tissue
    # every grid tile is read: the edge criterion needs its pixels, and the summary compares the
    # two criteria over the whole grid
    scores = np.zeros(len(coords), np.float32)
    tiles, kept = [], []
    bar = tqdm(coords, desc=sid, unit="tile", leave=False, disable=not cfg.show_progress)
    for i, (x, y) in enumerate(bar):
        tile = read_tile(slide, geom, x, y, cfg.tile_size)
        scores[i] = edge_score(tile)
        keep = scores[i] > cfg.edge_threshold if cfg.tissue_filter == "edges" else otsu_keep[i]
        if keep:
            tiles.append(encode_jpeg(tile, cfg.jpeg_quality))
            kept.append(i)
    edges_keep = scores > cfg.edge_threshold
    counts = {"grid_tiles": len(coords), "kept_by_edges": int(edges_keep.sum()),
              "kept_by_otsu": int(otsu_keep.sum()),
              "kept_by_both": int((edges_keep & otsu_keep).sum())}
    logger.info("%s: %s, level %d (downsample %.3f), %d of %d tiles kept by %s (edges > %g: %d, "
                "otsu tissue >= %.2f: %d)", sid,
                f"{geom.base_magnification:g}x -> {cfg.magnification:g}x", geom.level,
                geom.level_downsample, len(kept), len(coords), cfg.tissue_filter,
                cfg.edge_threshold, counts["kept_by_edges"], cfg.min_tissue,
                counts["kept_by_otsu"])
    if not kept:
        raise SlideError(_no_tiles_reason(path, geom, scores, tissue, cfg))
    kept = np.asarray(kept, dtype=np.int64)
    attrs = {
        "slide_id": sid, "source_file": path.name, "mpp": geom.mpp,
        "objective_power": geom.objective_power, "magnification": cfg.magnification,
        "tile_size": cfg.tile_size, "stride": cfg.step, "level0_tile_size": geom.level0_tile,
        "level0_stride": geom.level0_stride, "read_level": geom.level,
        "jpeg_quality": cfg.jpeg_quality, "min_tissue": cfg.min_tissue,
        "tissue_filter": cfg.tissue_filter, "edge_threshold": cfg.edge_threshold,
        "slide_width": slide.dimensions[0], "slide_height": slide.dimensions[1], **counts,
        "source_fingerprint": file_fingerprint(path),
    }
    write_tile_store(out, tiles, coords[kept], tissue[kept], attrs,
                     extra={"edge_score": scores[kept]})
    return {"tiles": len(tiles), **counts}


def _no_tiles_reason(path: Path, geom: Geometry, scores: np.ndarray, tissue: np.ndarray,
                     cfg: TileConfig) -> str:
    """Why a slide gave no tile: smaller than one tile, or no tile passes the tissue filter."""
    if len(scores) == 0:
        w, h = geom.extent
        return (f"{path}: the slide ({w}x{h} level-0 px) is smaller than one tile "
                f"({geom.level0_tile} level-0 px for --tile-size {cfg.tile_size} at "
                f"{cfg.magnification:g}x); use a smaller --tile-size or a lower --magnification")
    if cfg.tissue_filter == "edges":
        return (f"{path}: none of its {len(scores)} tiles has an edge score above "
                f"--edge-threshold {cfg.edge_threshold:g} (most: {float(scores.max()):.2f}); "
                "lower --edge-threshold if this slide has tissue")
    return (f"{path}: none of its {len(tissue)} tiles has tissue >= --min-tissue "
            f"{cfg.min_tissue:g} (most: {float(tissue.max()):.2f}); lower --min-tissue if this "
            "slide has tissue")


def discover_slides(inputs: list[Path], slide_list: Path | None = None) -> list[Path]:
    """Slide files from files, directories (searched recursively) and an optional list file."""
    paths: list[Path] = []
    for p in inputs:
        if p.is_dir():
            paths += [f for f in p.rglob("*")
                      if f.is_file() and f.suffix.lower() in SLIDE_EXTENSIONS]
        else:
            paths.append(p)
    if slide_list is not None:
        lines = slide_list.read_text(encoding="utf-8").splitlines()
        paths += [Path(s.strip()) for s in lines if s.strip() and not s.startswith("#")]
    paths = sorted(set(paths))
    seen: dict[str, Path] = {}
    for p in paths:
        sid = slide_id_of(p)
        if sid in seen:
            raise ValueError(f"two slides share the id {sid!r}: {seen[sid]} and {p}")
        seen[sid] = p
    return paths


def run_tiling(paths: list[Path], out_dir: Path, cfg: TileConfig, workers: int = 1,
               overwrite: bool = False, log_level: str = "INFO") -> RunSummary:
    """Tile ``paths`` into ``out_dir`` with ``workers`` processes; returns the run summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary("tile_wsi")
    t0 = time.perf_counter()
    total_tiles, tile_seconds = 0, 0.0
    counts = dict.fromkeys(CRITERIA_COUNTS, 0)
    bar = tqdm(total=len(paths), desc="slides", unit="slide")
    for res in _iter_results(paths, out_dir, cfg, workers, overwrite, log_level):
        bar.update(1)
        if res["status"] == "done":
            summary.done.append(res["slide_id"])
            total_tiles += res["tiles"]
            tile_seconds += res["seconds"]
            for key in counts:
                counts[key] += res[key]
            bar.set_postfix(tiles=total_tiles)
        elif res["status"] == "skipped":
            summary.skipped.append(res["slide_id"])
        else:
            summary.failed[res["slide_id"]] = res["error"]
    bar.close()
    wall = time.perf_counter() - t0
    summary.extra.update({
        "tiles written": total_tiles,
        "tissue filter": cfg.tissue_filter,
        "grid tiles (tiled slides)": counts["grid_tiles"],
        f"kept by edges (DSMIL: mean FIND_EDGES > {cfg.edge_threshold:g})":
            counts["kept_by_edges"],
        f"kept by otsu (tissue >= {cfg.min_tissue:g})": counts["kept_by_otsu"],
        "kept by both": counts["kept_by_both"],
        "wall time (s)": round(wall, 2),
        "throughput (tiles/s, wall)": round(total_tiles / wall, 1) if wall > 0 else 0.0,
        "throughput (tiles/s per worker)": (round(total_tiles / tile_seconds, 1)
                                            if tile_seconds > 0 else 0.0),
        "output": str(out_dir),
    })
    return summary


def _iter_results(paths, out_dir, cfg, workers, overwrite, log_level):
    if workers <= 1:
        for p in paths:
            yield tile_slide(p, out_dir, cfg, overwrite)
        return
    quiet = TileConfig(**{**asdict(cfg), "show_progress": False})
    fn = functools.partial(tile_slide, out_dir=out_dir, cfg=quiet, overwrite=overwrite)
    for path, result, code in run_per_item(fn, paths, workers, log_level):
        yield result if result is not None else {
            "slide_id": slide_id_of(path), "status": "failed",
            "error": f"{path}: the worker process died while tiling this slide "
                     f"({exit_description(code)}; out of memory, or a crash in the slide "
                     "reader?)"}


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m data_prep.tile_wsi", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", type=Path,
                   help="slide files and/or directories (searched recursively for "
                        + ", ".join(SLIDE_EXTENSIONS) + ")")
    p.add_argument("--out", required=True, type=Path, help="output directory of <slide_id>.h5")
    p.add_argument("--slide-list", type=Path, help="text file with one slide path per line")
    p.add_argument("--magnification", type=positive_float, default=10.0,
                   help="target magnification of the tiles (default: %(default)s)")
    p.add_argument("--tile-size", type=positive_int, default=448,
                   help="tile side in pixels at the target magnification (default: %(default)s, "
                        "the authors' tiles, from which training takes random 256 crops and "
                        "evaluation centre crops; 256 tiles the model's input size exactly)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="step between tiles in output pixels (default: tile size, no overlap)")
    p.add_argument("--tissue-filter", choices=TISSUE_FILTERS, default="edges",
                   help="background filter: 'edges' is DSMIL's (mean FIND_EDGES of the tile > "
                        "--edge-threshold), the authors' recipe; 'otsu' keeps tiles with at "
                        "least --min-tissue tissue on an Otsu saturation mask "
                        "(default: %(default)s)")
    p.add_argument("--edge-threshold", type=float_in(0.0, 255.0),
                   default=DSMIL_EDGE_THRESHOLD,
                   help="edges filter: keep tiles whose edge score exceeds this "
                        "(default: %(default)s, DSMIL's)")
    p.add_argument("--min-tissue", type=unit_float, default=0.5,
                   help="otsu filter: minimum tissue fraction of a kept tile; 0 keeps all "
                        "(default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int_in(1, 100), default=70,
                   help="JPEG quality (default: %(default)s, DSMIL's and the authors')")
    p.add_argument("--mpp", type=positive_float, default=None,
                   help="level-0 microns per pixel for slides that record neither objective "
                        "power nor mpp (ignored for slides that do)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="parallel slide processes (one process per slide)")
    p.add_argument("--shard", default=None,
                   help="process only shard i of n ('i/n', 0-based) of the sorted slide list")
    p.add_argument("--overwrite", action="store_true", help="redo slides that are already tiled")
    add_logging_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --out {args.out} is a file, not a folder")
    try:
        paths = discover_slides(args.inputs, args.slide_list)
        paths = select_shard(paths, parse_shard(args.shard))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    if not paths:
        raise SystemExit("error: no slides found in the inputs")
    cfg = TileConfig(args.magnification, args.tile_size, args.stride, args.min_tissue,
                     args.jpeg_quality, args.mpp, tissue_filter=args.tissue_filter,
                     edge_threshold=args.edge_threshold)
    logger.info("tiling %d slides into %s (%s)", len(paths), args.out, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.shard is None else "-shard-{}-of-{}".format(*parse_shard(args.shard))
    try:
        with output_lock(args.out, tag):
            remove_stale_tmp(args.out / f"{slide_id_of(p)}.h5" for p in paths)
            conflicts = [] if args.overwrite else settings_conflicts(paths, args.out, cfg)
            if conflicts:
                raise SystemExit(
                    f"error: {len(conflicts)} store(s) in {args.out} were tiled with other "
                    f"settings ({conflicts[0]}{'; ...' if len(conflicts) > 1 else ''}); use "
                    "another --out, the same settings, or --overwrite to tile them again")
            summary = run_tiling(paths, args.out, cfg, args.workers, args.overwrite,
                                 args.log_level)
    except OutputLocked as e:
        raise SystemExit(f"error: {e}") from e
    return summary.report()


if __name__ == "__main__":
    sys.exit(main())
