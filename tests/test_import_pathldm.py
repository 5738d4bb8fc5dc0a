"""The authors' released data (their HDF5 and split .npz layout) into our stores and summaries."""
from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from data_prep.hdf5io import encode_jpeg
from data_prep.import_pathldm import main
from ldm.data.tcga import TCGAPatchDataset

SLIDES = ["TCGA-A1-A0SB-01Z-00-DX1", "TCGA-A2-A04P-01Z-00-DX1", "TCGA-B6-A0IJ-01Z-00-DX1"]
# HDF5 rows: (slide, DSMIL tile name); row 5 is in no split
ROWS = [(0, "3_4"), (0, "3_5"), (0, "4_4"), (1, "10_2"), (1, "11_2"), (0, "9_9"), (2, "0_1"),
        (2, "1_1")]
TRAIN, TEST = [3, 0, 1, 2, 4], [6, 7]


def _tile(i: int) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    return np.stack([xx * 4, yy * 4, np.full_like(xx, 30 * i)], -1).astype(np.uint8)


def _write_release(root):
    """Files in exactly the layout the authors' loader reads."""
    (root / "train_test_brca_tumor").mkdir(parents=True)
    with h5py.File(root / "TCGA_BRCA_10x_448_tumor.hdf5", "w") as f:
        x = f.create_dataset("X", (len(ROWS),), dtype=h5py.vlen_dtype(np.uint8))
        for i in range(len(ROWS)):
            x[i] = encode_jpeg(_tile(i), 90)
        f.create_dataset("wsi", data=np.array([SLIDES[s].encode() for s, _ in ROWS]))
        f.create_dataset("folder_name", data=np.array([n.encode() for _, n in ROWS]))
    summaries = {SLIDES[0]: "Invasive ductal carcinoma, grade 2.",
                 SLIDES[1]: "Lobular carcinoma with lymphovascular invasion.",
                 SLIDES[2]: "Triple-negative carcinoma, dense lymphocytes."}
    prob_tumor = {SLIDES[0]: {"3_4": 0.9, "3_5": 0.2, "4_4": 0.5},  # 0.5 is "high", as int(p*2)
                  SLIDES[1]: {"10_2": 0.7},  # 11_2 has no tumor probability
                  SLIDES[2]: {"0_1": 0.1, "1_1": 0.8}}
    prob_til = {SLIDES[0]: {"3_4": 0.1, "3_5": 0.6, "4_4": 0.3},
                SLIDES[1]: {"10_2": 0.4, "11_2": 0.9},
                SLIDES[2]: {"0_1": 0.7}}  # 1_1 has no TIL probability
    for name, idx in (("train", TRAIN), ("test", TEST)):
        np.savez(root / "train_test_brca_tumor" / f"{name}.npz", indices=np.array(idx),
                 summaries=np.array(summaries, dtype=object),
                 prob_tumor=np.array(prob_tumor, dtype=object),
                 prob_til=np.array(prob_til, dtype=object))


def _authors_items(root, split: str) -> dict[bytes, str]:
    """Tile bytes -> caption, computed as tumor_til_in_text.py does (p_uncond 0, no crop)."""
    arr = np.load(root / "train_test_brca_tumor" / f"{split}.npz", allow_pickle=True)
    summaries, prob_tumor, prob_til = (arr[k].tolist() for k in ("summaries", "prob_tumor",
                                                                  "prob_til"))
    levels = ["low", "high"]
    out = {}
    with h5py.File(root / "TCGA_BRCA_10x_448_tumor.hdf5", "r") as f:
        for x_idx in arr["indices"]:
            wsi_name = f["wsi"][x_idx].decode()
            folder_name = f["folder_name"][x_idx].decode()
            text_prompt = summaries[wsi_name]
            p_til = prob_til.get(wsi_name, {}).get(folder_name)
            if p_til is not None:
                text_prompt = f"{levels[int(p_til * len(levels))]} til; {text_prompt}"
            p_tumor = prob_tumor.get(wsi_name, {}).get(folder_name)
            if p_tumor is not None:
                text_prompt = f"{levels[int(p_tumor * len(levels))]} tumor; {text_prompt}"
            out[bytes(f["X"][x_idx])] = text_prompt
    return out


def _our_items(path) -> dict[bytes, str]:
    ds = TCGAPatchDataset(path, size=64, random_crop=False, flip=False, p_uncond=0.0)
    with h5py.File(path, "r") as f:
        return {bytes(f["images"][i]): ds[i]["caption"] for i in range(len(ds))}


