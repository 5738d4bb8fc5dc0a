"""Dataset build: report matching, slide-level split, filtering, store contents, card, resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.build_dataset import main
from data_prep.hdf5io import encode_jpeg, update_store_atomic, write_tile_store
from ldm.data.tcga import TCGAPatchDataset

# two slides of patient A1, one each of B2, C3, D4 (no report), E5
SLIDES = ["TCGA-A1-0001-01Z-00-DX1.aa", "TCGA-A1-0001-01Z-00-DX2.ab",
          "TCGA-B2-0002-01Z-00-DX1.bb", "TCGA-C3-0003-01Z-00-DX1.cc",
          "TCGA-D4-0004-01Z-00-DX1.dd", "TCGA-E5-0005-01Z-00-DX1.ee"]
REPORTS = {"TCGA-A1-0001.r1": 2, "TCGA-B2-0002.r2": 1, "TCGA-C3-0003.r3": 3,
           "TCGA-E5-0005.r5": 1, "TCGA-Z9-0009.r9": 1}


def _make_inputs(tmp: Path, tile: int = 16) -> tuple[Path, Path]:
    tiles = tmp / "tiles"
    tiles.mkdir()
    for s, sid in enumerate(SLIDES):
        n = 5
        imgs = [encode_jpeg(np.full((tile, tile, 3), (20 * s, 40 * i, 100), np.uint8), 90)
                for i in range(n)]
        coords = np.array([[512 * i, 512 * s] for i in range(n)])
        tissue = np.array([0.9, 0.8, 0.3, 1.0, 0.6])  # tile 2 has little tissue
        path = tiles / f"{sid}.h5"
        write_tile_store(path, imgs, coords, tissue, {
            "slide_id": sid, "tile_size": tile, "magnification": 10.0, "mpp": 0.5,
            "level0_tile_size": 512})
        tumor = np.array([0.1, 0.9, 0.5, 1.0, np.nan], np.float32)  # tile 4 unknown
        til = np.array([0.2, 0.7, 0.4, 0.0, 0.3], np.float32)
        update_store_atomic(path, {"tumor_prob": tumor, "til_prob": til},
                            {"tumor_source": "test", "til_source": "test"})
    summaries = tmp / "summaries.jsonl"
    with summaries.open("w") as fh:
        for rid, k in REPORTS.items():
            for i in range(k):
                fh.write(json.dumps({"report_id": rid, "summary_index": i, "status": "ok",
                                     "text": f"summary {i} of {rid}", "model": "m",
                                     "prompt_version": "v1", "fits": True}) + "\n")
        fh.write(json.dumps({"report_id": "TCGA-B2-0002.r2", "summary_index": 1,
                             "status": "error", "reason": "HTTP 500"}) + "\n")
    return tiles, summaries


def _load(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {k: f[k][:] for k in ("images", "slide_index", "coords", "tumor_prob", "til_prob",
                                    "n_summaries")}
        out["slides"] = list(f["slides"].asstr()[:])
        out["summaries"] = f["summaries"].asstr()[:] if f["summaries"].size else np.zeros((0, 0))
        out["attrs"] = dict(f.attrs)
        out["dtypes"] = {k: f[k].dtype for k in f}
    return out


def test_store_contents_split_and_card(tmp_path, capsys):
    tiles, summaries = _make_inputs(tmp_path)
    out = tmp_path / "ds"
    rc = main(["--tiles", str(tiles), "--summaries", str(summaries), "--out", str(out),
               "--test-fraction", "0.5", "--seed", "3", "--min-tissue", "0.5",
               "--drop-missing-probabilities"])
    assert rc == 0
    train, test = _load(out / "train.h5"), _load(out / "test.h5")
    assert not set(train["slides"]) & set(test["slides"])
    assert sorted(train["slides"] + test["slides"]) == sorted(s for s in SLIDES if "D4" not in s)
    # the two A1 slides (one patient) are on the same side
    a1 = [s for s in SLIDES if "A1" in s]
    assert set(a1) <= set(train["slides"]) or set(a1) <= set(test["slides"])
    for d, split in ((train, "train"), (test, "test")):
        s = len(d["slides"])
        assert d["attrs"]["split"] == split and d["attrs"]["seed"] == 3
        assert d["attrs"]["tile_size"] == 16 and d["attrs"]["magnification"] == 10.0
        assert d["summaries"].shape == (s, 3) and d["n_summaries"].shape == (s,)
        assert d["dtypes"]["slide_index"] == np.int32 and d["dtypes"]["coords"] == np.int64
        assert d["dtypes"]["tumor_prob"] == np.float32 and d["coords"].shape[1] == 2
        assert np.isfinite(d["tumor_prob"]).all() and np.isfinite(d["til_prob"]).all()
        assert len(d["images"]) == 3 * s  # tiles 0, 1, 3 of each slide survive
        for j, sid in enumerate(d["slides"]):
            rows = np.flatnonzero(d["slide_index"] == j)
            with h5py.File(tiles / f"{sid}.h5", "r") as f:
                for r, src in zip(rows, (0, 1, 3)):
                    assert bytes(d["images"][r]) == bytes(f["tiles"][src])
                    assert tuple(d["coords"][r]) == tuple(f["coords"][src])
                    assert d["tumor_prob"][r] == f["tumor_prob"][src]
            n = d["n_summaries"][j]
            patient = sid[:12]
            rid = next(r for r in REPORTS if r.startswith(patient))
            assert n == REPORTS[rid]
            assert list(d["summaries"][j][:n]) == [f"summary {i} of {rid}" for i in range(n)]
            assert all(x == "" for x in d["summaries"][j][n:])
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["slides_without_summary"] == ["TCGA-D4-0004-01Z-00-DX1.dd"]
    both = [card["splits"][k] for k in ("train", "test")]
    assert sum(c["slides"] for c in both) == 5 and sum(c["patches"] for c in both) == 15
    assert sum(c["dropped_tiles"]["low_tissue"] for c in both) == 5
    assert sum(c["dropped_tiles"]["nan_probability"] for c in both) == 5  # tile 4: NaN tumor
    # each slide keeps (0.1, 0.2) -> class 0, (0.9, 0.7) -> 3, (1.0, 0.0) -> 2
    per_class = {k: sum(c["patches_per_class"][k] for c in both) for k in both[0]
                 ["patches_per_class"]}
    assert list(per_class.values()) == [5, 0, 5, 5, 0]
    splits_csv = (out / "splits.csv").read_text().splitlines()
    assert splits_csv[0] == "slide_id,split" and len(splits_csv) == 6
    text = capsys.readouterr().out
    assert "# Dataset card" in text and "2 done" in text
    assert (out / "dataset_card.md").read_text().startswith("# Dataset card")


def test_patches_without_probabilities_kept_by_default_or_dropped(tmp_path):
    tiles, summaries = _make_inputs(tmp_path)
    args = ["--tiles", str(tiles), "--summaries", str(summaries), "--test-fraction", "0"]
    # default, as the original loader: kept, NaN in the store, counted in the card
    assert main(args + ["--out", str(tmp_path / "keep")]) == 0
    card = json.loads((tmp_path / "keep" / "dataset_card.json").read_text())["splits"]["train"]
    assert card["patches"] == 5 * 5 and card["kept_without_probability"] == 5
    assert card["dropped_tiles"] == {"low_tissue": 0, "nan_probability": 0}
    assert card["patches_per_class"]["4 (a probability unknown: unconditional)"] == 5
    assert card["patches_per_tumor_level"]["unknown"] == 5
    assert "| patches without a probability (kept) | 5 | 0 |" in (
        tmp_path / "keep" / "dataset_card.md").read_text()
    store = tmp_path / "keep" / "train.h5"
    tumor = _load(store)["tumor_prob"]
    assert int(np.isnan(tumor).sum()) == 5
    # the dataset leaves the unknown level out of the caption; a class model gets class 4
    ds = TCGAPatchDataset(store, size=16, flip=False, random_crop=False)
    i = int(np.flatnonzero(np.isnan(tumor))[0])
    item = ds[i]
    assert item["caption"].startswith("low til; summary 0 of ") and "tumor" not in item["caption"]
    assert item["class_label"] == 4
    labels = {ds[j]["class_label"] for j in range(len(ds))}
    assert 4 in labels and {0, 2, 3} <= labels  # p_uncond 0 (the original class model)
    # the switch drops them
    assert main(args + ["--out", str(tmp_path / "drop"), "--drop-missing-probabilities"]) == 0
    card = json.loads((tmp_path / "drop" / "dataset_card.json").read_text())["splits"]
    assert card["train"]["patches"] == 5 * 4 and card["test"]["patches"] == 0
    assert card["train"]["dropped_tiles"] == {"low_tissue": 0, "nan_probability": 5}
    assert np.isfinite(_load(tmp_path / "drop" / "train.h5")["tumor_prob"]).all()
    assert _load(tmp_path / "drop" / "test.h5")["slides"] == []


def test_split_is_seeded_and_rerun_skips(tmp_path, capsys):
    tiles, summaries = _make_inputs(tmp_path)
    args = ["--tiles", str(tiles), "--summaries", str(summaries), "--test-fraction", "0.3",
            "--group-by", "slide"]
    main(args + ["--out", str(tmp_path / "a"), "--seed", "1"])
    main(args + ["--out", str(tmp_path / "b"), "--seed", "1"])
    main(args + ["--out", str(tmp_path / "c"), "--seed", "2"])
    read = [(tmp_path / d / "splits.csv").read_text() for d in "abc"]
    assert read[0] == read[1] and read[0] != read[2]
    stamp = (tmp_path / "a" / "train.h5").stat().st_mtime_ns
    capsys.readouterr()
    main(args + ["--out", str(tmp_path / "a"), "--seed", "1"])
    assert "0 done, 2 skipped" in capsys.readouterr().out
    assert (tmp_path / "a" / "train.h5").stat().st_mtime_ns == stamp
    main(args + ["--out", str(tmp_path / "a"), "--seed", "1", "--max-summaries", "1"])
    assert "2 done" in capsys.readouterr().out  # a changed setting rebuilds
    assert _load(tmp_path / "a" / "train.h5")["summaries"].shape[1] == 1


def test_split_file_and_mapping(tmp_path):
    tiles, summaries = _make_inputs(tmp_path)
    split = tmp_path / "split.csv"
    split.write_text("slide_id,split\n" + "".join(
        f"{s},{'test' if i == 2 else 'train'}\n" for i, s in enumerate(SLIDES[:3])))
    mapping = tmp_path / "map.csv"
    mapping.write_text("slide_id,report_id\n"
                       f"{SLIDES[0]},TCGA-C3-0003.r3\n{SLIDES[2]},TCGA-Z9-0009.r9\n")
    out = tmp_path / "ds"
    assert main(["--tiles", str(tiles), "--summaries", str(summaries), "--out", str(out),
                 "--split-file", str(split), "--mapping", str(mapping)]) == 0
    train, test = _load(out / "train.h5"), _load(out / "test.h5")
    assert train["slides"] == [SLIDES[0]] and test["slides"] == [SLIDES[2]]
    assert list(train["n_summaries"]) == [3] and list(test["n_summaries"]) == [1]
    assert test["summaries"][0][0] == "summary 0 of TCGA-Z9-0009.r9"
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["unassigned_slides"] == []  # slides without a report are left out first
    assert len(card["slides_without_summary"]) == 4


def test_keep_unsummarized_and_mismatched_tile_sizes(tmp_path):
    tiles, summaries = _make_inputs(tmp_path)
    out = tmp_path / "ds"
    assert main(["--tiles", str(tiles), "--summaries", str(summaries), "--out", str(out),
                 "--test-fraction", "0", "--keep-unsummarized"]) == 0
    train = _load(out / "train.h5")
    j = train["slides"].index("TCGA-D4-0004-01Z-00-DX1.dd")
    assert train["n_summaries"][j] == 0 and all(x == "" for x in train["summaries"][j])
    write_tile_store(tiles / "other.h5", [encode_jpeg(np.zeros((32, 32, 3), np.uint8))],
                     np.zeros((1, 2)), np.ones(1), {"slide_id": "other", "tile_size": 32,
                                                    "magnification": 10.0})
    with pytest.raises(SystemExit, match="disagree on tile_size"):
        main(["--tiles", str(tiles), "--summaries", str(summaries), "--out", str(out)])


def _stores_state(out: Path) -> dict:
    return {n: (out / n).read_bytes() for n in ("train.h5", "test.h5")}


@pytest.mark.parametrize("bad", ["typo_path", "empty_file", "errors_only", "empties_split"])
def test_bad_summaries_never_replace_stores(tmp_path, bad):
    tiles, summaries = _make_inputs(tmp_path)
    out = tmp_path / "ds"
    base = ["--tiles", str(tiles), "--out", str(out), "--test-fraction", "0.5", "--seed", "3"]
    assert main(base + ["--summaries", str(summaries)]) == 0
    before = _stores_state(out)
    assert all(len(_load(out / n)["slides"]) for n in before)
    extra = []
    if bad == "typo_path":
        arg, match = tmp_path / "sumaries" / "s.jsonl", "no such file"
    elif bad == "empty_file":
        arg, match = tmp_path / "empty.jsonl", "no usable summaries"
        arg.write_text("")
    elif bad == "errors_only":
        arg, match = tmp_path / "errors.jsonl", "no usable summaries"
        arg.write_text(json.dumps({"report_id": "TCGA-A1-0001.r1", "summary_index": 0,
                                   "status": "error", "reason": "HTTP 500"}) + "\n")
    else:  # a split file that puts every slide in train would empty test.h5
        arg, match = summaries, "would leave test empty"
        split = tmp_path / "split.csv"
        split.write_text("slide_id,split\n" + "".join(f"{s},train\n" for s in SLIDES))
        extra = ["--split-file", str(split)]
    with pytest.raises(SystemExit, match=match) as err:
        main(base + ["--summaries", str(arg)] + extra)
    assert "\n" not in str(err.value)
    assert _stores_state(out) == before
    assert not (tmp_path / "sumaries").exists()  # the mistyped folder is not created
    if bad == "empties_split":  # asked for explicitly, it goes through
        assert main(base + ["--summaries", str(arg), "--overwrite"] + extra) == 0
        assert _load(out / "test.h5")["slides"] == []


def test_leftover_tmp_is_removed_and_missing_inputs_named(tmp_path, capsys):
    tiles, summaries = _make_inputs(tmp_path)
    out = tmp_path / "ds"
    args = ["--tiles", str(tiles), "--summaries", str(summaries), "--out", str(out)]
    assert main(args) == 0
    (out / "train.h5.tmp").write_bytes(b"half a store of a killed build")
    assert main(args) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out
    assert not (out / "train.h5.tmp").exists()
    for flag, value, match in (("--tiles", tmp_path / "nope", "no such folder"),
                               ("--mapping", tmp_path / "m.csv", "no such file"),
                               ("--out", summaries, "is a file")):
        bad = list(args)
        if flag in bad:
            bad[bad.index(flag) + 1] = str(value)
        else:
            bad += [flag, str(value)]
        with pytest.raises(SystemExit, match=match):
            main(bad)
    for opt, value in (("--test-fraction", "1.0"), ("--test-fraction", "nan"),
                       ("--min-tissue", "-0.1"), ("--max-summaries", "0")):
        with pytest.raises(SystemExit):
            main(args + [opt, value])
        assert value in capsys.readouterr().err


def _add_patient(tiles: Path, summaries: Path, sid: str, shift: int) -> None:
    src = tiles / f"{SLIDES[2]}.h5"
    dst = tiles / f"{sid}.h5"
    with h5py.File(src, "r") as f:
        imgs, coords = list(f["tiles"][:]), f["coords"][:] + shift  # new content
        tissue, tumor, til = f["tissue"][:], f["tumor_prob"][:], f["til_prob"][:]
    write_tile_store(dst, imgs, coords, tissue, {"slide_id": sid, "tile_size": 16,
                                                 "magnification": 10.0, "mpp": 0.5,
                                                 "level0_tile_size": 512})
    update_store_atomic(dst, {"tumor_prob": tumor, "til_prob": til}, {})
    with summaries.open("a") as fh:
        fh.write(json.dumps({"report_id": f"{sid[:12]}.rx", "summary_index": 0,
                             "status": "ok", "text": "new", "model": "m"}) + "\n")


def test_split_is_stable_when_patients_are_added(tmp_path):
    tiles, summaries = _make_inputs(tmp_path)
    args = ["--tiles", str(tiles), "--summaries", str(summaries), "--test-fraction", "0.4",
            "--seed", "5"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    before = dict(line.split(",") for line in
                  (tmp_path / "a" / "splits.csv").read_text().splitlines()[1:])
    for i in range(12):  # twelve more patients
        _add_patient(tiles, summaries, f"TCGA-N{i:02d}-{i:04d}-01Z-00-DX1.n{i}", i + 1)
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    after = dict(line.split(",") for line in
                 (tmp_path / "b" / "splits.csv").read_text().splitlines()[1:])
    assert len(after) == len(before) + 12
    assert {s: after[s] for s in before} == before  # nobody moved
    assert 0 < list(after.values()).count("test") < len(after)


def test_inconsistent_split_files_and_duplicate_stores_refused(tmp_path):
    tiles, summaries = _make_inputs(tmp_path)
    out = tmp_path / "ds"
    args = ["--tiles", str(tiles), "--summaries", str(summaries), "--out", str(out)]
    listed = [s for s in SLIDES if "D4" not in s]  # D4 has no report: not needed in the file
    split = tmp_path / "split.csv"

    def refused(rows: list[str], match: str, *extra: str) -> None:
        split.write_text("slide_id,split\n" + "".join(rows))
        with pytest.raises(SystemExit, match=match) as err:
            main(args + ["--split-file", str(split), *extra])
        assert "\n" not in str(err.value) and not out.exists()

    ok = [f"{s},{'test' if 'B2' in s else 'train'}\n" for s in listed]
    refused(ok + [f"{listed[2]},train\n"], rf"split.csv:{len(ok) + 2}: slide {listed[2]} "
                                           "is listed as both test and train")
    refused(ok[1:], rf"1 slide\(s\) .* not listed: \['{listed[0]}'\]")
    a1_split = [f"{listed[0]},test\n"] + ok[1:]
    refused(a1_split, "patient TCGA-A1-0001 has slides in both train and test")
    split.write_text("slide_id,split\n" + "".join(a1_split + [ok[2]]))  # exact repeat: fine
    assert main(args + ["--split-file", str(split), "--group-by", "slide"]) == 0
    shutil.rmtree(out)
    shutil.copy(tiles / f"{SLIDES[0]}.h5", tiles / "renamed-copy.h5")
    with pytest.raises(SystemExit, match="renamed-copy.h5 .* same slide id"):
        main(args)
    with h5py.File(tiles / "renamed-copy.h5", "a") as f:
        f.attrs["slide_id"] = "renamed-copy"  # same tiles under another slide id
    with pytest.raises(SystemExit, match="renamed-copy.h5 .* same content"):
        main(args)
    assert not out.exists()


@pytest.mark.parametrize("content, match", [
    (b"x,y\n1,2\n", r"split.csv: missing column\(s\) \['slide_id', 'split'\]"),
    (b"slide_id,split\n\xe9,train\n", "split.csv: not UTF-8 text"),
    (b"slide_id,split\nTCGA-A1-0001-01Z-00-DX1.aa,validation\n",
     r"split.csv: unknown split name\(s\) \['validation'\]"),
])
def test_unreadable_split_files_are_named(tmp_path, content, match):
    tiles, summaries = _make_inputs(tmp_path)
    split = tmp_path / "split.csv"
    split.write_bytes(content)
    with pytest.raises(SystemExit, match=match):
        main(["--tiles", str(tiles), "--summaries", str(summaries), "--out",
              str(tmp_path / "ds"), "--split-file", str(split)])
    assert not (tmp_path / "ds").exists()
