"""Large images: joint canvas sampling, layouts, tiled decoding, pyramidal TIFF, seam metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_loader import load_script
from tiny_ldm import build_tiny_model, save_checkpoint, tiny_model_config

from ldm.layout import Layout, layout_from_store, read_layout, window_cells
from ldm.models.diffusion.multidiffusion import (
    WindowAverager,
    axis_starts,
    joint_eps,
    overlap_pixels,
    window_grid,
)

SUMMARY = "invasive ductal carcinoma, grade 2"


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, tiny_clip_dir) -> Path:
    """A tiny text-conditional LDM checkpoint (8x8 latent windows, 16-px images) with EMA."""
    cfg = tiny_model_config(tiny_clip_dir, use_ema=True)
    path = tmp_path_factory.mktemp("large") / "tiny.ckpt"
    return save_checkpoint(build_tiny_model(cfg, seed=1), path, {"model": cfg})


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("weighting,eta", [
    ("uniform", 0.0), pytest.param("gaussian", 0.5, marks=pytest.mark.slow)])
def test_one_window_is_sample_py_bitwise(text_ckpt, tmp_path, weighting, eta):
    """A canvas of exactly one window gives sample.py's first image for the same seed."""
    common = ["--ckpt", str(text_ckpt), "--tumor", "high", "--til", "low", "--summary", SUMMARY,
              "--steps", "3", "--seed", "5", "--eta", str(eta), "--device", "cpu"]
    load_script("sample").main([*common, "--n", "1", "--outdir", str(tmp_path / "ref")])
    meta = load_script("sample_large").main([*common, "--size", "16", "16", "--weighting",
                                             weighting, "--outdir", str(tmp_path / "big")])
    assert meta["windows"] == [[0, 0]] and meta["seam_score"] is None
    big, ref = _png(tmp_path / "big" / "image.png"), _png(tmp_path / "ref" / "00000.png")
    assert big.shape == (16, 16, 3) and np.array_equal(big, ref)


