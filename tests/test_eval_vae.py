"""eval_vae.py: SSIM/MSE/PSNR of tiny random first stages on a tiny store, Tables 2/3 layout."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scripts_loader import load_script
from skimage.metrics import structural_similarity
from tcga_store import random_store

from ldm.evaluation.images import (
    PartitionDataset,
    SplitStore,
    open_images,
    pil_to_tensor,
    to_uint8,
)
from ldm.evaluation.reconstruction import MSE_FLOOR, image_metrics, load_first_stage
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
DDCONFIG = {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0}
VQ = {"target": "ldm.models.autoencoder.VQModelInterface",
      "params": {"embed_dim": 3, "n_embed": 16, "ddconfig": DDCONFIG,
                 "lossconfig": {"target": "torch.nn.Identity"}}}
KL = {"target": "ldm.models.autoencoder.AutoencoderKL",
      "params": {"embed_dim": 4, "ddconfig": {**DDCONFIG, "double_z": True, "z_channels": 4},
                 "lossconfig": {"target": "torch.nn.Identity"}}}



def save_model(cfg: dict, tmp: Path, name: str, prefix: str = "") -> tuple[Path, Path]:
    """A randomly initialised model's checkpoint (keys optionally prefixed) and its YAML config."""
    torch.manual_seed(len(name))
    model = instantiate_from_config(cfg)
    for p in model.parameters():  # redraw so reconstructions are not trivially blank
        p.data.normal_(0, 0.1)
    ckpt = tmp / f"{name}.ckpt"
    torch.save({"state_dict": {prefix + k: v for k, v in model.state_dict().items()}}, ckpt)
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"model": cfg}))
    return ckpt, config


def test_image_metrics_known_values():
    a = np.random.default_rng(0).integers(0, 250, (16, 16, 3), dtype=np.uint8)
    ssim, mse, psnr = image_metrics(a, a)
    assert (ssim, mse) == (1.0, 0.0)
    assert psnr == pytest.approx(10 * math.log10(255**2 / MSE_FLOOR))
    ssim, mse, psnr = image_metrics(a, a + 2)
    assert mse == 4.0 and psnr == pytest.approx(10 * math.log10(255**2 / 4))
    wang = structural_similarity(a, a + 2, channel_axis=2, data_range=255,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim == pytest.approx(wang)
    assert ssim < 1.0


def test_ssim_is_wang_by_default():
    """Default SSIM: Wang et al.'s Gaussian window; skimage's uniform default reads differently."""
    rng = np.random.default_rng(1)
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                   .resize((48, 48), Image.BILINEAR))
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    wang = structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)
    plain = structural_similarity(a, b, channel_axis=2, data_range=255)
    assert abs(wang - plain) > 1e-3
    assert image_metrics(a, b)[0] == pytest.approx(wang, abs=1e-12)
    assert image_metrics(a, b, ssim="uniform")[0] == pytest.approx(plain, abs=1e-12)
    with pytest.raises(ValueError, match="unknown SSIM setting"):
        image_metrics(a, b, ssim="nope")


