"""End to end: demo slide -> tiles -> probabilities -> summaries -> train/test stores."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import openslide
from chat_server import ChatServer
from slide_factory import write_svs

from data_prep import build_dataset, summarize_reports, tile_wsi, tumor_til
from data_prep.demo import run_demo
from data_prep.hdf5io import decode_jpeg
from data_prep.summary_backends import LOCAL_MODEL, TokenBudget
from ldm.data.captions import build_caption
from ldm.data.tcga import TCGAPatchDataset

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SLIDES = ["TCGA-D1-A001-01Z-00-DX1.copy1", "TCGA-D2-A002-01Z-00-DX1.copy2"]
SPLIT_SEED = 0  # a seed whose hashes put the two patients on different sides at 0.5
REPORTS = ["TCGA-D1-A001.uuid-1", "TCGA-D2-A002.uuid-2", "TCGA-ZZ-9999.uuid-9"]


def check_training_store(path: Path, split: str) -> dict:
    """Assert ``path`` follows docs/data_format.md section 3; return its arrays."""
    with h5py.File(path, "r") as f:
        for key in ("split", "tile_size", "magnification", "format_version", "seed"):
            assert key in f.attrs, key
        assert f.attrs["split"] == split
        n, s = len(f["images"]), len(f["slides"])
        assert f["images"].dtype == h5py.vlen_dtype(np.uint8) and f["images"].shape == (n,)
        assert f["slide_index"].dtype == np.int32 and f["slide_index"].shape == (n,)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (n, 2)
        for k in ("tumor_prob", "til_prob"):
            assert f[k].dtype == np.float32 and f[k].shape == (n,)
        assert h5py.check_string_dtype(f["slides"].dtype).encoding == "utf-8"
        assert h5py.check_string_dtype(f["summaries"].dtype).encoding == "utf-8"
        assert f["summaries"].shape[0] == s and f["n_summaries"].shape == (s,)
        assert f["n_summaries"].dtype == np.int32
        out = {"slides": list(f["slides"].asstr()[:]), "summaries": f["summaries"].asstr()[:],
               "n_summaries": f["n_summaries"][:], "slide_index": f["slide_index"][:],
               "tumor": f["tumor_prob"][:], "til": f["til_prob"][:],
               "coords": f["coords"][:], "n": n, "tile_size": int(f.attrs["tile_size"])}
        if n:
            img = decode_jpeg(f["images"][0])
            assert img.shape == (out["tile_size"], out["tile_size"], 3)
    assert np.all((out["slide_index"] >= 0) & (out["slide_index"] < len(out["slides"])))
    assert np.all((out["tumor"] >= 0) & (out["tumor"] <= 1))
    assert np.all((out["til"] >= 0) & (out["til"] <= 1))
    assert np.all(out["n_summaries"] <= out["summaries"].shape[1])
    return out


def _wsinfer_csvs(tmp: Path, tiles: Path) -> int:
    """Write tumor and TIL CSVs covering x < 1400 only; returns the tiles left uncovered."""
    uncovered = 0
    for sid in SLIDES:
        with h5py.File(tiles / f"{sid}.h5", "r") as f:
            uncovered += int((f["coords"][:, 0] >= 1400).sum())
        for target, cols in (("tumor", ("prob_notumor", "prob_tumor")),
                             ("til", ("prob_notil", "prob_til"))):
            d = tmp / target
            d.mkdir(exist_ok=True)
            with (d / f"{sid}.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["minx", "miny", "width", "height", *cols])
                for x in range(0, 1400, 350):
                    for y in range(0, 2967, 350):
                        p = (0.8 if (x // 350 + y // 350) % 2 else 0.2) if target == "tumor" \
                            else (0.6 if y < 1400 else 0.1)
                        w.writerow([x, y, 350, 350, 1 - p, p])
    return uncovered


def test_demo_slide_through_all_steps(tmp_path, monkeypatch):
    slides = tmp_path / "slides"
    slides.mkdir()
    # the demo slide and its mirror image stand in for two patients' slides (two copies of
    # one slide would be refused as a duplicate)
    shutil.copy(DEMO / "CMU-1-Small-Region.svs", slides / f"{SLIDES[0]}.svs")
    with openslide.OpenSlide(str(DEMO / "CMU-1-Small-Region.svs")) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    write_svs(slides / f"{SLIDES[1]}.svs", np.ascontiguousarray(rgb[:, ::-1]), (1,), app_mag=20,
              mpp=0.499)
    tiles = tmp_path / "tiles"
    assert tile_wsi.main([str(slides), "--out", str(tiles), "--tile-size", "256",
                          "--tissue-filter", "otsu", "--min-tissue", "0.25"]) == 0
    uncovered = _wsinfer_csvs(tmp_path, tiles)
    assert uncovered > 0
    assert tumor_til.main(["--tiles", str(tiles), "--tumor-csv-dir", str(tmp_path / "tumor"),
                           "--til-csv-dir", str(tmp_path / "til")]) == 0
    reports = tmp_path / "reports.csv"
    with reports.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_filename", "text"])
        w.writerows([(rid, f"Report {rid}. Invasive ductal carcinoma, grade 2.")
                     for rid in REPORTS])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-e2e")
    summaries = tmp_path / "summaries.jsonl"
    with ChatServer() as server:
        assert summarize_reports.main([str(reports), "--out", str(summaries), "--base-url",
                                       server.base_url, "--n-summaries", "2"]) == 0
    out = tmp_path / "dataset"
    assert build_dataset.main(["--tiles", str(tiles), "--summaries", str(summaries),
                               "--out", str(out), "--test-fraction", "0.5",
                               "--seed", str(SPLIT_SEED), "--drop-missing-probabilities"]) == 0
    train = check_training_store(out / "train.h5", "train")
    test = check_training_store(out / "test.h5", "test")
    assert sorted(train["slides"] + test["slides"]) == SLIDES  # one slide each, none in both
    assert len(train["slides"]) == len(test["slides"]) == 1
    n_tiles = 0
    for sid in SLIDES:
        with h5py.File(tiles / f"{sid}.h5", "r") as f:
            n_tiles += len(f["tiles"])
    assert train["n"] + test["n"] == n_tiles - uncovered  # NaN (uncovered) tiles dropped
    card = json.loads((out / "dataset_card.json").read_text())
    assert sum(card["splits"][s]["dropped_tiles"]["nan_probability"]
               for s in ("train", "test")) == uncovered
    budget = TokenBudget()
    for d in (train, test):
        assert list(d["n_summaries"]) == [2]
        for i in range(d["n"]):
            summary = d["summaries"][d["slide_index"][i]][i % 2]
            caption = build_caption(d["tumor"][i], d["til"][i], summary)
            assert caption.split("; ")[0] in ("low tumor", "high tumor")
            assert budget.count(summary) <= 154
        y = d["coords"][:, 1]  # TIL CSVs: 0.6 above y = 1400, 0.1 below; tiles span 512
        np.testing.assert_allclose(d["til"][y + 512 <= 1400], 0.6, rtol=1e-6)
        np.testing.assert_allclose(d["til"][y >= 1400], 0.1, rtol=1e-6)
        assert np.all((d["til"] >= 0.1 - 1e-6) & (d["til"] <= 0.6 + 1e-6))
    _check_dataset_class(out / "train.h5", train)
    _check_dataset_class(out / "test.h5", test)


def _check_dataset_class(path: Path, store: dict) -> None:
    """The training dataset class reads the store: images in [-1, 1], captions, labels."""
    ds = TCGAPatchDataset(path, size=256, random_crop=False, flip=False)
    assert len(ds) == store["n"]
    for i in (0, len(ds) - 1):
        item = ds[i]
        assert tuple(item["image"].shape) == (256, 256, 3)
        assert -1.0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1.0
        expected = build_caption(store["tumor"][i], store["til"][i],
                                 store["summaries"][store["slide_index"][i]][0])
        assert item["caption"] == expected.rstrip()
        assert item["class_label"] == 2 * int(store["tumor"][i] >= 0.5) + int(
            store["til"][i] >= 0.5)


def test_demo_runner(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    paths = run_demo(tmp_path / "demo", backend="auto")
    train = check_training_store(paths["train"], "train")
    test = check_training_store(paths["test"], "test")
    assert train["slides"] == ["CMU-1-Small-Region"] and test["n"] == 0
    assert train["n"] >= 100 and train["tile_size"] == 256
    assert train["summaries"][0][0].startswith("GROSS DESCRIPTION")  # the mapped skin report
    classes = {2 * int(a >= 0.5) + int(b >= 0.5) for a, b in zip(train["tumor"], train["til"])}
    assert classes == {0, 1, 2, 3}
    _check_dataset_class(paths["train"], train)
    card = json.loads(paths["card"].read_text())
    assert any("NOT a classifier" in k for k in card["probability_sources"])
    assert any(LOCAL_MODEL in k for k in card["summary_models"])
    with h5py.File(paths["tiles"] / "CMU-1-Small-Region.h5", "r") as f:
        assert f.attrs["stride"] == 64 and f.attrs["magnification"] == 10.0