@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.5, 6])
def test_overlap_average_is_exact_when_windows_agree(weighting, overlap):
    """Every window predicting the same value (constant, or a function of x) averages to it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 37, 23, generator=g)
    windows = window_grid(37, 23, 8, overlap_pixels(overlap, 8))
    avg = WindowAverager(37, 23, windows, 8, weighting)
    for denoise in (lambda x, t, c: torch.full_like(x, 0.1234567),
                    lambda x, t, c: torch.sin(3 * x) + c.view(-1, 1, 1, 1)):
        out = joint_eps(denoise, x, 10, windows, avg, lambda idx: torch.full((len(idx),), 0.3),
                        lambda n: torch.zeros(n), scale=1.75, batch=5)
        expected = denoise(x, None, torch.zeros(1)) + 1.75 * (
            denoise(x, None, torch.full((1,), 0.3)) - denoise(x, None, torch.zeros(1)))
        assert torch.equal(out, expected)


def test_overlap_average_weights_disagreeing_windows():
    """Window i predicting i: uniform weights give the mean of the windows covering a pixel."""
    windows = window_grid(8, 14, 8, 2)  # two windows side by side, sharing columns 6 and 7
    assert windows == [(0, 0), (0, 6)]
    avg = WindowAverager(8, 14, windows, 8, "uniform")
    out = joint_eps(lambda x, t, c: c.view(-1, 1, 1, 1).expand_as(x).clone(),
                    torch.zeros(1, 1, 8, 14), 0, windows, avg,
                    lambda idx: torch.tensor(idx, dtype=torch.float32), batch=1)
    assert torch.equal(out[0, 0, 0], torch.tensor([0.0] * 6 + [0.5] * 2 + [1.0] * 6))
    gauss = WindowAverager(8, 14, windows, 8, "gaussian")
    out = joint_eps(lambda x, t, c: c.view(-1, 1, 1, 1).expand_as(x).clone(),
                    torch.zeros(1, 1, 8, 14), 0, windows, gauss,
                    lambda idx: torch.tensor(idx, dtype=torch.float32), batch=2)
    row = out[0, 0, 0]
    assert row[6] < 0.5 < row[7] and torch.all(row[1:] >= row[:-1])  # nearer centre wins


def test_window_grid_covers_the_canvas_with_the_overlap():
    assert axis_starts(8, 8, 2) == [0]
    for length, overlap in [(37, 2), (64, 4), (100, 0), (9, 7)]:
        starts = axis_starts(length, 8, overlap)
        assert starts[0] == 0 and starts[-1] == length - 8
        assert all(0 < b - a <= 8 - overlap for a, b in zip(starts, starts[1:]))
    assert overlap_pixels(0.25, 64) == 16 and overlap_pixels(16, 64) == 16
    for bad in (1.5, 64, -0.1):
        with pytest.raises(ValueError, match="overlap"):
            overlap_pixels(bad, 64)
    with pytest.raises(ValueError, match="smaller than"):
        axis_starts(7, 8, 2)


def test_two_region_layout_gives_each_window_its_caption(text_ckpt, tmp_path):
    """Left half high tumor/low TIL, right half low/high: windows take the caption under them."""
    import argparse

    from ldm.checkpoint import load_model

    sample_large = load_script("sample_large")
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"summary": SUMMARY, "grid": [["high/low", "low/high"]]}))
    model = load_model(text_ckpt).model
    windows = window_grid(8, 32, 8, 2)
    args = argparse.Namespace(layout=layout, layout_from=None, summary=None, slide=None,
                              region=None, layout_mode="centre", prompt=None, tumor=None,
                              til=None, class_label=None)
    plan = sample_large.plan_regions(args, "text", windows, 8, (8, 32))
    assert plan["conditions"] == [f"high tumor; low til; {SUMMARY}",
                                  f"low tumor; high til; {SUMMARY}"]
    cond_for, uncond_for = sample_large.window_conditioning(model, plan)
    with torch.no_grad():
        left, right = (model.get_learned_conditioning([c]) for c in plan["conditions"])
        assert not torch.equal(left, right)
        for i, (_, x) in enumerate(windows):
            assert torch.equal(cond_for([i]), left if x + 4 < 16 else right), (i, x)
        both = cond_for(list(range(len(windows))))
        assert both.shape[0] == len(windows) and uncond_for(3).shape[0] == 3
    args.layout_mode = "blend"
    plan = sample_large.plan_regions(args, "text", windows, 8, (8, 32))
    straddling = [w for w in plan["windows"] if len(w) == 2]
    assert straddling and all(abs(sum(s for _, s in w) - 1) < 1e-12 for w in straddling)
    cond_for, _ = sample_large.window_conditioning(model, plan)
    k = plan["windows"].index(straddling[0])
    (_, a), (_, b) = straddling[0]
    assert torch.allclose(cond_for([k]), a * left + b * right)
    from ldm.models.diffusion.multidiffusion import blend_cond

    mixed = blend_cond([{"c": [left]}, {"c": [right]}], [0.25, 0.75])
    assert torch.equal(mixed["c"][0], 0.25 * left + 0.75 * right)


def test_layout_files_and_store(tmp_path):
    """CSV, PNG mask and a real slide's tiles give the same kind of grid."""
    (tmp_path / "l.csv").write_text("high/low,0\n3,low/high\n")
    assert read_layout(tmp_path / "l.csv", "s").grid == [[("high", "low"), ("low", "low")],
                                                         [("high", "high"), ("low", "high")]]
    mask = np.array([[[255, 0, 0], [0, 255, 0]], [[255, 255, 255], [0, 0, 0]]], np.uint8)
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert read_layout(tmp_path / "m.png").grid == [[("high", "low"), ("low", "high")],
                                                    [("high", "high"), ("low", "low")]]
    (tmp_path / "bad.csv").write_text("high/low,medium/low\n")
    with pytest.raises(ValueError, match="bad.csv row 1 column 2"):
        read_layout(tmp_path / "bad.csv")
    lay = Layout([[("high", "low"), ("low", "high")]])
    assert window_cells(lay, (0, 0, 8, 8), (8, 32)) == [(("high", "low"), 1.0)]
    assert window_cells(lay, (0, 12, 8, 8), (8, 32), "blend") == [(("high", "low"), 0.5),
                                                                  (("low", "high"), 0.5)]

    from tcga_store import write_store

    from ldm.evaluation.images import SplitStore

    tiles = [np.zeros((8, 8, 3), np.uint8)] * 4
    path = write_store(tmp_path / "s.h5", tiles, [0, 0, 0, 1], [0.9, 0.1, float("nan"), 0.9],
                       [0.2, 0.8, 0.5, 0.9], ["A", "B"], [["summary of A"], ["b"]])
    import h5py

    with h5py.File(path, "a") as f:
        f["coords"][...] = [[1000, 2000], [1512, 2000], [1000, 2512], [0, 0]]
    store = SplitStore(path, patch_size=None)
    got = layout_from_store(store, "A", (1000, 2000, 1024, 1024))
    assert got.summary == "summary of A"
    # the tile without probabilities (bottom left) takes its nearest known cell's levels
    assert got.grid == [[("high", "low"), ("low", "high")], [("high", "low"), ("low", "high")]]
    with pytest.raises(KeyError, match="no slide 'C'"):
        layout_from_store(store, "C", (0, 0, 10, 10))


