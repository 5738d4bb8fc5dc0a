"""TCGA patch dataset and datamodule on real HDF5 stores written by the tests."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
from tcga_store import random_store, write_store
from torch.utils.data import DataLoader

from ldm.data.tcga import TCGAPatchData, TCGAPatchDataset


def _tiles(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def level_store(tmp_path):
    """Three patches of one slide at p = 0, 0.5 and 1.0."""
    return write_store(tmp_path / "train.h5", _tiles(3), [0, 0, 0], [0.0, 0.5, 1.0],
                       [1.0, 0.5, 0.0], ["TCGA-A"], [["Invasive ductal carcinoma. "]])


def test_captions_levels_and_class_labels(level_store):
    ds = TCGAPatchDataset(level_store, size=16, flip=False)
    items = [ds[i] for i in range(3)]
    assert [it["caption"] for it in items] == [
        "low tumor; high til; Invasive ductal carcinoma.",
        "high tumor; high til; Invasive ductal carcinoma.",
        "high tumor; low til; Invasive ductal carcinoma.",
    ]
    assert [it["class_label"] for it in items] == [1, 3, 2]


def test_image_values_crop_and_flips(tmp_path):
    tile = np.random.default_rng(1).integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    path = write_store(tmp_path / "s.h5", [tile], [0], [0.2], [0.2], ["A"], [["x"]])
    decoded = TCGAPatchDataset(path, size=24, flip=False)[0]["image"]
    assert decoded.dtype == torch.float32 and decoded.shape == (24, 24, 3)
    assert decoded.min() >= -1 and decoded.max() <= 1
    full = np.rint((decoded.numpy() + 1) * 127.5)
    centre = TCGAPatchDataset(path, size=16, random_crop=False, flip=False)[0]["image"]
    np.testing.assert_allclose(centre.numpy(), full[4:20, 4:20] / 127.5 - 1, atol=1e-6)
    ds = TCGAPatchDataset(path, size=16, random_crop=True, flip=True)
    windows = {(y, x): full[y:y + 16, x:x + 16] for y in range(9) for x in range(9)}
    offsets, flips = set(), set()
    for _ in range(200):
        img = np.rint((ds[0]["image"].numpy() + 1) * 127.5)
        found = [(yx, f) for yx, w in windows.items()
                 for f, v in (("none", w), ("h", w[:, ::-1]), ("v", w[::-1]),
                              ("hv", w[::-1, ::-1])) if np.array_equal(v, img)]
        assert found, "crop is not a flipped window of the tile"
        offsets.add(found[0][0])
        flips.add(found[0][1])
    assert flips == {"none", "h", "v", "hv"}
    assert len(offsets) > 20


def test_tile_smaller_than_size_is_an_error(level_store):
    with pytest.raises(ValueError, match="smaller than size 32"):
        TCGAPatchDataset(level_store, size=32)[0]


@pytest.mark.parametrize("legacy", [False, True])
def test_uncond_dropout_rate_for_every_til_level(tmp_path, legacy):
    n = 2000
    p = 0.1
    path = write_store(tmp_path / "s.h5", _tiles(2, size=8), [0, 0], [0.9, 0.9], [0.1, 0.9],
                       ["A"], [["summary"]])
    ds = TCGAPatchDataset(path, size=8, flip=False, p_uncond=p, legacy_til_exemption=legacy)
    bound = 5 * math.sqrt(n * p * (1 - p))
    for idx, til in ((0, "low"), (1, "high")):
        items = [ds[idx] for _ in range(n)]
        dropped = [it["caption"] == "" for it in items]
        assert dropped == [it["class_label"] == 4 for it in items]
        assert all(it["caption"] == f"high tumor; {til} til; summary"
                   for it, d in zip(items, dropped) if not d)
        if legacy and til == "high":
            assert sum(dropped) == 0
        else:
            assert abs(sum(dropped) - n * p) < bound, (til, sum(dropped))


def test_no_dropout_at_zero_and_all_at_one(level_store):
    assert all(TCGAPatchDataset(level_store, size=16, p_uncond=0.0)[i]["caption"]
               for i in range(3) for _ in range(50))
    ds = TCGAPatchDataset(level_store, size=16, p_uncond=1.0)
    assert {(ds[i]["caption"], ds[i]["class_label"]) for i in range(3)} == {("", 4)}


def test_five_summaries_mode(tmp_path):
    sums = [f"summary {j}" for j in range(5)]
    path = write_store(tmp_path / "s.h5", _tiles(1, 8), [0], [0.0], [0.0], ["A"], [sums])
    first = TCGAPatchDataset(path, size=8, summary_mode="first")
    assert {first[0]["caption"] for _ in range(50)} == {"low tumor; low til; summary 0"}
    ds = TCGAPatchDataset(path, size=8, summary_mode="random")
    counts = Counter(ds[0]["caption"].split("; ")[-1] for _ in range(1000))
    assert set(counts) == set(sums)
    assert all(abs(c - 200) < 5 * math.sqrt(1000 * 0.2 * 0.8) for c in counts.values())


def test_wrong_slide_summary_mode(tmp_path):
    n_slides = 4
    path = write_store(tmp_path / "s.h5", _tiles(n_slides, 8), range(n_slides), [0.0] * n_slides,
                       [0.0] * n_slides, [f"S{i}" for i in range(n_slides)],
                       [[f"of slide {i}"] for i in range(n_slides)])
    ds = TCGAPatchDataset(path, size=8, summary_mode="wrong_slide")
    for idx in range(n_slides):
        seen = {ds[idx]["caption"].split("; ")[-1] for _ in range(200)}
        assert f"of slide {idx}" not in seen
        assert seen == {f"of slide {j}" for j in range(n_slides) if j != idx}
    one = write_store(tmp_path / "one.h5", _tiles(1, 8), [0], [0.0], [0.0], ["A"], [["x"]])
    with pytest.raises(ValueError, match="at least two slides"):
        TCGAPatchDataset(one, size=8, summary_mode="wrong_slide")


def test_unknown_probabilities_are_left_out(tmp_path):
    path = write_store(tmp_path / "s.h5", _tiles(2, 8), [0, 0], [float("nan"), 0.7],
                       [0.2, float("nan")], ["A"], [["text"]])
    ds = TCGAPatchDataset(path, size=8)
    assert (ds[0]["caption"], ds[0]["class_label"]) == ("low til; text", 4)
    assert (ds[1]["caption"], ds[1]["class_label"]) == ("high tumor; text", 4)


def test_reproducible_from_torch_seed_and_varies_between_draws(tmp_path):
    ds = TCGAPatchDataset(random_store(tmp_path / "s.h5", n=4, tile=32), size=16, p_uncond=0.5)
    torch.manual_seed(3)
    a = [ds[i % 4] for i in range(8)]
    torch.manual_seed(3)
    b = [ds[i % 4] for i in range(8)]
    for x, y in zip(a, b):
        assert x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a[:4], a[4:]))


def test_hdf5_opened_lazily_and_reopened_in_workers(tmp_path):
    path = random_store(tmp_path / "s.h5", n=12, tile=16, n_slides=3)
    ds = TCGAPatchDataset(path, size=16, flip=False)
    assert not ds._file.is_open  # nothing opened in __init__
    reference = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert ds._file.is_open  # opened in this process; workers must not reuse it
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert torch.equal(torch.cat([b["image"] for b in batches]), reference)
    captions = [c for b in batches for c in b["caption"]]
    assert captions == [ds[i]["caption"] for i in range(len(ds))]


def test_store_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        TCGAPatchDataset(tmp_path / "missing.h5")
    import h5py

    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("images", data=np.zeros(2))
    with pytest.raises(KeyError, match="slide_index"):
        TCGAPatchDataset(bad)
    path = random_store(tmp_path / "s.h5", n=2, tile=8)
    with pytest.raises(ValueError, match="summary_mode"):
        TCGAPatchDataset(path, size=8, summary_mode="best")


def test_datamodule_batches(tmp_path):
    train = random_store(tmp_path / "train.h5", n=10, tile=32)
    val = random_store(tmp_path / "test.h5", n=5, tile=32, seed=1)
    dm = TCGAPatchData(batch_size=4, train={"path": str(train), "size": 16, "p_uncond": 0.1},
                       validation={"path": str(val), "size": 16, "random_crop": False,
                                   "flip": False})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 16, 16, 3)
    assert batch["class_label"].dtype == torch.int64
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert sum(len(b["caption"]) for b in dm.val_dataloader()) == 5
    assert not dm.train_dataloader().pin_memory
    target = TCGAPatchData(batch_size=2, train={"target": "ldm.data.tcga.TCGAPatchDataset",
                                                "params": {"path": str(train), "size": 16}})
    assert len(target.train_dataloader().dataset) == 10
