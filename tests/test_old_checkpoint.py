"""A run directory written by main.py before the Conditioner existed resumes and samples.

``tests/fixtures/main_ea56854_run`` (see its README) is the demo's model shrunk to test size:
training resumes from its ``last.ckpt`` with its own configs (strict state-dict load, optimizer,
scheduler, data position), and ``scripts/sample.py`` samples from it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from scripts_loader import load_script
from tcga_store import random_store

import main
from ldm.modules.encoders.tiny import build_tiny_clip_text_encoder
from ldm.trainer_setup import RUN_TIMESTAMP_ENV

FIXTURE = Path(__file__).parent / "fixtures" / "main_ea56854_run"
OLD_CKPT = FIXTURE / "checkpoints" / "last.ckpt"


def _demo_tree(root: Path) -> None:
    """The demo's relative paths the fixture's config names (text tower, training store)."""
    build_tiny_clip_text_encoder(root / "outputs/demo/text_encoder", hidden_size=4,
                                 num_layers=1, num_heads=1, intermediate_size=8)
    store = root / "outputs/demo/data/dataset/train.h5"
    store.parent.mkdir(parents=True)
    random_store(store, n=4, tile=32, n_slides=2)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_fixture_is_small_and_from_main_py():
    assert OLD_CKPT.stat().st_size < 7_000_000
    old = _load(OLD_CKPT)
    assert old["global_step"] == 2 and old["TCGAPatchData"] == {"epoch": 1, "batches": 0}
    target = old["config"]["model"]["params"]["cond_stage_config"]["target"]
    assert target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert any(k.startswith("cond_stage_model.transformer.") for k in old["state_dict"])


def test_old_checkpoint_loads_strictly_and_samples(tmp_path, monkeypatch):
    from ldm.checkpoint import load_model
    from ldm.evaluation.sampling import make_sampler, sample_batch

    _demo_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    model = load_model(OLD_CKPT, weights="raw").model
    assert model.conditioning_fields() == ["caption"] and model.supports_guidance()
    images = sample_batch(model, make_sampler(model), ["high tumor; low til; a summary", ""],
                          [0, 1], steps=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"


@pytest.mark.slow
def test_old_run_resumes_training_and_samples(tmp_path, monkeypatch):
    run = tmp_path / "logs" / "2026-01-01T00-00-00_demo_tiny"
    shutil.copytree(FIXTURE, run)
    _demo_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RUN_TIMESTAMP_ENV, "2026-01-02T00-00-00")
    assert main.main(["-r", str(run), "-t", "--accelerator", "cpu",
                      "lightning.trainer.max_steps=3",
                      "lightning.callbacks.image_logger.params.disabled=true"]) == 0
    old, new = _load(OLD_CKPT), _load(run / "checkpoints" / "last.ckpt")
    assert new["global_step"] == 3
    assert new["TCGAPatchData"] == {"epoch": 1, "batches": 1}
    assert new["state_dict"].keys() == old["state_dict"].keys()  # cond_stage_model.* kept
    moved = [k for k in old["state_dict"] if k.startswith("model.")
             and not torch.equal(old["state_dict"][k], new["state_dict"][k])]
    assert moved  # the resumed step trained the U-Net
    frozen = [k for k in old["state_dict"] if k.startswith("cond_stage_model.")]
    assert all(torch.equal(old["state_dict"][k], new["state_dict"][k]) for k in frozen)

    sample = load_script("sample")
    out = tmp_path / "samples"
    meta = sample.main(["--ckpt", str(OLD_CKPT), "--tumor", "high", "--til", "low",
                        "--summary", "invasive ductal carcinoma", "--n", "2", "--steps", "2",
                        "--device", "cpu", "--outdir", str(out)])
    assert meta["conditions"] == ["high tumor; low til; invasive ductal carcinoma"]
    records = json.loads((out / "metadata.json").read_text())["images"]
    assert [(r["tumor"], r["til"]) for r in records] == [("high", "low")] * 2
    assert all((out / r["file"]).is_file() for r in records)
