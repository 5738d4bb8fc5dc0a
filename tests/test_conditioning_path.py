"""Captions that differ only in the tumor level reach the U-Net differently, end to end.

Through training's own batch path (store -> TCGAPatchData -> Lightning training step -> U-Net)
and through scripts/sample.py (caption -> DDIM with guidance -> U-Net), a global forward hook
records the cross-attention context (text models) or the label_emb vector (the demo's model,
whose caption levels go in as a vector) that the U-Net is called with.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scripts_loader import load_script
from tcga_store import write_store
from tiny_ldm import build_tiny_model, save_checkpoint, tiny_model_config

from ldm.data.captions import class_label_from_levels
from ldm.data.tcga import TCGAPatchData
from ldm.modules.diffusionmodules.openaimodel import UNetModel

SUMMARY = "invasive ductal carcinoma, grade 2"
HIGH, LOW = f"high tumor; low til; {SUMMARY}", f"low tumor; low til; {SUMMARY}"


@pytest.fixture
def unet_contexts():
    """``(context, output)`` of every UNetModel call while the fixture is active."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, kwargs, output):
        if isinstance(module, UNetModel):
            seen.append((kwargs["context"].detach().clone(), output.detach().clone()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    yield seen
    handle.remove()


def _rows_equal(context: torch.Tensor, embedding: torch.Tensor) -> list[bool]:
    return [torch.allclose(row, embedding, atol=1e-6) for row in context]


def test_training_batches_carry_the_tumor_level(tmp_path, tiny_clip_dir, unet_contexts):
    grey = np.full((16, 16, 3), 128, np.uint8)
    store = write_store(tmp_path / "train.h5", [grey, grey], [0, 0], [0.9, 0.1], [0.2, 0.2],
                        ["TCGA-00"], [[SUMMARY]])
    model = build_tiny_model(tiny_model_config(tiny_clip_dir, use_ema=False))
    data = TCGAPatchData(batch_size=2, train={"path": str(store), "size": 16, "p_uncond": 0.0})
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    ((context, _),) = unet_contexts  # one training step, one U-Net call
    encode = model.cond_stage_model.encode
    high, low = encode([HIGH])[0], encode([LOW])[0]
    assert context.shape == (2, 154, 32)
    assert sorted(_rows_equal(context, high)) == [False, True]
    assert sorted(_rows_equal(context, low)) == [False, True]
    # and the denoiser's output depends on which one it gets
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([500])
    with torch.no_grad():
        out_high = model.apply_model(x, t, high[None])
        out_low = model.apply_model(x, t, low[None])
    assert (out_high - out_low).abs().max() > 1e-4


def test_sample_script_feeds_the_caption_to_the_unet(tmp_path, tiny_clip_dir, unet_contexts):
    cfg = tiny_model_config(tiny_clip_dir, use_ema=False)
    model = build_tiny_model(cfg)
    ckpt = save_checkpoint(model, tmp_path / "tiny.ckpt", {"model": cfg})
    sample = load_script("sample")
    conds, outputs = {}, {}
    for level in ("high", "low"):
        unet_contexts.clear()
        sample.main(["--ckpt", str(ckpt), "--tumor", level, "--til", "low", "--summary", SUMMARY,
                     "--n", "1", "--steps", "2", "--seed", "3", "--device", "cpu",
                     "--outdir", str(tmp_path / level)])
        assert len(unet_contexts) == 2  # two DDIM steps, guidance batched as [uncond, cond]
        conds[level], outputs[level] = unet_contexts[0]
        assert (tmp_path / level / "00000.png").is_file()
    encode = model.cond_stage_model.encode
    empty, high, low = encode([""])[0], encode([HIGH])[0], encode([LOW])[0]
    assert _rows_equal(conds["high"], empty) == [True, False]
    assert _rows_equal(conds["high"], high) == [False, True]
    assert _rows_equal(conds["low"], low) == [False, True]
    assert not torch.allclose(high, low)
    # same seed, same x_T: the unconditional halves agree, the conditional ones differ
    assert torch.equal(outputs["high"][0], outputs["low"][0])
    assert (outputs["high"][1] - outputs["low"][1]).abs().max() > 1e-4


def test_a_trainable_text_tower_learns_in_training_and_samples_with_its_weights(
        tmp_path, tiny_clip_dir, unet_contexts):
    """``cond_stage_trainable``: the training step's loss reaches the text tower, its embeddings
    follow the new weights (no stale cache), and sample.py encodes with the trained tower."""
    grey = np.full((16, 16, 3), 128, np.uint8)
    store = write_store(tmp_path / "train.h5", [grey, grey], [0, 0], [0.9, 0.1], [0.2, 0.2],
                        ["TCGA-00"], [[SUMMARY]])
    cfg = tiny_model_config(tiny_clip_dir, use_ema=False)
    cfg["params"]["cond_stage_trainable"] = True
    model = build_tiny_model(cfg)
    tower = model.cond_stage_model
    before = tower.encode([HIGH]).detach().clone()
    weights = {k: v.clone() for k, v in tower.state_dict().items()}
    data = TCGAPatchData(batch_size=2, train={"path": str(store), "size": 16, "p_uncond": 0.0})
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0).fit(model, data)
    moved = [k for k, v in tower.state_dict().items() if not torch.equal(v, weights[k])]
    assert any("encoder.layers" in k for k in moved) and any("token_embedding" in k for k in moved)
    with torch.no_grad():
        high = tower.encode([HIGH])[0]
    assert not torch.allclose(high, before[0])
    ckpt = save_checkpoint(model, tmp_path / "tiny.ckpt", {"model": cfg})
    unet_contexts.clear()
    load_script("sample").main(["--ckpt", str(ckpt), "--tumor", "high", "--til", "low",
                                "--summary", SUMMARY, "--n", "1", "--steps", "1", "--seed", "3",
                                "--device", "cpu", "--outdir", str(tmp_path / "s")])
    ((context, _),) = unet_contexts
    assert _rows_equal(context, high) == [False, True]


@pytest.fixture
def unet_vectors():
    """The ``y`` (label_emb input) of every UNetModel call while the fixture is active."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        if isinstance(module, UNetModel):
            seen.append(kwargs["y"].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    yield seen
    handle.remove()


def _demo_model_config(text_dir) -> dict:
    """The quick start's model (configs/demo: ldm_tiny.yaml + ldm_tiny_levels.yaml), random VQ."""
    from omegaconf import OmegaConf

    from ldm.config import merge_configs

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo"
    cfg = merge_configs(OmegaConf.load(demo / "ldm_tiny.yaml"),
                        OmegaConf.load(demo / "ldm_tiny_levels.yaml")).model
    cfg.params.first_stage_config.params.ckpt_path = None
    cfg.params.cond_stage_config.params.embedders.text.params.version = str(text_dir)
    cfg.params.use_ema = False
    return OmegaConf.to_container(cfg)


def test_demo_model_gets_the_tumor_level_in_training_and_sampling(tmp_path, tiny_clip_dir,
                                                                  unet_vectors):
    """The demo's levels reach the U-Net's label_emb from a training batch and from sample.py."""
    cfg = _demo_model_config(tiny_clip_dir)
    model = build_tiny_model(cfg)
    grey = np.full((64, 64, 3), 128, np.uint8)
    store = write_store(tmp_path / "train.h5", [grey, grey], [0, 0], [0.9, 0.1], [0.2, 0.2],
                        ["TCGA-00"], [[SUMMARY]])
    data = TCGAPatchData(batch_size=2, train={"path": str(store), "size": 64, "p_uncond": 0.0})
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0).fit(model, data)
    ((y,),) = [unet_vectors]
    levels = model.cond_stage_model.embedders["levels"].embedding.weight.detach()
    assert y.shape == (2, 128) and not torch.allclose(y[0], y[1])
    # ucg_rate 0.1 may have dropped a label: each row is one of the five class embeddings
    assert all(any(torch.allclose(row, e, atol=1e-6) for e in levels) for row in y)

    ckpt = save_checkpoint(model, tmp_path / "demo.ckpt", {"model": cfg})
    sample = load_script("sample")
    ys = {}
    for level in ("high", "low"):
        unet_vectors.clear()
        sample.main(["--ckpt", str(ckpt), "--tumor", level, "--til", "low", "--summary", SUMMARY,
                     "--n", "1", "--steps", "2", "--seed", "3", "--device", "cpu",
                     "--outdir", str(tmp_path / level)])
        ys[level] = unet_vectors[0]  # guidance batched as [uncond, cond]
    high, low = levels[class_label_from_levels("high", "low")], levels[
        class_label_from_levels("low", "low")]
    assert torch.allclose(ys["high"][1], high, atol=1e-6)
    assert torch.allclose(ys["low"][1], low, atol=1e-6)
    assert torch.equal(ys["high"][0], ys["low"][0]) and not torch.allclose(high, low)
