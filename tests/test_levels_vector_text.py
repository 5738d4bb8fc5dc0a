"""Levels as a vector into label_emb plus the summary as text: the overlay trains through
main.py and samples through sample.py with joint and separate guidance."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from scripts_loader import load_script
from tcga_store import random_store

import main
from ldm.config import merge_configs
from ldm.data.captions import levels_batch
from ldm.models.diffusion.ddim import chained_eps
from ldm.trainer_setup import RUN_TIMESTAMP_ENV

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"


def _embedders(*files: Path) -> dict:
    cfg = merge_configs(*(OmegaConf.load(f) for f in files))
    return OmegaConf.to_container(cfg.model.params.cond_stage_config)


def test_ablation_and_demo_overlays_describe_the_same_model():
    ablation = _embedders(ROOT / "configs" / "pathldm.yaml",
                          ROOT / "configs" / "ablations" / "levels_vector_text.yaml")
    demo = _embedders(DEMO / "ldm_tiny.yaml", DEMO / "ldm_tiny_levels.yaml")
    for cfg in (ablation, demo):
        assert cfg["target"] == "ldm.modules.encoders.conditioner.Conditioner"
        spec = {name: (e["input_key"], e["kind"], e["ucg_rate"], e.get("is_trainable", False))
                for name, e in cfg["params"]["embedders"].items()}
        assert spec == {"levels": ("class_label", "vector", 0.1, True),
                        "text": ("summary", "crossattn", 0.1, False)}
    plip = ablation["params"]["embedders"]["text"]["params"]
    assert plip == {"version": "vinid/plip", "max_length": 154}


def test_chained_guidance_formula():
    def denoiser(x, t, c):
        return x * c  # one "eps" per conditioning value

    x, t = torch.ones(1, 1, 1, 1), torch.zeros(1, dtype=torch.long)
    conds = [torch.full((1, 1, 1, 1), v) for v in (1.0, 3.0, 4.0)]  # e_uu, e_lu, e_lt
    out = chained_eps(denoiser, x, t, conds, [2.0, 0.5])
    assert float(out) == 1.0 + 2.0 * (3.0 - 1.0) + 0.5 * (4.0 - 3.0)
    joint = chained_eps(denoiser, x, t, [conds[0], conds[2]], [1.75])
    assert float(joint) == pytest.approx(1.0 + 1.75 * 3.0)
    with pytest.raises(ValueError, match="need 2 scales"):
        chained_eps(denoiser, x, t, conds, [1.0])


def _redraw_unet(path: Path) -> None:
    """Random U-Net weights (two training steps leave its zero output layer near zero, so the
    conditioning would barely show in the samples)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in ckpt["state_dict"].items():
        if k.startswith(("model.", "model_ema.")) and v.is_floating_point() and v.dim():
            ckpt["state_dict"][k] = torch.randn(v.shape, generator=g) * 0.05
    torch.save(ckpt, path)


def test_demo_levels_model_trains_its_embedders(tiny_clip_dir):
    """The merged demo overlay builds; one loss reaches label_emb and the levels embedder."""
    from tiny_ldm import build_tiny_model

    cfg = merge_configs(OmegaConf.load(DEMO / "ldm_tiny.yaml"),
                        OmegaConf.load(DEMO / "ldm_tiny_levels.yaml"))
    p = cfg.model.params
    p.first_stage_config.params.ckpt_path = None
    p.cond_stage_config.params.embedders.text.params.version = str(tiny_clip_dir)
    model = build_tiny_model(OmegaConf.to_container(cfg.model)).train()
    batch = {**levels_batch([("high", "low"), ("low", "high")], ["one", "two"]),
             "image": torch.rand(2, 64, 64, 3) * 2 - 1}
    loss, _ = model.shared_step(batch)
    loss.backward()
    levels = model.cond_stage_model.embedders["levels"].embedding.weight
    assert levels.grad is not None and levels.grad[[1, 2]].abs().sum() > 0
    assert model.model.diffusion_model.label_emb[0][0].weight.grad.abs().sum() > 0
    assert not any(q.requires_grad for q in model.cond_stage_model.embedders["text"].parameters())


