"""Tiling: geometry, pixels against direct OpenSlide reads, tissue filter, failures, resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from PIL import Image
from slide_factory import tissue_image, write_generic_tiff, write_svs

from data_prep.hdf5io import decode_jpeg, encode_jpeg
from data_prep.tile_wsi import (
    TileConfig,
    main,
    otsu_threshold,
    read_tile,
    run_tiling,
    select_shard,
    slide_geometry,
    tile_slide,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def image40x() -> np.ndarray:
    """A 2048x2048 smooth tissue image (left 3/4 tissue), shared by the synthetic slides."""
    return tissue_image(2048, 2048, seed=1, tissue_fraction_x=0.75)


def _direct_tile(path: Path, x: int, y: int, l0: int, size: int) -> np.ndarray:
    """Reference: level-0 read of the same region, alpha on white, resized to ``size``."""
    with openslide.OpenSlide(str(path)) as s:
        region = s.read_region((x, y), 0, (l0, l0))
    bg = Image.new("RGBA", region.size, (255, 255, 255, 255))
    bg.alpha_composite(region)
    return np.asarray(bg.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


def _check_store(store: Path, slide: Path, l0: int, size: int, n_expected: int) -> None:
    """Count, and every tile within JPEG tolerance of the direct read of its region."""
    with h5py.File(store, "r") as f:
        coords, tiles = f["coords"][:], [decode_jpeg(t) for t in f["tiles"]]
        quality = int(f.attrs["jpeg_quality"])
        assert len(tiles) == n_expected == len(coords) == len(f["tissue"])
        assert int(f.attrs["level0_tile_size"]) == l0 and int(f.attrs["tile_size"]) == size
    errs = []
    for (x, y), got in zip(coords, tiles):
        ref = _direct_tile(slide, x, y, l0, size)
        assert got.shape == (size, size, 3)
        # tolerance: the error JPEG at the same quality makes on the reference itself
        jpeg_err = np.abs(decode_jpeg(encode_jpeg(ref, quality)) - ref.astype(np.float64)).mean()
        errs.append(np.abs(got - ref.astype(np.float64)).mean())
        assert errs[-1] <= 1.25 * jpeg_err + 1.0, f"tile at {(x, y)}: {errs[-1]:.2f}"
    # the same check against a region shifted by half a tile fails on a textured tile
    k = int(np.argmax([t.std() for t in tiles]))
    x, y = coords[k]
    with openslide.OpenSlide(str(slide)) as s:
        width = s.dimensions[0]
    x = x + l0 // 2 if x + l0 // 2 + l0 <= width else x - l0 // 2
    shifted = _direct_tile(slide, x, y, l0, size).astype(np.float64)
    assert np.abs(tiles[k] - shifted).mean() > 2.5 * errs[k] + 2


def test_demo_slide_tiles_match_direct_read(tmp_path):
    slide = tmp_path / DEMO.name
    shutil.copy(DEMO, slide)
    cfg = TileConfig(magnification=10, tile_size=256, min_tissue=0.0, jpeg_quality=90,
                     show_progress=False, tissue_filter="otsu")
    res = tile_slide(slide, tmp_path / "tiles", cfg)
    assert res["status"] == "done"
    # 20x -> 10x: 512 level-0 px per tile; 2220x2967 holds 4 x 5 full tiles
    store = tmp_path / "tiles" / "CMU-1-Small-Region.h5"
    _check_store(store, slide, 512, 256, 20)
    with h5py.File(store, "r") as f:
        xs, ys = sorted(set(f["coords"][:, 0])), sorted(set(f["coords"][:, 1]))
        assert xs == [0, 512, 1024, 1536] and ys == [0, 512, 1024, 1536, 2048]
        assert f.attrs["objective_power"] == 20 and abs(f.attrs["mpp"] - 0.499) < 1e-6
        assert f.attrs["slide_id"] == "CMU-1-Small-Region"


def test_demo_slide_overlap_and_tissue(tmp_path):
    slide = tmp_path / DEMO.name
    shutil.copy(DEMO, slide)
    cfg = TileConfig(tile_size=256, stride=128, min_tissue=0.5, show_progress=False,
                     tissue_filter="otsu")
    assert tile_slide(slide, tmp_path, cfg)["status"] == "done"
    with h5py.File(tmp_path / "CMU-1-Small-Region.h5", "r") as f:
        coords, tissue = f["coords"][:], f["tissue"][:]
    assert np.all(coords % 256 == 0)  # stride 128 at 10x = 256 level-0 px
    assert np.all(tissue >= 0.5) and len(coords) > 20  # more tiles than the 20 without overlap
    assert len(coords) < 14 * 10  # the white margins are dropped


@pytest.mark.parametrize("kind", ["svs40_level4", "svs20_single", "generic_mpp_only", "cli_mpp"])
def test_sources_tiled_at_10x(tmp_path, image40x, kind):
    if kind == "svs40_level4":  # 40x SVS with a 4x level: read at level 1 without resizing
        slide = write_svs(tmp_path / "s40.svs", image40x, (1, 4), app_mag=40, mpp=0.25)
        l0, extra = 1024, []
    elif kind == "svs20_single":  # 20x single level: read at level 0 and halve
        slide = write_svs(tmp_path / "s20.svs", image40x, (1,), app_mag=20, mpp=0.5)
        l0, extra = 512, []
    elif kind == "generic_mpp_only":  # no objective power: 0.25 um/px means 40x
        slide = write_generic_tiff(tmp_path / "g.tif", image40x, (1, 2), mpp=0.25)
        l0, extra = 1024, []
    else:  # no metadata at all: --mpp 0.5 makes it 20x
        slide = write_generic_tiff(tmp_path / "bare.tif", image40x, (1, 2, 4), mpp=None)
        l0, extra = 512, ["--mpp", "0.5"]
    with openslide.OpenSlide(str(slide)) as s:
        assert s.properties["openslide.vendor"] == ("aperio" if "svs" in kind else "generic-tiff")
    out = tmp_path / "tiles"
    rc = main([str(slide), "--out", str(out), "--tile-size", "256", "--tissue-filter", "otsu",
               "--min-tissue", "0", "--jpeg-quality", "90", *extra])
    assert rc == 0
    n_side = (2048 - l0) // l0 + 1
    _check_store(out / f"{slide.stem}.h5", slide, l0, 256, n_side * n_side)


def test_missing_magnification_is_a_clear_error(tmp_path, image40x, capsys):
    slide = write_generic_tiff(tmp_path / "bare.tif", image40x[:512, :512], (1,), mpp=None)
    assert main([str(slide), "--out", str(tmp_path / "t")]) == 1
    out = capsys.readouterr().out
    assert "bare.tif" in out and "--mpp" in out and "neither objective power" in out
    assert not (tmp_path / "t" / "bare.h5").exists()


def test_tissue_filter_keeps_tissue_tiles(tmp_path, image40x):
    slide = write_svs(tmp_path / "half.svs", image40x, (1, 4), app_mag=40, mpp=0.25)
    cfg = TileConfig(tile_size=128, min_tissue=0.0, show_progress=False, tissue_filter="otsu")
    tile_slide(slide, tmp_path / "all", cfg)
    with h5py.File(tmp_path / "all" / "half.h5", "r") as f:
        coords, tissue = f["coords"][:], f["tissue"][:]
    left = coords[:, 0] + 512 <= 1536  # tiles wholly inside the tissue (left 3/4)
    right = coords[:, 0] >= 1536
    assert tissue[left].min() > 0.9 and tissue[right].max() < 0.1
    tile_slide(slide, tmp_path / "kept", TileConfig(tile_size=128, show_progress=False,
                                                    tissue_filter="otsu"))
    with h5py.File(tmp_path / "kept" / "half.h5", "r") as f:
        kept = {tuple(c) for c in f["coords"][:]}
    assert kept == {tuple(c) for c, t in zip(coords, tissue) if t >= 0.5}


def test_transparent_outside_scan_becomes_white(tmp_path, image40x):
    slide = write_svs(tmp_path / "s.svs", image40x[:1024, :1024], (1,), app_mag=20, mpp=0.5)
    cfg = TileConfig(tile_size=256, show_progress=False)
    with openslide.OpenSlide(str(slide)) as s:
        geom = slide_geometry(s, cfg, "s.svs")
        tile = np.asarray(read_tile(s, geom, 1024 - 256, 0, 256))  # right half is off the slide
        inside = _direct_tile(slide, 1024 - 256, 0, 512, 256)
    assert np.all(tile[:, 136:] == 255)  # past the edge (128 px in, plus Lanczos support)
    assert np.abs(tile[:, :120].astype(float) - inside[:, :120]).mean() < 1.0


def test_otsu_threshold_splits_two_modes():
    values = np.concatenate([np.full(100, 10), np.full(50, 200)]).astype(np.uint8)
    assert 10 < otsu_threshold(values) < 200


def test_bad_files_reported_while_others_finish(tmp_path, image40x, capsys):
    write_svs(tmp_path / "good.svs", image40x[:1024, :1024], (1,), app_mag=20, mpp=0.5)
    data = DEMO.read_bytes()
    (tmp_path / "truncated.svs").write_bytes(data[: len(data) * 6 // 10])
    corrupt = bytearray(data)  # tile data zeroed: opens, then fails while reading tiles
    corrupt[len(data) // 10: len(data) // 2] = bytes(len(data) // 2 - len(data) // 10)
    (tmp_path / "corrupt.svs").write_bytes(bytes(corrupt))
    (tmp_path / "notes.svs").write_text("this is not a slide")
    out = tmp_path / "tiles"
    rc = main([str(tmp_path), "--out", str(out), "--workers", "2", "--tile-size", "256",
               "--tissue-filter", "otsu", "--min-tissue", "0"])
    assert rc == 1
    text = capsys.readouterr().out
    assert "1 done" in text and "3 failed" in text
    assert "truncated.svs: truncated or corrupt TIFF" in text
    assert "notes.svs: not a slide OpenSlide can read" in text
    assert "corrupt.svs: OpenSlide read error" in text
    assert sorted(p.name for p in out.iterdir()) == ["good.h5"]  # no partial or .tmp files
    with h5py.File(out / "good.h5", "r") as f:
        assert len(f["tiles"]) == 4


def test_killed_run_resumes_without_redoing(tmp_path, image40x, capsys):
    slides = [write_svs(tmp_path / f"s{i}.svs", image40x[:1024, :1024], (1,), app_mag=20)
              for i in range(3)]
    out = tmp_path / "tiles"
    cfg = TileConfig(tile_size=256, min_tissue=0.0, show_progress=False, tissue_filter="otsu")
    run_tiling(slides[:1], out, cfg)
    finished = out / "s0.h5"
    stamp = finished.stat().st_mtime_ns
    (out / "s1.h5.tmp").write_bytes(b"half-written store of a killed run")
    rc = main([str(p) for p in slides] + ["--out", str(out), "--tile-size", "256",
                                          "--tissue-filter", "otsu", "--min-tissue", "0"])
    assert rc == 0
    assert "2 done, 1 skipped" in capsys.readouterr().out
    assert finished.stat().st_mtime_ns == stamp  # not rewritten
    assert not (out / "s1.h5.tmp").exists()
    with h5py.File(out / "s1.h5", "r") as f:
        assert len(f["tiles"]) == 4


def test_shards_are_disjoint_and_cover():
    items = [f"s{i}" for i in range(7)]
    shards = [select_shard(items, (i, 3)) for i in range(3)]
    assert sorted(sum(shards, [])) == items
    assert shards[0] == ["s0", "s3", "s6"]