def test_partition_every_full_crop(tmp_path):
    """--partition: every full non-overlapping crop of every image, remainders left out."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(2)
    arrays = {"a.png": rng.integers(0, 256, (40, 70, 3), dtype=np.uint8),  # 2 x 4 crops of 16
              "b.png": rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)}  # 3 x 3
    for name, arr in arrays.items():
        Image.fromarray(arr).save(folder / name)
    data = PartitionDataset(open_images(folder), 16)
    assert len(data) == 8 + 9
    assert data.crops[:5] == [(0, 0, 0), (0, 16, 0), (0, 32, 0), (0, 48, 0), (0, 0, 16)]
    expected = arrays["b.png"][32:48, 16:32]
    assert torch.equal(data[8 + 7], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)

    _, vq_cfg = save_model(VQ, tmp_path, "vq")
    vq_ckpt = tmp_path / "vq.ckpt"
    out = tmp_path / "p.json"
    rows = load_script("eval_vae").main([
        "--data", str(folder), "--config", str(vq_cfg), "--ckpt", str(vq_ckpt),
        "--partition", "16", "32", "--device", "cpu", "--out", str(out)])
    assert [(r["crop_mode"], r["crop"], r["n"], r["image_size"]) for r in rows] == [
        ("partition", 16, 17, "16x16"), ("partition", 32, 3, "32x32")]
    saved = json.loads(out.read_text())
    assert saved["ssim"] == {"setting": "wang", "gaussian_weights": True, "sigma": 1.5,
                             "use_sample_covariance": False}


def test_eval_vae_tables(tmp_path, capsys):
    """VQ (via quantization) and KL (posterior mode) rows match a direct computation."""
    store = random_store(tmp_path / "test.h5", n=6, tile=32)
    vq_ckpt, vq_cfg = save_model(VQ, tmp_path, "vq", prefix="first_stage_model.")
    kl_ckpt, kl_cfg = save_model(KL, tmp_path, "kl")
    out = tmp_path / "vae.json"
    rows = load_script("eval_vae").main([
        "--data", str(store), "--config", str(vq_cfg), "--ckpt", str(vq_ckpt), "--name", "VQ",
        "--config", str(kl_cfg), "--ckpt", str(kl_ckpt), "--name", "KL", "--crop", "32", "16",
        "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert "MSE ↓ (0-255)" in text and "Latent size" in text and "0-255 scale" in text
    assert [(r["name"], r["image_size"], r["latent_size"], r["f"]) for r in rows] == [
        ("VQ", "32x32", "16x16x3", 2), ("VQ", "16x16", "8x8x3", 2),
        ("KL", "32x32", "16x16x4", 2), ("KL", "16x16", "8x8x4", 2)]
    assert json.loads(out.read_text())["results"][0]["mse"] == rows[0]["mse"]

    # direct computation for the VQ row: decode quantizes the pre-quantization latent
    model = load_first_stage({"model": VQ}, vq_ckpt)
    ds = SplitStore(store)
    x = torch.stack([pil_to_tensor(ds.image(i)) for i in range(6)]) * 2 - 1
    with torch.no_grad():
        h = model.encode(x)
        rec = model.decoder(model.post_quant_conv(model.quantize(h)[0]))
    scores = np.array([image_metrics(a, b) for a, b in zip(to_uint8(x), to_uint8(rec))])
    assert rows[0]["ssim"] == pytest.approx(scores[:, 0].mean(), rel=1e-6)
    assert rows[0]["mse"] == pytest.approx(scores[:, 1].mean(), rel=1e-6)
    assert rows[0]["psnr"] == pytest.approx(scores[:, 2].mean(), rel=1e-6)
    assert rows[0]["mse"] > 0 and -1 <= rows[0]["ssim"] < 1

    # KL: the mode is deterministic; a posterior sample gives different numbers
    again = load_script("eval_vae").main([
        "--data", str(store), "--config", str(kl_cfg), "--ckpt", str(kl_ckpt), "--device", "cpu",
        "--kl-sample", "--out", str(tmp_path / "s.json")])
    assert again[0]["mse"] != pytest.approx(rows[2]["mse"], rel=1e-9)


def test_first_stage_of_an_ldm_checkpoint(tmp_path):
    """An LDM checkpoint with embedded config evaluates its own first stage (--ckpt '-')."""
    from tiny_ldm import build_tiny_model, save_checkpoint, tiny_model_config

    cfg = tiny_model_config(None, use_ema=False)
    model = build_tiny_model(cfg)
    ckpt = save_checkpoint(model, tmp_path / "ldm.ckpt", {"model": cfg})
    store = random_store(tmp_path / "test.h5", n=3, tile=16)
    rows = load_script("eval_vae").main(["--data", str(store), "--config", str(ckpt),
                                         "--device", "cpu", "--out", str(tmp_path / "o.json")])
    assert (rows[0]["name"], rows[0]["latent_size"], rows[0]["f"]) == ("ldm", "8x8x3", 2)
    ds = SplitStore(store)
    x = torch.stack([pil_to_tensor(ds.image(i)) for i in range(3)]) * 2 - 1
    with torch.no_grad():
        rec = model.decode_first_stage(model.encode_first_stage(x))
    mse = np.mean([image_metrics(a, b)[1] for a, b in zip(to_uint8(x), to_uint8(rec))])
    assert rows[0]["mse"] == pytest.approx(mse, rel=1e-6)


def test_eval_vae_errors(tmp_path):
    """Mismatched flags and missing weights fail with status 1 and a clear message."""
    import subprocess
    import sys

    store = random_store(tmp_path / "test.h5", n=2, tile=32)
    _, cfg = save_model(VQ, tmp_path, "vq")
    script = str(ROOT / "scripts" / "eval_vae.py")
    out = subprocess.run([sys.executable, script, "--data", str(store), "--config", str(cfg),
                          "--ckpt", str(tmp_path / "missing.ckpt"), "--device", "cpu",
                          "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert out.returncode == 1
    assert "missing.ckpt" in out.stderr
    with pytest.raises(ValueError, match="--name per --config"):
        load_script("eval_vae").main(["--data", str(store), "--config", str(cfg), "--config",
                                      str(cfg), "--ckpt", "a", "--device", "cpu"])
