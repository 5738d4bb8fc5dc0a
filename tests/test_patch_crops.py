"""448-px recipe tiles: random 256 crops in training, centre 256 crops in every evaluation reader,
tumor/TIL probabilities over the whole 448-px area."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from tcga_store import one_tile_with_wsinfer_csv, write_store

from data_prep.hdf5io import decode_jpeg, encode_jpeg
from data_prep.tile_wsi import TileConfig, build_parser
from data_prep.tumor_til import main as tumor_til_main
from ldm.data.patches import PATCH_SIZE, crop_origin
from ldm.data.tcga import TCGAPatchDataset
from ldm.evaluation.cas import labelled_dataset
from ldm.evaluation.images import SplitStore, open_images


def _gradient_tiles(n: int, size: int = 448) -> list[np.ndarray]:
    """Tiles whose every pixel encodes its position, so a crop's offset can be read back."""
    yy, xx = np.mgrid[0:size, 0:size]
    return [np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1),
                      np.full_like(xx, 40 * i)], -1).astype(np.uint8) for i in range(n)]


@pytest.fixture()
def store448(tmp_path):
    tiles = _gradient_tiles(3)
    path = write_store(tmp_path / "train.h5", tiles, [0, 0, 0], [0.2, 0.7, 0.9],
                       [0.1, 0.6, 0.3], ["S1"], [["a summary"]])
    return path, tiles


def test_recipe_defaults_are_448_tiles_and_256_patches():
    assert TileConfig().tile_size == 448 and build_parser().parse_args(
        ["--out", "x"]).tile_size == 448
    assert build_parser().parse_args(["--out", "x", "--tile-size", "256"]).tile_size == 256
    assert PATCH_SIZE == 256 and TCGAPatchDataset.__init__.__defaults__[0] == 256


def test_crop_rule():
    assert crop_origin(448, 448, 256) == (96, 96)
    assert crop_origin(448, 448, 256, 0.0, 0.0) == (0, 0)
    assert crop_origin(448, 448, 256, 0.999999, 0.5) == (192, 96)  # every offset reachable
    assert crop_origin(256, 256, 256, 0.7, 0.3) == (0, 0)  # a 256 tile: the crop is the tile
    with pytest.raises(ValueError, match="smaller"):
        crop_origin(200, 448, 256)


def test_training_random_crops_and_evaluation_centre_crops(store448):
    path, tiles = store448
    decoded = [decode_jpeg(encode_jpeg(t, 95)) for t in tiles]  # what write_store stored
    centre = [d[96:352, 96:352] for d in decoded]
    # training: random 256 crops that differ between epochs and stay inside the tile
    train = TCGAPatchDataset(path, size=256, random_crop=True, flip=False, seed=0)
    crops = [train[(epoch, 0)]["image"].numpy() for epoch in range(8)]
    assert all(c.shape == (256, 256, 3) for c in crops)
    assert len({c.tobytes() for c in crops}) > 4
    # the validation dataset, the FID reference reader, the CAS reader and the VAE reader all
    # see the same centred 256 crop
    val = TCGAPatchDataset(path, size=256, random_crop=False, flip=False)
    as_uint8 = np.round((val[1]["image"].numpy() + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(as_uint8, centre[1])
    np.testing.assert_array_equal(np.asarray(SplitStore(path).image(1)), centre[1])
    fid_ref = open_images(path)  # scripts/fid.py ref-stats and scripts/eval_vae.py --data
    x = fid_ref[1]
    assert tuple(x.shape) == (3, 256, 256)
    np.testing.assert_array_equal(np.round(x.permute(1, 2, 0).numpy() * 255), centre[1])
    cas = labelled_dataset(SplitStore(path), np.arange(3), np.array([0, 1, 1]), [], None)
    xc, label = cas[2]
    assert tuple(xc.shape) == (3, 256, 256) and label == 1
    np.testing.assert_array_equal(np.round(xc.permute(1, 2, 0).numpy() * 255), centre[2])
    # whole tiles on request
    assert SplitStore(path, patch_size=None).image(0).size == (448, 448)


def test_tumor_til_average_covers_the_whole_448_tile(tmp_path):
    # one 448-px tile at 10x from a 20x slide covers 896 level-0 px; a wsinfer patch that lies
    # only in its margin (outside the centre 256 crop) still counts, weighted by its overlap
    args = one_tile_with_wsinfer_csv(
        tmp_path, 448, ["minx", "miny", "width", "height", "prob_tumor", "prob_til"],
        [[0, 0, 100, 100, 0.9, 0.8],  # top-left margin: outside the centre crop
         [0, 600, 300, 200, 0.3, 0.2]])  # bottom-left, partly inside the tile
    assert tumor_til_main(args) == 0
    tiles_dir = tmp_path / "tiles"
    with h5py.File(tiles_dir / "S1.h5", "r") as f:
        tumor, til = float(f["tumor_prob"][0]), float(f["til_prob"][0])
    a1, a2 = 100 * 100, 300 * 200
    assert tumor == pytest.approx((0.9 * a1 + 0.3 * a2) / (a1 + a2), abs=1e-6)
    assert til == pytest.approx((0.8 * a1 + 0.2 * a2) / (a1 + a2), abs=1e-6)
