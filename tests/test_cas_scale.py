"""CAS at the paper's scale: sharded generation into HDF5 store parts, streamed into training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripts_loader import load_script
from tcga_store import write_store

from ldm.evaluation.cas import synthetic_datasets, synthetic_stores
from ldm.evaluation.images import SplitStore
from ldm.evaluation.sampling import caption_plan


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, tiny_clip_dir) -> Path:
    from tiny_ldm import build_tiny_model, save_checkpoint, tiny_model_config

    cfg = tiny_model_config(tiny_clip_dir, use_ema=False)
    return save_checkpoint(build_tiny_model(cfg), tmp_path_factory.mktemp("ldm") / "m.ckpt",
                           {"model": cfg})


def prompt_store(path: Path, tumor: list[float], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    images = [np.asarray(Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
                         .resize((16, 16), Image.BILINEAR)) for _ in tumor]
    return write_store(path, images, [i % 2 for i in range(len(tumor))], tumor,
                       [0.3] * len(tumor), ["A", "B"], [["a summary"], ["b summary"]],
                       split="train")


def test_sharded_store_generation_streams_into_cas(text_ckpt, tmp_path, monkeypatch):
    fid = load_script("fid")
    prompts = prompt_store(tmp_path / "train.h5", [0.1, 0.9, 0.2, 0.8], seed=1)
    out = tmp_path / "gen"
    common = ["generate", "--ckpt", str(text_ckpt), "--store", str(prompts), "--n", "5",
              "--steps", "2", "--device", "cpu", "--format", "store", "--part-size", "2",
              "--batch-size", "2", "--outdir", str(out)]
    first = fid.main([*common, "--shard", "0/2"])
    assert sorted(p.name for p in out.glob("part-*.h5")) == ["part-000000.h5", "part-000002.h5"]
    assert (first["generated"], first["shard_size"]) == (3, 3)
    fid.main([*common, "--shard", "1/2"])
    parts = synthetic_stores(out)
    assert [len(p) for p in parts] == [2, 2, 1] and not list(out.glob("*.png"))

    expected = caption_plan(SplitStore(prompts), 5, seed=0)  # as the PNG format's plan
    rows = [(int(i), str(c), float(t)) for p in parts for i, c, t in
            zip(p.array("sample_index"), p.array("caption"), p.array("tumor_prob"))]
    assert rows == [(r["index"], r["caption"], float(r["tumor"] == "high")) for r in expected]
    assert parts[0].image(1).size == (16, 16) and parts[0].attrs["split"] == "generated"
    assert json.loads(parts[0].attrs["generation"])["prompt_sampling"] == "uniform"

    # a lost part (a killed shard) is generated again, identically; complete parts are kept
    before = (out / "part-000001.h5").stat().st_mtime_ns, np.asarray(parts[1].image(0))
    kept = (out / "part-000000.h5").stat().st_mtime_ns
    (out / "part-000001.h5").unlink()
    again = fid.main([*common, "--shard", "1/2"])
    assert again["generated"] == 2 and (out / "part-000000.h5").stat().st_mtime_ns == kept
    assert np.array_equal(np.asarray(SplitStore(out / "part-000001.h5").image(0)), before[1])
    assert not list(out.glob("*.tmp"))
    with pytest.raises(ValueError, match="other settings.*part_size"):
        fid.main([*common[:-4], "--part-size", "3", "--outdir", str(out)])

    datasets = synthetic_datasets(out, None)
    labels = [int(y) for d in datasets for _, y in d]
    assert labels == [int(r["tumor"] == "high") for r in expected]

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_cache"))
    test = prompt_store(tmp_path / "test.h5", [0.3, 0.6, 0.7, 0.1], seed=2)
    (row,) = load_script("cas").main([
        "--real-test", str(test), "--synthetic", str(out), "--epochs", "1", "--batch-size",
        "4", "--device", "cpu", "--out", str(tmp_path / "cas.json"), "--no-pretrained"])
    assert row["mode"] == "synthetic" and row["n_train"] == 5 and row["n"] == 4
