"""DSMIL's background filter (the recipe default) against DSMIL's own criterion on DeepZoom tiles.

The reference below is ``deepzoom_tiler.py`` of DSMIL (binli123/dsmil-wsi) as the authors ran it:
``DeepZoomGenerator(slide, tile_size, 0, limit_bounds=True)``, and a tile is written when
``np.mean(ImageStat.Stat(tile.filter(FIND_EDGES)).sum) / tile_size**2 > 15``. DeepZoom also
yields partial tiles at the right and bottom borders (DSMIL stretches the kept ones to full
size); the tiler keeps only full tiles, so the comparison is over the full tiles of the grid.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import ImageFilter, ImageStat
from slide_factory import write_svs

from data_prep.tile_wsi import TileConfig, main, tile_slide

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "CMU-1-Small-Region.svs"


def dsmil_decisions(path: Path, tile_size: int, downsample: float) -> dict[tuple[int, int], bool]:
    """Level-0 ``(x, y)`` -> DSMIL keeps it, for every full DeepZoom tile at ``downsample``."""
    with openslide.OpenSlide(str(path)) as slide:
        dz = DeepZoomGenerator(slide, tile_size, 0, limit_bounds=True)
        level = dz.level_count - 1 - int(round(math.log2(downsample)))
        cols, rows = dz.level_tiles[level]
        out = {}
        for row in range(rows):
            for col in range(cols):
                tile = dz.get_tile(level, (col, row))
                if tile.size != (tile_size, tile_size):
                    continue  # a partial border tile
                edge = tile.filter(ImageFilter.FIND_EDGES)
                edge = np.mean(ImageStat.Stat(edge).sum) / (tile_size ** 2)
                (x, y), _, _ = dz.get_tile_coordinates(level, (col, row))
                out[(int(x), int(y))] = bool(edge > 15)
    return out


def _tile_with_defaults(slide: Path, out: Path) -> tuple[set, dict]:
    assert main([str(slide), "--out", str(out)]) == 0  # the recipe defaults, nothing else
    with h5py.File(out / f"{slide.stem}.h5", "r") as f:
        return {tuple(int(v) for v in c) for c in f["coords"][:]}, dict(f.attrs)


def _agreement(slide: Path, out: Path) -> tuple[int, int, set, set]:
    kept, attrs = _tile_with_defaults(slide, out)
    assert attrs["tile_size"] == 448 and attrs["jpeg_quality"] == 70
    assert attrs["tissue_filter"] == "edges" and attrs["edge_threshold"] == 15
    ref = dsmil_decisions(slide, 448, float(attrs["level0_tile_size"]) / 448)
    assert attrs["grid_tiles"] == len(ref)  # the same grid
    dsmil_kept = {c for c, keep in ref.items() if keep}
    same = sum((c in kept) == keep for c, keep in ref.items())
    return same, len(ref), kept, dsmil_kept


def test_recipe_defaults_keep_dsmil_tiles_on_demo_slide(tmp_path):
    slide = tmp_path / DEMO.name
    shutil.copy(DEMO, slide)
    same, grid, kept, dsmil_kept = _agreement(slide, tmp_path / "tiles")
    assert grid == 6 and same == grid  # 2 x 3 full 448-px tiles at 10x, every decision agrees
    assert kept == dsmil_kept and 0 < len(kept) < grid  # some background is dropped


@pytest.fixture(scope="module")
def demo_region() -> np.ndarray:
    with openslide.OpenSlide(str(DEMO)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


@pytest.mark.slow  # ~12 s: writes and tiles a 4440 x 5934 slide
def test_recipe_defaults_keep_dsmil_tiles_on_larger_slide(tmp_path, demo_region):
    # a 2 x 2 mosaic of the demo region (flipped copies), 20x with a 2x level, so the 10x tiles
    # are read from level 1 without resizing; a white band adds background tiles
    top = np.concatenate([demo_region, demo_region[:, ::-1]], axis=1)
    mosaic = np.concatenate([top, top[::-1]], axis=0)
    mosaic[2000:2600] = 245
    slide = write_svs(tmp_path / "mosaic.svs", np.ascontiguousarray(mosaic), (1, 2), app_mag=20,
                      mpp=0.499, tile=256)
    same, grid, kept, dsmil_kept = _agreement(slide, tmp_path / "tiles")
    assert grid == 4 * 6 and same == grid
    assert kept == dsmil_kept and 4 < len(kept) < grid - 4


def test_summary_counts_both_criteria_and_otsu_stays(tmp_path, capsys):
    slide = tmp_path / DEMO.name
    shutil.copy(DEMO, slide)
    out = tmp_path / "otsu"
    assert main([str(slide), "--out", str(out), "--tissue-filter", "otsu",
                 "--min-tissue", "0.5"]) == 0
    text = capsys.readouterr().out
    with h5py.File(out / "CMU-1-Small-Region.h5", "r") as f:
        attrs, tissue, scores = dict(f.attrs), f["tissue"][:], f["edge_score"][:]
    assert attrs["tissue_filter"] == "otsu" and np.all(tissue >= 0.5)
    assert len(tissue) == attrs["kept_by_otsu"] and attrs["grid_tiles"] == 6
    assert attrs["kept_by_edges"] == 4  # DSMIL's count on the same grid (previous test)
    assert f"kept by edges (DSMIL: mean FIND_EDGES > 15): {attrs['kept_by_edges']}" in text
    assert f"kept by otsu (tissue >= 0.5): {attrs['kept_by_otsu']}" in text
    assert np.all(np.isfinite(scores))
    with pytest.raises(SystemExit, match=r"tissue_filter otsu \(now edges\)"):
        main([str(slide), "--out", str(out), "--min-tissue", "0.5"])  # the edges default
    # a threshold above every score keeps nothing: the slide fails with the reason
    res = tile_slide(slide, tmp_path / "none", TileConfig(edge_threshold=250.0,
                                                          show_progress=False))
    assert res["status"] == "failed"
    assert "none of its 6 tiles has an edge score above --edge-threshold 250" in res["error"]


def test_edge_threshold_is_validated(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(DEMO), "--out", str(tmp_path), "--edge-threshold", "nan"])
    assert "--edge-threshold" in capsys.readouterr().err
