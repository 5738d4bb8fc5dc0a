"""The first-stage contract: KL latents are sampled alike from images and from a latent cache."""
import copy

import pytest
import torch
from tcga_store import random_store
from tiny_ldm import DDCONFIG, tiny_model_config

from ldm.data.latents import cache_latents, encode
from ldm.data.tcga import TCGAPatchDataset
from ldm.models.diffusion.ddpm import DDPM
from ldm.models.first_stage import FirstStage
from ldm.util import instantiate_from_config

IDENTITY_LOSS = {"target": "torch.nn.Identity"}
KL = {"target": "ldm.models.autoencoder.AutoencoderKL",
      "params": {"embed_dim": 3, "ddconfig": {**DDCONFIG, "double_z": True},
                 "lossconfig": IDENTITY_LOSS}}
VQ = {"embed_dim": 3, "n_embed": 16, "ddconfig": DDCONFIG, "lossconfig": IDENTITY_LOSS}


def kl_ldm(scale_factor: float = 0.5):
    """The tiny class-conditional LDM on a KL first stage."""
    cfg = copy.deepcopy(tiny_model_config(use_ema=False))
    cfg["params"].update(first_stage_config=KL, scale_factor=scale_factor)
    torch.manual_seed(0)
    return instantiate_from_config(cfg)


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 16, 16, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_who_implements_the_contract():
    built = {name: instantiate_from_config({"target": f"ldm.models.autoencoder.{name}",
                                            "params": params})
             for name, params in [("VQModelInterface", VQ), ("AutoencoderKL", KL["params"]),
                                  ("IdentityFirstStage", {}), ("VQModel", VQ)]}
    assert {n for n, m in built.items() if isinstance(m, FirstStage)} == {
        "VQModelInterface", "AutoencoderKL", "IdentityFirstStage"}
    x = images().permute(0, 3, 1, 2)
    vq, vqi = built["VQModel"], built["VQModelInterface"]
    vqi.load_state_dict(vq.state_dict())
    assert torch.equal(vq.encode_moments(x), vqi.encode_latent(x, sample=True))  # cache half


def test_cached_and_online_kl_training_draw_the_same_sample():
    model = kl_ldm()
    batch = {"image": images(), "class_label": torch.tensor([0, 3])}
    torch.manual_seed(7)
    z_online = model.get_input(batch, "image")[0]
    moments = encode(model.first_stage_model, DDPM.get_input(model, batch, "image"))
    assert moments.shape == (2, 6, 8, 8)  # mean and log-variance of 3 latent channels
    torch.manual_seed(7)
    z_cached = model.get_input({"latent": moments, "class_label": batch["class_label"]},
                               "image")[0]
    assert torch.equal(z_online, z_cached)
    mode = 0.5 * moments[:, :3]
    assert z_online.shape == mode.shape and not torch.allclose(z_online, mode)  # sampled
    torch.manual_seed(8)
    assert not torch.equal(model.get_input(batch, "image")[0], z_online)


def test_kl_trains_from_a_latent_cache_and_decodes(tmp_path):
    model = kl_ldm()
    store = random_store(tmp_path / "train.h5", n=3, tile=16)
    out = cache_latents(store, model.first_stage_model, tmp_path / "latents.h5", flips=False)
    item = TCGAPatchDataset(store, size=16, flip=False, latents_path=out)[0]
    assert item["latent"].shape == (6, 8, 8)
    batch = {"latent": item["latent"][None], "class_label": torch.tensor([1])}
    loss, _ = model.shared_step(batch)
    assert torch.isfinite(loss)
    z = model.get_input(batch, "image")[0]
    expected = model.first_stage_model.decode(z / 0.5)
    torch.testing.assert_close(model.decode_first_stage(z), expected)


def test_a_training_autoencoder_is_not_a_first_stage():
    cfg = copy.deepcopy(tiny_model_config(use_ema=False))
    cfg["params"]["first_stage_config"] = {"target": "ldm.models.autoencoder.VQModel",
                                           "params": VQ}
    model = instantiate_from_config(cfg)  # builds: a model fed latents needs no first stage
    batch = {"image": images(), "class_label": torch.tensor([0, 3])}
    with pytest.raises(TypeError, match="VQModel is not a first stage.*VQModelInterface"):
        model.get_input(batch, "image")
