"""Caption adherence check: stand-in statistics, level gaps and the JSON report."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed
from tcga_store import write_store

from data_prep.tumor_til import stain_standin
from ldm.data.stain import hematoxylin_stats
from ldm.evaluation.adherence import check_adherence, compare, format_report

PINK = (235, 170, 210)
PURPLE = (100, 50, 150)


def _tile(colour, dots: bool = False, size: int = 16) -> np.ndarray:
    tile = np.full((size, size, 3), colour, np.uint8)
    if dots:
        tile[::4, ::4] = (40, 20, 90)  # small dark nuclei: high hematoxylin contrast
    return tile


def test_stats_are_rgb2hed_and_shared_with_the_standin_labels():
    tiles = [_tile(PINK), _tile(PURPLE), _tile(PINK, dots=True)]
    h = rgb2hed(tiles[2])[..., 0]
    mean, contrast = hematoxylin_stats(tiles[2])
    assert mean == pytest.approx(h.mean())
    assert contrast == pytest.approx(np.percentile(h, 99) - np.percentile(h, 50))
    tumor, til = stain_standin(tiles)
    stats = np.array([hematoxylin_stats(t) for t in tiles])
    assert list(np.argsort(tumor)) == list(np.argsort(stats[:, 0]))
    assert list(np.argsort(til)) == list(np.argsort(stats[:, 1]))


def _levels(high_tumor: bool, high_til: bool) -> dict:
    return {"tumor": "high" if high_tumor else "low", "til": "high" if high_til else "low"}


def _sample_folder(folder, tiles_by_level: dict, same_seeds: bool = False) -> None:
    """A folder in scripts/sample.py's format (PNGs + metadata.json with levels); with
    ``same_seeds`` every combination's j-th image has seed j (as ``--all-levels``)."""
    folder.mkdir()
    images = []
    for (tumor, til), tiles in tiles_by_level.items():
        for j, tile in enumerate(tiles):
            name = f"{len(images):05d}.png"
            Image.fromarray(tile).save(folder / name)
            images.append({"file": name, "prompt": f"{tumor} tumor; {til} til; s",
                           "tumor": tumor, "til": til, "seed": j if same_seeds else len(images)})
    (folder / "metadata.json").write_text(json.dumps({"images": images, "grid": "grid.png"}))


def test_check_passes_when_samples_follow_the_levels_and_fails_otherwise(tmp_path):
    real = [_tile(PINK), _tile(PINK, True), _tile(PURPLE), _tile(PURPLE, True)]
    store = write_store(tmp_path / "train.h5", real, [0] * 4, [0.1, 0.2, 0.8, 0.9],
                        [0.1, 0.9, 0.2, 0.8], ["TCGA-00"], [["s"]])
    follows = {("low", "low"): [real[0]] * 2, ("low", "high"): [real[1]] * 2,
               ("high", "low"): [real[2]] * 2, ("high", "high"): [real[3]] * 2}
    _sample_folder(tmp_path / "good", follows)
    report = check_adherence(store, tmp_path / "good", tmp_path / "good" / "adherence.json")
    assert report["tumor"]["ratio"] == pytest.approx(1.0, abs=0.05)
    assert report["til"]["right_direction"] and report["passed"]
    assert report["tumor"]["generated"]["n"] == {"low": 4, "high": 4}
    saved = json.loads((tmp_path / "good" / "adherence.json").read_text())
    assert saved["tumor"]["real_gap"] == pytest.approx(report["tumor"]["real_gap"])
    assert format_report(report).endswith("PASS")

    ignores = {k: [real[0]] * 2 for k in follows}  # the same image whatever the caption
    _sample_folder(tmp_path / "bad", ignores)
    report = check_adherence(store, tmp_path / "bad")
    assert report["tumor"]["ratio"] == 0 and not report["passed"]
    assert format_report(report).endswith("FAIL")


def test_same_seed_pairs_isolate_each_level(tmp_path):
    real = [_tile(PINK), _tile(PINK, True), _tile(PURPLE), _tile(PURPLE, True)]
    store = write_store(tmp_path / "train.h5", real, [0] * 4, [0.1, 0.2, 0.8, 0.9],
                        [0.1, 0.9, 0.2, 0.8], ["TCGA-00"], [["s"]])
    # seed 0 follows both levels; seed 1 ignores the TIL level (dots whatever it says)
    tiles = {("low", "low"): [real[0], real[1]], ("low", "high"): [real[1], real[1]],
             ("high", "low"): [real[2], real[3]], ("high", "high"): [real[3], real[3]]}
    _sample_folder(tmp_path / "s", tiles, same_seeds=True)
    report = check_adherence(store, tmp_path / "s")
    stats = {k: hematoxylin_stats(v[0]) for k, v in tiles.items()}
    til = report["til"]["paired"]
    assert til["n"] == 4 and til["positive_share"] == 0.5  # two seed-0 pairs move, seed 1 not
    expected = [stats[(t, "high")][1] - stats[(t, "low")][1] for t in ("low", "high")] + [0, 0]
    assert til["mean"] == pytest.approx(np.mean(expected))
    assert til["sem"] == pytest.approx(np.std(expected, ddof=1) / 2)
    tumor = report["tumor"]["paired"]
    assert tumor["n"] == 4 and tumor["positive_share"] == 1.0
    assert "same-seed pairs: 4" in format_report(report)
    # unique seeds (no pairs): reported as none, and the report still prints
    _sample_folder(tmp_path / "u", tiles)
    assert check_adherence(store, tmp_path / "u")["til"]["paired"]["n"] == 0


def test_compare_needs_half_the_real_tumor_gap_and_the_til_sign():
    def stats(tumor_gap, til_gap):
        return {"tumor": {"statistic": "m", "low": 0.02, "high": 0.02 + tumor_gap},
                "til": {"statistic": "c", "low": 0.1, "high": 0.1 + til_gap}}

    assert compare(stats(0.03, 0.05), stats(0.016, 0.001))["passed"]
    assert not compare(stats(0.03, 0.05), stats(0.014, 0.001))["passed"]
    assert not compare(stats(0.03, 0.05), stats(0.02, -0.001))["til"]["passed"]


def test_sample_folder_without_levels_is_a_clear_error(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "metadata.json").write_text(json.dumps({"images": [{"file": "x.png"}]}))
    with pytest.raises(ValueError, match="no image has tumor/TIL levels"):
        check_adherence(tmp_path / "none.h5", tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        check_adherence(tmp_path / "none.h5", tmp_path)