def test_pyramid_tiff_opens_in_openslide(tmp_path):
    """Size, levels, mpp and pixels as OpenSlide reads them (lossless tiles)."""
    import openslide

    from ldm.pyramid_tiff import write_pyramid_tiff

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    levels = write_pyramid_tiff(tmp_path / "x.tiff", image, mpp=1.0, magnification=10)
    assert levels == [(600, 400), (300, 200), (150, 100)]
    slide = openslide.OpenSlide(tmp_path / "x.tiff")
    assert slide.properties["openslide.vendor"] == "aperio"
    assert slide.dimensions == (600, 400) and slide.level_count == 3
    assert slide.level_dimensions == ((600, 400), (300, 200), (150, 100))
    assert float(slide.properties["openslide.mpp-x"]) == 1.0
    assert float(slide.properties["openslide.mpp-y"]) == 1.0
    assert float(slide.properties["openslide.objective-power"]) == 10
    region = np.asarray(slide.read_region((0, 0), 0, (600, 400)).convert("RGB"))
    assert np.array_equal(region, image)
    slide.close()


def test_tiled_decode_stays_near_a_whole_decode(text_ckpt):
    """Tiles of 32 latent px (16 shared) vs one decode of an encoded 80x48 tissue image.

    Stated tolerance, on this tiny random decoder (whose GroupNorm, mid attention and receptive
    field make tiles differ more than a trained one): mean absolute difference below 4 uint8
    levels, maximum below 64. The demo's trained decoder at the defaults (64/16) measures 1.3
    and 7.3 (docs/benchmarks.md).
    """
    from slide_factory import tissue_image

    from ldm.checkpoint import load_model
    from ldm.models.tiled_decode import decode_tiled

    model = load_model(text_ckpt).model
    image = torch.from_numpy(tissue_image(80, 48, seed=0)).permute(2, 0, 1)[None]
    decoder = model.first_stage_model.decoder
    with torch.no_grad():
        z = model.encode_first_stage(image.float() / 127.5 - 1)
        whole = model.decode_first_stage(z)
        tiled = decode_tiled(model.decode_first_stage, z, 2, tile=32, overlap=16,
                             norm_module=decoder)
        one = decode_tiled(model.decode_first_stage, z, 2, tile=40, norm_module=decoder)
    assert torch.equal(one, whole)  # fits in one tile: the whole decode itself
    assert tiled.shape == whole.shape == (1, 3, 80, 48)
    diff = (tiled - whole).abs() * 127.5
    assert diff.mean() < 4 and diff.max() < 64, (diff.mean(), diff.max())
    assert not any("forward" in vars(m) for m in decoder.modules())  # patched only meanwhile


def test_seam_score_sees_steps_at_window_borders():
    from ldm.evaluation.large_images import random_crops, seam_score, window_borders

    rng = np.random.default_rng(0)
    smooth = rng.normal(128, 5, (64, 64, 3))
    borders = window_borders([0, 6, 12], 8, 20, 4)
    assert borders == [24, 32, 48, 56]
    seamed = smooth.copy()
    for b in borders:
        seamed[:, b:] += 20
    assert abs(seam_score(smooth, borders, [], period=4)["ratio"] - 1) < 0.2
    assert seam_score(seamed, borders, [], period=4)["ratio"] > 2
    crops = random_crops([seamed.astype(np.uint8)], 5, crop=16, seed=1)
    assert len(crops) == 5 and all(c.shape == (16, 16, 3) for c in crops)
    assert all(np.array_equal(a, b) for a, b in zip(crops, random_crops(
        [seamed.astype(np.uint8)], 5, crop=16, seed=1)))