def test_release_converts_to_stores_with_the_papers_captions(tmp_path, capsys):
    root, out = tmp_path / "release", tmp_path / "dataset"
    _write_release(root)
    assert main(["--root", str(root), "--out", str(out)]) == 0
    for split in ("train", "test"):
        ours, theirs = _our_items(out / f"{split}.h5"), _authors_items(root, split)
        assert ours == theirs  # same tiles, byte for byte, with the same captions
    with h5py.File(out / "train.h5", "r") as f:
        assert sorted(f["slides"].asstr()[()]) == SLIDES[:2] and len(f["images"]) == 5
        assert int(np.isnan(f["tumor_prob"][()]).sum()) == 1  # kept, as the original did
    ds = TCGAPatchDataset(out / "test.h5", size=64, random_crop=False, flip=False)
    assert sorted(ds[i]["class_label"] for i in range(len(ds))) == [1, 4]  # 1_1: no TIL prob
    with h5py.File(out / "tiles" / f"{SLIDES[0]}.h5", "r") as f:
        assert sorted(map(tuple, f["coords"][()] // 64)) == [(3, 4), (3, 5), (4, 4)]
        assert f.attrs["tile_size"] == 64 and len(f["tiles"]) == 3  # row 5: in no split
    records = [json.loads(line) for line in (out / "summaries.jsonl").read_text().splitlines()]
    assert {r["report_id"] for r in records} == set(SLIDES) and all(
        r["status"] == "ok" for r in records)
    splits = (out / "release_splits.csv").read_text().splitlines()
    assert splits == ["slide_id,split", f"{SLIDES[0]},train", f"{SLIDES[1]},train",
                      f"{SLIDES[2]},test"]
    # a rerun on the same inputs converts nothing again
    capsys.readouterr()
    assert main(["--root", str(root), "--out", str(out)]) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out


def test_five_summaries_and_report_summaries(tmp_path):
    root, out = tmp_path / "release", tmp_path / "dataset"
    _write_release(root)
    path = root / "train_test_brca_tumor" / "train.npz"
    arr = dict(np.load(path, allow_pickle=True))
    summaries = arr["summaries"].tolist()
    summaries[SLIDES[0]] = ["first summary.", "second summary."]
    arr["summaries"] = np.array(summaries, dtype=object)
    np.savez(path, **arr)
    reports = root / "brca_summaries.csv"
    with reports.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_filename", "summary"])
        w.writerow(["TCGA-A1-A0SB.5A3E9B2C", "Summary of the A1 report."])
        w.writerow(["TCGA-A2-A04P.1B2C3D4E", "Summary of the A2 report."])
    assert main(["--root", str(root), "--out", str(out), "--splits", "train",
                 "--report-summaries", str(reports)]) == 0
    with h5py.File(out / "train.h5", "r") as f:
        slides = list(f["slides"].asstr()[()])
        row = slides.index(SLIDES[0])
        assert f["n_summaries"][row] == 2
        assert list(f["summaries"].asstr()[row]) == ["first summary.", "second summary."]
    with h5py.File(out / "test.h5", "r") as f:
        assert len(f["images"]) == 0  # only the train split was imported
    records = [json.loads(x) for x in (out / "report_summaries.jsonl").read_text().splitlines()]
    assert [(r["report_id"], r["summary_index"], r["text"]) for r in records] == [
        ("TCGA-A1-A0SB.5A3E9B2C", 0, "Summary of the A1 report."),
        ("TCGA-A2-A04P.1B2C3D4E", 0, "Summary of the A2 report.")]


def test_bad_release_files_are_named(tmp_path):
    root, out = tmp_path / "release", tmp_path / "dataset"
    _write_release(root)
    path = root / "train_test_brca_tumor" / "test.npz"
    np.savez(path, indices=np.array(TEST))  # no summaries or probabilities
    with pytest.raises(SystemExit, match=r"test.npz: missing key\(s\) \['summaries', "
                                         r"'prob_tumor', 'prob_til'\]"):
        main(["--root", str(root), "--out", str(out)])
    np.savez(path, indices=np.array([0]), summaries=np.array({}, dtype=object),
             prob_tumor=np.array({}, dtype=object), prob_til=np.array({}, dtype=object))
    with pytest.raises(SystemExit, match="has rows in both train.npz and test.npz"):
        main(["--root", str(root), "--out", str(out)])
    with pytest.raises(SystemExit, match="nothing to import"):
        main(["--out", str(out)])

