"""Cached first-stage latents: written once (resumably), read back matching the crop's flips."""
import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scripts_loader import load_script
from tcga_store import random_store

import ldm.data.latents as latents_mod
from ldm.data.latents import cache_latents
from ldm.data.tcga import TCGAPatchDataset
from ldm.util import instantiate_from_config

VQ = {"target": "ldm.models.autoencoder.VQModelInterface",
      "params": {"embed_dim": 3, "n_embed": 16,
                 "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 16,
                              "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1],
                              "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
                 "lossconfig": {"target": "torch.nn.Identity"}}}


@pytest.fixture
def vq():
    torch.manual_seed(0)
    return instantiate_from_config(VQ).eval()


def test_cached_latents_match_the_flipped_tile(tmp_path, vq):
    store = random_store(tmp_path / "train.h5", n=5, tile=16)
    out = cache_latents(store, vq, tmp_path / "latents.h5", batch_size=2)
    with h5py.File(out, "r") as f:
        assert f["latents"].shape == (5, 4, 3, 8, 8) and f["latents"].dtype == np.float16
        assert f.attrs["n_done"] == 5
    assert not (tmp_path / "latents.h5.tmp").exists()
    ds = TCGAPatchDataset(store, size=16, flip=True, latents_path=out)
    plain = TCGAPatchDataset(store, size=16, flip=False)
    items = [ds[i % 5] for i in range(40)]
    with torch.no_grad():
        expected = vq.encode(torch.stack([it["image"] for it in items]).permute(0, 3, 1, 2))
    torch.testing.assert_close(torch.stack([it["latent"] for it in items]), expected,
                               atol=2e-2, rtol=1e-2)
    seen = set()
    for i, item in enumerate(items):
        ref = plain[i % 5]["image"]
        seen |= {name for name, dims in (("none", ()), ("h", (1,)), ("v", (0,)), ("hv", (0, 1)))
                 if torch.equal(item["image"], ref.flip(dims) if dims else ref)}
    assert seen == {"none", "h", "v", "hv"}


def test_interrupted_caching_resumes(tmp_path, vq, monkeypatch):
    store = random_store(tmp_path / "train.h5", n=6, tile=16)
    real, calls = latents_mod.encode, []

    def failing(model, x):
        calls.append(x.shape[0])
        if len(calls) == 3:  # probe, first batch, then the crash
            raise KeyboardInterrupt
        return real(model, x)

    monkeypatch.setattr(latents_mod, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(store, vq, tmp_path / "lat.h5", batch_size=2, flips=False)
    with h5py.File(tmp_path / "lat.h5.tmp", "r") as f:
        assert f.attrs["n_done"] == 2
    calls.clear()
    monkeypatch.setattr(latents_mod, "encode", lambda m, x: calls.append(x.shape[0]) or real(m, x))
    out = cache_latents(store, vq, tmp_path / "lat.h5", batch_size=2, flips=False)
    assert calls == [1, 2, 2]  # probe, then only the 4 remaining tiles
    with h5py.File(out, "r") as f:
        got = torch.from_numpy(f["latents"][:, 0].astype(np.float32))
    ds = TCGAPatchDataset(store, size=16, flip=False)
    images = torch.stack([ds[i]["image"] for i in range(6)]).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(got, vq.encode(images), atol=2e-2, rtol=1e-2)


def test_latents_must_fit_the_dataset(tmp_path, vq):
    store = random_store(tmp_path / "train.h5", n=3, tile=16)
    plain = cache_latents(store, vq, tmp_path / "plain.h5", flips=False)
    with pytest.raises(ValueError, match="without flipped variants"):
        TCGAPatchDataset(store, size=16, flip=True, latents_path=plain)
    with pytest.raises(ValueError, match="tile size"):
        TCGAPatchDataset(store, size=8, flip=False, latents_path=plain)
    other = random_store(tmp_path / "other.h5", n=4, tile=16)
    with pytest.raises(ValueError, match="4 patches"):
        TCGAPatchDataset(other, size=16, flip=False, latents_path=plain)
    assert TCGAPatchDataset(store, size=16, flip=False, latents_path=plain)[0]["latent"].shape == (
        3, 8, 8)


def test_cache_latents_cli(tmp_path, vq, capsys):
    cli = load_script("cache_latents")

    store = random_store(tmp_path / "train.h5", n=3, tile=16)
    ckpt = tmp_path / "vq.ckpt"
    torch.save({"state_dict": vq.state_dict()}, ckpt)
    cfg = tmp_path / "ldm.yaml"
    OmegaConf.save(OmegaConf.create({"model": {"target": "x", "params": {
        "first_stage_config": VQ}}}), cfg)
    assert cli.main(["--config", str(cfg), "--store", str(store), "--out",
                     str(tmp_path / "l.h5")]) == 1
    assert "--ckpt" in capsys.readouterr().err
    assert cli.main(["--config", str(cfg), "--store", str(store), "--out", str(tmp_path / "l.h5"),
                     "--ckpt", str(ckpt), "--device", "cpu"]) == 0
    with h5py.File(tmp_path / "l.h5", "r") as f:
        assert f["latents"].shape == (3, 4, 3, 8, 8)