def test_layout_run_writes_png_tiff_and_metadata(text_ckpt, tmp_path):
    """A 48x32 canvas, two regions blended, as PNG and OpenSlide-readable TIFF with metadata."""
    import argparse

    import openslide

    (tmp_path / "layout.csv").write_text("high/low,low/high\n")
    meta = load_script("sample_large").main([
        "--ckpt", str(text_ckpt), "--size", "48", "32", "--layout", str(tmp_path / "layout.csv"),
        "--summary", SUMMARY, "--layout-mode", "blend", "--steps", "2", "--batch", "12",
        "--tiff", "--check-decode", "--decode-tile", "16", "--decode-overlap", "8", "--device",
        "cpu", "--outdir", str(tmp_path / "out")])
    png = _png(tmp_path / "out" / "image.png")
    assert png.shape == (32, 48, 3) and meta["outputs"] == ["image.png", "image.tiff"]
    assert len(meta["windows"]) == 3 * 4 and meta["latent_size"] == [24, 16]
    assert meta["layout"]["grid"] == [["high/low", "low/high"]]
    assert meta["conditions"] == [f"high tumor; low til; {SUMMARY}",
                                  f"low tumor; high til; {SUMMARY}"]
    assert set(meta["seam_score"]) == {"border", "inside", "ratio"} and meta["peak_rss_mib"] > 0
    check = meta["decode_check"]  # two 16-px tiles across: a tiled decode, measured
    assert 0 < check["mean_abs_levels"] <= check["max_abs_levels"] <= 255
    saved = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert saved["window_regions"] == json.loads(json.dumps(meta["window_regions"]))
    slide = openslide.OpenSlide(tmp_path / "out" / "image.tiff")
    assert slide.dimensions == (48, 32) and float(slide.properties["openslide.mpp-x"]) == 1.0
    assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (48, 32)).convert("RGB")), png)
    slide.close()
    for size, match in [((33, 32), "multiples of 2"), ((14, 32), "at least that")]:
        with pytest.raises(ValueError, match=match):
            load_script("sample_large").canvas_shape(argparse.Namespace(size=size), 2, 8)


@pytest.mark.slow  # Inception on 16 images: the default run's time budget is nearly full
def test_crop_fid_prefers_crops_of_the_same_tissue(tmp_path):
    """Crop-FID (the Fréchet distance of metrics.py on Inception features, random weights)."""
    from slide_factory import tissue_image
    from test_fid import random_fid_inception_state_dict

    from ldm.evaluation.large_images import ArrayImages, crop_fid, random_crops

    weights = tmp_path / "inception.pth"
    torch.save(random_fid_inception_state_dict(), weights)
    large = [tissue_image(96, 96, seed=s) for s in range(2)]
    real = random_crops([tissue_image(96, 96, seed=s) for s in range(2, 4)], 8, 32, seed=5)
    shifted = [np.clip(r.astype(int) + 60, 0, 255).astype(np.uint8) for r in real]
    same = crop_fid(large, ArrayImages(real), n_crops=8, crop=32, dims=64,
                    inception_weights=weights)
    other = crop_fid(large, ArrayImages(shifted), n_crops=8, crop=32, dims=64,
                     inception_weights=weights)
    assert same["n_crops"] == 8 and same["n_real"] == 8
    assert 0 <= same["crop_fid"] < other["crop_fid"]


def test_class_model_takes_a_layout_of_classes(tmp_path):
    """A PNG mask on a class-conditional model: each window gets its region's class label."""
    import argparse

    from ldm.data.captions import conditioning_batch

    model = build_tiny_model(tiny_model_config(None), seed=2).eval()
    mask = np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8)  # high/low | low/high
    Image.fromarray(mask).save(tmp_path / "mask.png")
    sample_large = load_script("sample_large")
    args = argparse.Namespace(layout=tmp_path / "mask.png", layout_from=None, summary=None,
                              slide=None, region=None, layout_mode="centre", prompt=None,
                              tumor=None, til=None, class_label=None)
    windows = window_grid(8, 32, 8, 2)
    plan = sample_large.plan_regions(args, "class", windows, 8, (8, 32))
    assert plan["conditions"] == [2, 1]
    cond_for, _ = sample_large.window_conditioning(model, plan)
    with torch.no_grad():
        two, one = (model.get_conditioning(conditioning_batch([c])) for c in (2, 1))
        assert torch.equal(cond_for([0]), two) and torch.equal(cond_for([len(windows) - 1]), one)
