"""Tumor/TIL probabilities: wsinfer overlap averaging, patch classifiers, the demo stand-in."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_prep.hdf5io import decode_jpeg, encode_jpeg, write_tile_store
from data_prep.patch_classifier import ClassifierSpec, crops
from data_prep.tumor_til import main, overlap_average, stain_standin

L0 = 512  # level-0 side of a tile (256 px at 10x from a 20x slide)


def _store(path: Path, colours: list[tuple[int, int, int]], coords: np.ndarray,
           tile: int = 64) -> Path:
    tiles = [encode_jpeg(np.full((tile, tile, 3), c, np.uint8), 95) for c in colours]
    attrs = {"slide_id": path.stem, "mpp": 0.5, "objective_power": 20.0, "magnification": 10.0,
             "tile_size": tile, "level0_tile_size": L0, "stride": tile}
    write_tile_store(path, tiles, coords, np.ones(len(tiles)), attrs)
    return path


def _write_csv(path: Path, rows: list[tuple], prob_cols: tuple[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["minx", "miny", "width", "height", *prob_cols])
        for x, y, wd, ht, p in rows:
            w.writerow([x, y, wd, ht, 1 - p, p])


def _brute_force(coords, boxes, probs):
    """Pure-Python reference of the overlap-area-weighted mean."""
    out = []
    for x0, y0 in coords:
        num = den = 0.0
        for (bx, by, bw, bh), p in zip(boxes, probs):
            ox = max(0.0, min(x0 + L0, bx + bw) - max(x0, bx))
            oy = max(0.0, min(y0 + L0, by + bh) - max(y0, by))
            num, den = num + ox * oy * p, den + ox * oy
        out.append(num / den if den else float("nan"))
    return np.array(out)


def test_overlap_average_hand_values():
    coords = np.array([[0, 0], [2000, 2000], [512, 0]])
    boxes = np.array([[0, 0, 256, 256],        # tile 0: 256*256 = 65536 of area, p 0.2
                      [256, 0, 512, 512],      # tile 0: 256*512 = 131072, p 1.0; tile 2 too
                      [-256, 256, 512, 512],   # tile 0: 256*256 = 65536, p 0.5
                      [100, 100, 50, 50],      # NaN probability: ignored
                      [5000, 5000, 512, 512]], dtype=float)
    probs = np.array([0.2, 1.0, 0.5, np.nan, 0.9])
    got = overlap_average(coords, L0, boxes, probs)
    assert got[0] == pytest.approx((65536 * 0.2 + 131072 * 1.0 + 65536 * 0.5) / 262144)  # 0.675
    assert np.isnan(got[1])  # nothing overlaps
    assert got[2] == pytest.approx(1.0)  # only patch 1 (x 512..768 overlaps 256 px)


def test_overlap_average_matches_brute_force_on_random_boxes():
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 4000, size=(40, 2))
    boxes = np.concatenate([rng.integers(-200, 4200, size=(300, 2)),
                            rng.integers(50, 700, size=(300, 2))], axis=1).astype(float)
    probs = rng.random(300)
    np.testing.assert_allclose(overlap_average(coords, L0, boxes, probs),
                               _brute_force(coords, boxes, probs), rtol=1e-5)


def test_wsinfer_csvs_into_stores(tmp_path, capsys):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    coords = np.array([[x, y] for y in (0, 512) for x in (0, 512, 1536)])
    _store(tiles / "TCGA-AA-0001-01Z-00-DX1.h5", [(200, 100, 150)] * 6, coords)
    _store(tiles / "TCGA-AA-0002-01Z-00-DX1.h5", [(200, 100, 150)] * 2, coords[:2])
    # 350x350 classifier patches on a 350 grid covering x < 1050, y < 700 (last column cut)
    grid = [(x, y, 350, 350, round(0.1 + 0.8 * ((x // 350 + y // 350) % 2), 2))
            for x in range(0, 1050, 350) for y in range(0, 1050, 350) if y < 700]
    til_rows = [(x, y, w, h, 0.3) for x, y, w, h, _ in grid]
    _write_csv(tmp_path / "tum" / "TCGA-AA-0001-01Z-00-DX1.csv", grid, ("prob_notumor",
                                                                     "prob_tumor"))
    _write_csv(tmp_path / "til" / "TCGA-AA-0001-01Z-00-DX1.csv", til_rows, ("prob_notil",
                                                                        "prob_til"))
    args = ["--tiles", str(tiles), "--tumor-csv-dir", str(tmp_path / "tum"),
            "--til-csv-dir", str(tmp_path / "til")]
    assert main(args) == 1  # the second slide has no CSV
    out = capsys.readouterr().out
    assert "1 done" in out and "TCGA-AA-0002-01Z-00-DX1.csv" in out and "no wsinfer CSV" in out
    store = tiles / "TCGA-AA-0001-01Z-00-DX1.h5"
    with h5py.File(store, "r") as f:
        tumor, til = f["tumor_prob"][:], f["til_prob"][:]
        assert "prob_tumor" in f.attrs["tumor_source"] and "prob_til" in f.attrs["til_source"]
    boxes = np.array([g[:4] for g in grid], float)
    expected = _brute_force(coords, boxes, np.array([g[4] for g in grid]))
    np.testing.assert_allclose(tumor, expected, rtol=1e-5)
    # tile (0, 0) overlaps patch (0,0) by 350x350 at 0.1, (350,0) by 162x350 at 0.9,
    # (0,350) by 350x162 at 0.9 and (350,350) by 162x162 at 0.1
    a, b = 350 * 350 + 162 * 162, 2 * 162 * 350
    assert tumor[0] == pytest.approx((0.1 * a + 0.9 * b) / (a + b), rel=1e-5)
    assert np.isnan(tumor[[2, 5]]).all() and np.isfinite(tumor[[0, 1, 3, 4]]).all()
    assert np.allclose(til[[0, 1, 3, 4]], 0.3) and np.isnan(til[[2, 5]]).all()
    stamp = store.stat().st_mtime_ns
    assert main(args) == 1 and "1 skipped" in capsys.readouterr().out  # resumable
    assert store.stat().st_mtime_ns == stamp


def test_missing_column_is_named(tmp_path, capsys):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    _store(tiles / "s.h5", [(200, 100, 150)], np.array([[0, 0]]))
    _write_csv(tmp_path / "c" / "s.csv", [(0, 0, 100, 100, 0.5)], ("prob_a", "prob_b"))
    assert main(["--tiles", str(tiles), "--tumor-csv-dir", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "s.csv: missing column(s) ['prob_tumor']" in out and "prob_b" in out


class RedLogit(torch.nn.Module):
    """Class-1 logit = 4 * mean of the normalised red channel; class-0 logit = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 4.0 * x[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(z), z], dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_torchscript_classifier_on_tiles(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    colours = [(230, 150, 200), (90, 40, 140), (160, 90, 170)]
    store = _store(tiles / "s.h5", colours, np.array([[0, 0], [512, 0], [1024, 0]]))
    model_path = tmp_path / "red.pt"
    torch.jit.script(RedLogit()).save(str(model_path))
    spec = {"path": model_path.name, "input_size": 32, "mpp": 1.0, "class_index": 1,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (tmp_path / "tumor.json").write_text(json.dumps(spec))
    assert main(["--tiles", str(tiles), "--tumor-classifier", str(tmp_path / "tumor.json")]) == 0
    with h5py.File(store, "r") as f:
        got = f["tumor_prob"][:]
        red = [decode_jpeg(t)[..., 0].mean() / 255.0 for t in f["tiles"]]
        assert "red.pt" in f.attrs["tumor_source"] and "til_prob" not in f
    expected = 1 / (1 + np.exp(-4.0 * (np.array(red) - 0.5) / 0.25))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert got[0] > 0.9 and got[1] < 0.1


def test_torchvision_state_dict_classifier(tmp_path):
    import torchvision

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    store = _store(tiles / "s.h5", [(230, 150, 200), (90, 40, 140)],
                   np.array([[0, 0], [512, 0]]))
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=2)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    assert main(["--tiles", str(tiles), "--til-classifier", str(tmp_path / "m.pth"),
                 "--classifier-kind", "torchvision", "--arch", "mobilenet_v3_small",
                 "--input-size", "64", "--til-class-index", "0"]) == 0
    with h5py.File(store, "r") as f:
        got = f["til_prob"][:]
        x = torch.from_numpy(np.stack([decode_jpeg(t) for t in f["tiles"]])).permute(0, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():  # 64 px tiles, input 64: no resize
        ref = torch.softmax(model.eval()((x.float() / 255 - mean) / std), 1)[:, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_crops_cover_the_tile_at_classifier_spacing():
    tile = np.zeros((128, 128, 3), np.uint8)
    spec = ClassifierSpec(path="x", input_size=64, mpp=0.5)
    assert [c.shape for c in crops(tile, 1.0, spec)] == [(64, 64, 3)] * 16  # 256 px -> 4x4
    spec = ClassifierSpec(path="x", input_size=224, mpp=0.25)
    assert len(crops(tile, 1.0, spec)) == 9  # 512 px -> 3x3 overlapping crops
    assert len(crops(tile, 1.0, ClassifierSpec(path="x", input_size=224))) == 1


def test_stain_standin_is_ranked_and_labelled(tmp_path):
    pink = np.full((32, 32, 3), (235, 170, 210), np.uint8)
    purple = np.full((32, 32, 3), (100, 50, 150), np.uint8)
    dotted = pink.copy()
    dotted[::8, ::8] = (40, 20, 90)  # small dark nuclei on light tissue
    tumor, til = stain_standin([pink, purple, dotted])
    assert tumor[1] == tumor.max() and til[2] == til.max()
    assert np.all((tumor > 0) & (tumor < 1))
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    _store(tiles / "s.h5", [(235, 170, 210), (100, 50, 150)], np.array([[0, 0], [512, 0]]))
    assert main(["--tiles", str(tiles), "--stain-standin"]) == 0
    with h5py.File(tiles / "s.h5", "r") as f:
        assert "NOT a classifier" in f.attrs["tumor_source"]
        assert f["tumor_prob"][1] > f["tumor_prob"][0]


def test_no_source_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no probability source"):
        main(["--tiles", str(tmp_path)])


def _prob_csv(path: Path, boxes: list[tuple], probs: list[float]) -> None:
    _write_csv(path, [(*b, p) for b, p in zip(boxes, probs)], ("prob_a", "prob_tumor"))


def test_a_fixed_csv_is_recomputed_not_kept_stale(tmp_path, capsys):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    store = _store(tiles / "s.h5", [(200, 100, 150)] * 2, np.array([[0, 0], [512, 0]]))
    csv_path = tmp_path / "c" / "s.csv"
    args = ["--tiles", str(tiles), "--tumor-csv-dir", str(tmp_path / "c")]
    _prob_csv(csv_path, [(0, 0, 512, 512)], [0.3])  # the second tile is not covered yet
    assert main(args) == 0
    with h5py.File(store, "r") as f:
        assert np.isnan(f["tumor_prob"][1])
    _prob_csv(csv_path, [(0, 0, 512, 512), (512, 0, 512, 512)], [0.3, 0.8])  # fixed
    capsys.readouterr()
    assert main(args) == 0
    assert "1 done" in capsys.readouterr().out
    with h5py.File(store, "r") as f:
        np.testing.assert_allclose(f["tumor_prob"][:], [0.3, 0.8], rtol=1e-6)
    assert main(args) == 0 and "1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["raw_above_one", "offset", "half_scale", "header_only",
                                  "latin1"])
def test_bad_csvs_are_named_failures(tmp_path, capsys, case):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    coords = np.array([[4096, 4096], [4608, 4096]])
    store = _store(tiles / "s.h5", [(200, 100, 150)] * 2, coords)
    csv_path = tmp_path / "c" / "s.csv"
    boxes = [(4096, 4096, 256, 256), (4352, 4096, 256, 256), (4608, 4096, 512, 512)]
    if case == "raw_above_one":  # averaged with 0.2 it would look like a valid 0.8
        _prob_csv(csv_path, boxes, [0.2, 1.4, 0.5])
        match = "s.csv:3: prob_tumor 1.4 is outside [0, 1]"
    elif case == "offset":
        _prob_csv(csv_path, [(x + 50000, y, w, h) for x, y, w, h in boxes], [0.2, 0.3, 0.5])
        match = "none of its 3 patches overlaps any of the 2 tiles (patches span x 54096"
    elif case == "half_scale":
        _prob_csv(csv_path, [(x // 2, y // 2, w // 2, h // 2) for x, y, w, h in boxes],
                  [0.2, 0.3, 0.5])
        match = "none of its 3 patches overlaps any of the 2 tiles"
    elif case == "header_only":
        _prob_csv(csv_path, [], [])
        match = "s.csv: no patch rows"
    else:
        csv_path.parent.mkdir()
        csv_path.write_bytes(b"minx,miny,width,height,prob_a,prob_tumor\n"
                             + "4096,4096,512,512,0.5,0.5 # é\n".encode("latin-1"))
        match = "s.csv: not UTF-8 text"
    assert main(["--tiles", str(tiles), "--tumor-csv-dir", str(tmp_path / "c")]) == 1
    assert match in capsys.readouterr().out
    with h5py.File(store, "r") as f:
        assert "tumor_prob" not in f  # nothing stored for a failed slide


def test_truncated_store_is_named_and_a_held_folder_refused(tmp_path, capsys):
    from test_data_prep_lock import _hold

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    _store(tiles / "good.h5", [(200, 100, 150)], np.array([[0, 0]]))
    cut = _store(tiles / "cut.h5", [(200, 100, 150)] * 4, np.zeros((4, 2)))
    cut.write_bytes(cut.read_bytes()[:1500])
    assert main(["--tiles", str(tiles), "--stain-standin"]) == 1
    out = capsys.readouterr().out
    assert "1 done" in out and "cut.h5: not a complete tile store (truncated or corrupt?)" in out
    holder = _hold(tiles)
    try:
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {holder.pid}"):
            main(["--tiles", str(tiles), "--stain-standin", "--overwrite"])
    finally:
        holder.kill()
        holder.wait(timeout=30)
