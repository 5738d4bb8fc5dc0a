"""sample.py with a tiny text-conditional LDM trained here by main.py (run directory, EMA)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scripts_loader import load_script
from tcga_store import random_store
from tiny_ldm import build_tiny_model, save_checkpoint, tiny_model_config

from ldm.evaluation.images import list_image_files

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_clip_dir) -> Path:
    """Three Lightning steps of a tiny text-conditional LDM on random patches via main.py."""
    import main

    tmp = tmp_path_factory.mktemp("train")
    store = random_store(tmp / "train.h5", n=8, tile=24, n_slides=2)
    cfg = {"model": tiny_model_config(tiny_clip_dir, use_ema=True),
           "data": {"target": "ldm.data.tcga.TCGAPatchData",
                    "params": {"batch_size": 4, "num_workers": 0,
                               "train": {"path": str(store), "size": 16, "p_uncond": 0.25}}},
           "lightning": {"trainer": {"max_steps": 3, "enable_progress_bar": False,
                                     "num_sanity_val_steps": 0, "limit_val_batches": 0,
                                     "enable_model_summary": False, "log_every_n_steps": 1},
                         "callbacks": {"image_logger": None},
                         "loggers": {"tensorboard": None, "csv": None}}}
    path = tmp / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    assert main.main(["--base", str(path), "-t", "--accelerator", "cpu", "-l",
                      str(tmp / "logs")]) == 0
    (run,) = (tmp / "logs").iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))}


def test_sample_text_model(run_dir, tmp_path, capsys):
    """Requested images, grid and metadata; same seed -> same images, whatever the batch size."""
    sample = load_script("sample")
    common = ["--ckpt", str(run_dir), "--tumor", "high", "--til", "low",
              "--summary", "invasive ductal carcinoma", "--prompt", "lobular carcinoma",
              "--n", "2", "--steps", "3", "--seed", "7", "--device", "cpu"]
    meta = sample.main([*common, "--batch-size", "3", "--outdir", str(tmp_path / "a")])
    a = pngs(tmp_path / "a")
    assert sorted(a) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert all(img.shape == (16, 16, 3) and img.dtype == np.uint8 for img in a.values())
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # one row per prompt, 2-pixel padding
    saved = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert saved == json.loads(json.dumps(meta))
    assert saved["conditions"] == ["high tumor; low til; invasive ductal carcinoma",
                                   "high tumor; low til; lobular carcinoma"]
    assert (saved["seed"], saved["steps"], saved["scale"], saved["eta"]) == (7, 3, 1.75, 0.0)
    assert saved["weights"] == "ema" and saved["checkpoint"].endswith("last.ckpt")
    assert saved["global_step"] == 3 and saved["conditioning"] == "text"
    assert [r["prompt"] for r in saved["images"]] == [saved["conditions"][0]] * 2 + [
        saved["conditions"][1]] * 2
    assert len({r["seed"] for r in saved["images"]}) == 4
    assert all((r["tumor"], r["til"]) == ("high", "low") for r in saved["images"])
    assert len({img.tobytes() for img in a.values()}) == 4
    # FID on this folder reads the samples, not the grid
    assert [p.name for p in list_image_files(tmp_path / "a")] == sorted(a)

    sample.main([*common, "--batch-size", "1", "--outdir", str(tmp_path / "b")])
    b = pngs(tmp_path / "b")
    for name in a:  # per-image seeds: batching changes at most float rounding
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name
    sample.main([*common, "--batch-size", "3", "--outdir", str(tmp_path / "c")])
    assert all(np.array_equal(a[k], v) for k, v in pngs(tmp_path / "c").items())

    # resume: only the missing image is generated again, identical to before
    (tmp_path / "a" / "00002.png").unlink()
    capsys.readouterr()
    sample.main([*common, "--batch-size", "3", "--outdir", str(tmp_path / "a")])
    assert capsys.readouterr().out.startswith("1 new images")
    assert np.abs(pngs(tmp_path / "a")["00002.png"].astype(int) - a["00002.png"]).max() <= 1
    with pytest.raises(ValueError, match="different run.*seed"):
        sample.main([*common[:-4], "--seed", "9", "--outdir", str(tmp_path / "a")])


def test_all_levels_grid_of_one_summary(run_dir, tmp_path):
    """--all-levels: the four combinations as labelled rows, one seed per column (Figure 4)."""
    from ldm.evaluation.grids import labelled_grid
    from ldm.evaluation.sampling import image_seed

    summary = "invasive ductal carcinoma, grade 2, margins negative"
    meta = load_script("sample").main([
        "--ckpt", str(run_dir), "--all-levels", "--summary", summary, "--n", "2", "--steps",
        "2", "--seed", "3", "--device", "cpu", "--batch-size", "8", "--outdir",
        str(tmp_path / "f")])
    combos = [("low", "low"), ("low", "high"), ("high", "low"), ("high", "high")]
    assert meta["conditions"] == [f"{t} tumor; {i} til; {summary}" for t, i in combos]
    assert meta["all_levels"] is True and meta["summary"] == summary
    recs = meta["images"]
    assert [(r["tumor"], r["til"]) for r in recs] == [c for c in combos for _ in range(2)]
    assert [r["seed"] for r in recs] == [image_seed(3, j) for _ in combos for j in range(2)]
    tiles = pngs(tmp_path / "f")
    ordered = [tiles[r["file"]] for r in recs]
    col = [[ordered[2 * r + j].astype(int) for r in range(4)] for j in range(2)]
    within = max(np.abs(c[r] - c[0]).mean() for c in col for r in range(4))
    across = min(np.abs(col[0][r] - col[1][r]).mean() for r in range(4))
    assert within < across  # a column shares its noise; only the levels change down a column
    grid = np.asarray(Image.open(tmp_path / "f" / "grid.png"))
    expected = labelled_grid([ordered[k:k + 2] for k in range(0, 8, 2)],
                             [f"{t} tumor, {i} TIL" for t, i in combos], title=summary)
    assert np.array_equal(grid, expected)
    assert grid.shape[0] > 4 * 18 + 2 and grid.shape[1] > 2 * 18 + 2  # title and labels
    assert np.array_equal(grid[-18:-2, -18:-2], ordered[-1])  # bottom right: high/high, col 2
    assert (grid[: grid.shape[0] - (4 * 18 + 2)] < 128).any()  # the summary is written on top
    assert (grid[-(4 * 18 + 2):, : grid.shape[1] - (2 * 18 + 2)] < 128).any()  # row labels
    with pytest.raises(ValueError, match="only --summary"):
        load_script("sample").main(["--ckpt", str(run_dir), "--all-levels", "--summary", "s",
                                    "--tumor", "low", "--til", "low", "--outdir",
                                    str(tmp_path / "g")])
    with pytest.raises(ValueError, match="rows for"):
        labelled_grid([ordered[:2]], ["a", "b"])


def test_image_seeds_depend_on_seed_and_index_only():
    from ldm.evaluation.sampling import image_seed, initial_noise

    seeds = [image_seed(7, i) for i in range(100)]
    assert len(set(seeds)) == 100 and seeds == [image_seed(7, i) for i in range(100)]
    assert image_seed(8, 0) not in seeds and image_seed(6, 1) != image_seed(7, 0)
    one = initial_noise(seeds[:3], (3, 4, 4), "cpu")
    assert torch.equal(one[1:], initial_noise(seeds[1:3], (3, 4, 4), "cpu"))


def test_raw_weights_and_long_prompt_warning(run_dir, tmp_path, capsys):
    sample = load_script("sample")
    long_prompt = " ".join(["carcinoma"] * 200)
    meta = sample.main(["--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--prompt",
                        long_prompt, "--weights", "raw", "--n", "1", "--steps", "2",
                        "--scale", "1.0", "--device", "cpu", "--outdir", str(tmp_path / "r")])
    assert meta["weights"] == "raw" and meta["scale"] == 1.0
    err = capsys.readouterr().err
    assert "more than the 154 the text encoder reads" in err


def test_class_conditional_model(tmp_path):
    """--tumor/--til map to the class label; --class-label is taken as given."""
    cfg = tiny_model_config(None, use_ema=False)
    ckpt = save_checkpoint(build_tiny_model(cfg), tmp_path / "cls.ckpt", {"model": cfg})
    sample = load_script("sample")
    common = ["--ckpt", str(ckpt), "--n", "1", "--steps", "2", "--device", "cpu"]
    meta = sample.main([*common, "--tumor", "high", "--til", "low", "--outdir",
                        str(tmp_path / "a")])
    assert meta["conditioning"] == "class" and meta["conditions"] == [2]
    assert meta["weights"] == "raw"
    assert (meta["images"][0]["tumor"], meta["images"][0]["til"]) == ("high", "low")
    meta = sample.main([*common, "--class-label", "0", "--class-label", "3", "--outdir",
                        str(tmp_path / "b")])
    assert meta["conditions"] == [0, 3] and len(pngs(tmp_path / "b")) == 2
    assert not np.array_equal(*pngs(tmp_path / "b").values())
    with pytest.raises(KeyError, match="no EMA weights"):
        sample.main([*common, "--class-label", "1", "--weights", "ema", "--outdir",
                     str(tmp_path / "c")])
    with pytest.raises(ValueError, match="--tumor and --til together"):
        sample.main([*common, "--tumor", "high", "--outdir", str(tmp_path / "d")])


def test_cli_help_and_exit_status(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load_script("sample").main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--prompt-file", "--tumor", "--summary", "--weights", "--scale", "1.75",
                 "--class-label", "metadata.json"):
        assert flag in text
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--ckpt",
                          str(tmp_path / "missing.ckpt"), "--prompt", "x", "--device", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "missing.ckpt" in out.stderr