@pytest.mark.slow
def test_demo_levels_overlay_trains_and_samples(tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.setenv(RUN_TIMESTAMP_ENV, "2026-01-03T00-00-00")
    store = random_store(tmp_path / "train.h5", n=4, tile=64, n_slides=2)
    logs = tmp_path / "logs"
    argv = ["--base", str(DEMO / "ldm_tiny.yaml"), str(DEMO / "ldm_tiny_levels.yaml"), "-t",
            "--accelerator", "cpu", "-l", str(logs),
            "model.params.first_stage_config.params.ckpt_path=null",
            f"model.params.cond_stage_config.params.embedders.text.params.version={tiny_clip_dir}",
            f"data.params.train.path={store}", "data.params.batch_size=2",
            "lightning.trainer.max_steps=2",
            "lightning.modelcheckpoint.params.every_n_train_steps=2",
            "lightning.callbacks.image_logger.params.batch_frequency=2",
            "lightning.callbacks.image_logger.params.max_images=2",
            "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2"]
    assert main.main(argv) == 0
    (run,) = logs.iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == 2
    assert "model.diffusion_model.label_emb.0.0.weight" in sd
    assert sd["cond_stage_model.embedders.levels.embedding.weight"].shape == (5, 128)
    assert any(k.startswith("cond_stage_model.embedders.text.transformer.") for k in sd)
    images = {p.name.split("_")[0] for p in (run / "images" / "train").iterdir()}
    assert {"inputs", "samples", "captions"} <= images

    _redraw_unet(run / "checkpoints" / "last.ckpt")
    sample = load_script("sample")
    common = ["--ckpt", str(run), "--tumor", "high", "--til", "low", "--summary",
              "invasive ductal carcinoma", "--n", "1", "--steps", "3", "--device", "cpu"]
    joint = sample.main([*common, "--guidance", "3", "--outdir", str(tmp_path / "joint")])
    assert joint["conditions"] == ["high tumor; low til; invasive ductal carcinoma"]
    assert "guidance" not in joint and joint["scale"] == 3.0
    sep = sample.main([*common, "--guidance-levels", "3", "--guidance-text", "1",
                       "--outdir", str(tmp_path / "separate")])
    assert sep["guidance"] == [["levels", 3.0], ["text", 1.0]]
    assert (tmp_path / "separate" / "00000.png").is_file()
    _check_guidance_latents(run)


def _check_guidance_latents(run: Path) -> None:
    """Equal separate scales telescope to the joint scale; the text scale matters (compared on
    latents: the VQ decoder's re-quantization hides small differences in the images)."""
    from ldm.checkpoint import load_model
    from ldm.data.captions import levels_batch
    from ldm.evaluation.sampling import guidance_chain, initial_noise, make_sampler

    model = load_model(run).model
    batch = levels_batch([("high", "low")], "invasive ductal carcinoma")
    c, uc = model.get_conditioning(batch), model.get_unconditional_conditioning(1)
    shape = (model.channels, model.image_size, model.image_size)
    sampler = make_sampler(model)

    def run_ddim(**kw):
        return sampler.sample(S=3, batch_size=1, shape=shape, conditioning=c, verbose=False,
                              x_T=initial_noise([0], shape, "cpu"), **kw)[0]

    joint = run_ddim(unconditional_guidance_scale=3.0, unconditional_conditioning=uc)
    u0, same = guidance_chain(model, batch, [("levels", 3.0), ("text", 3.0)])
    assert torch.allclose(run_ddim(unconditional_conditioning=u0, guidance_chain=same), joint,
                          atol=1e-4)
    u0, no_text = guidance_chain(model, batch, [("levels", 3.0), ("text", 0.0)])
    levels_only = run_ddim(unconditional_conditioning=u0, guidance_chain=no_text)
    assert (levels_only - joint).abs().max() > 1e-3
