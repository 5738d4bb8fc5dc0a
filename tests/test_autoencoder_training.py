"""Autoencoder training under Lightning 2.x (two optimizers) and LPIPS weight handling."""
from __future__ import annotations

import importlib.util
import logging

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.models.autoencoder import AutoencoderKL, VQModel
from ldm.modules.losses import LPIPS, MissingWeightsError, VQLPIPSWithDiscriminator
from ldm.modules.losses.lpips import LPIPS_ENV, VGG16_ENV, VGG16Features


def _dd(**kw) -> dict:
    dd = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32,
              ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    dd.update(kw)
    return dd


def _loader(n: int = 6, size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(size, size, 3, generator=g) * 2 - 1} for _ in range(n)]
    return DataLoader(data, batch_size=2)


def _trainer(batches: int) -> pl.Trainer:
    # Lightning counts each optimizer's step: two per batch
    return pl.Trainer(max_steps=2 * batches, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                      check_val_every_n_epoch=1)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    after = module.state_dict()
    return all(not torch.equal(v, after[k]) for k, v in before.items() if v.is_floating_point())


def _assert_trained(model, trainer, batches: int, ae_before, disc_before) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert trainer.global_step == 2 * batches and model.loss_step == batches
    for key in ("aeloss", "discloss", "train/g_loss", "train/d_weight", "train/rec_loss"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["train/disc_factor"] == 1.0  # disc_start 0: the GAN term is on
    assert metrics["train/d_weight"] > 0.0 and metrics["discloss"] > 0.0
    assert _changed(ae_before, model.decoder.conv_out)  # autoencoder optimizer stepped
    assert _changed(disc_before, model.loss.discriminator.main[0])  # discriminator stepped
    assert not any(p.requires_grad for p in model.loss.perceptual_loss.parameters())
    return metrics


def test_vqmodel_trains_both_optimizers_with_ema():
    loss = {"target": "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": dict(disc_start=0, disc_weight=0.75, disc_num_layers=2, disc_ndf=16,
                           n_classes=16, lpips_pretrained=False)}
    model = VQModel(_dd(), loss, n_embed=16, embed_dim=3, use_ema=True, learning_rate=1e-3,
                    monitor="val/rec_loss")
    ae_before = _snapshot(model.decoder.conv_out)
    disc_before = _snapshot(model.loss.discriminator.main[0])
    lpips_before = _snapshot(model.loss.perceptual_loss)
    ema_before = model.model_ema.encoderconv_inweight.clone()
    trainer = _trainer(batches=2)
    trainer.fit(model, _loader(4), _loader(2))
    metrics = _assert_trained(model, trainer, 2, ae_before, disc_before)
    assert "train/quant_loss" in metrics and metrics["train/perplexity"] >= 1.0
    assert "val/rec_loss" in metrics and "val_ema/rec_loss" in metrics
    assert all(torch.equal(v, model.loss.perceptual_loss.state_dict()[k])
               for k, v in lpips_before.items())  # LPIPS stays frozen
    assert int(model.model_ema.num_updates) == 2
    assert not torch.equal(model.model_ema.encoderconv_inweight, ema_before)
    logs = model.log_images(next(iter(_loader())), plot_ema=True)
    assert set(logs) == {"inputs", "reconstructions", "reconstructions_ema"}
    assert all(v.shape == (2, 3, 16, 16) for v in logs.values())


def test_autoencoder_kl_trains_both_optimizers():
    loss = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
            "params": dict(disc_start=0, kl_weight=1e-6, disc_weight=0.5, disc_num_layers=2,
                           lpips_pretrained=False)}
    model = AutoencoderKL(_dd(double_z=True, z_channels=4), loss, embed_dim=4,
                          learning_rate=1e-3)
    ae_before = _snapshot(model.decoder.conv_out)
    disc_before = _snapshot(model.loss.discriminator.main[0])
    trainer = _trainer(batches=2)
    trainer.fit(model, _loader(4), _loader(2))
    metrics = _assert_trained(model, trainer, 2, ae_before, disc_before)
    assert metrics["train/kl_loss"] > 0.0 and "val/rec_loss" in metrics
    logs = model.log_images(next(iter(_loader())))
    assert set(logs) == {"inputs", "reconstructions", "samples"}


def test_discriminator_off_before_disc_start():
    loss = VQLPIPSWithDiscriminator(disc_start=10, disc_num_layers=2, lpips_pretrained=False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    xrec = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    qloss = torch.tensor(0.5)
    ae, log = loss(qloss, x, xrec, 0, global_step=9, last_layer=xrec)
    assert log["train/disc_factor"] == 0.0 and log["train/d_weight"] == 0.0
    assert torch.allclose(ae, log["train/nll_loss"] + 0.5)
    disc, _ = loss(qloss, x, xrec, 1, global_step=9)
    assert disc.item() == 0.0
    _, log_on = loss(qloss, x, xrec, 0, global_step=10, last_layer=xrec)
    assert log_on["train/disc_factor"] == 1.0 and log_on["train/d_weight"] > 0.0


def test_identity_loss_model_refuses_to_train():
    model = VQModel(_dd(), {"target": "torch.nn.Identity"}, n_embed=16, embed_dim=3)
    with pytest.raises(RuntimeError, match="discriminator"):
        model.configure_optimizers()


def test_lpips_is_a_frozen_eval_distance():
    torch.manual_seed(0)
    lp = LPIPS(pretrained=False)
    lp.train()  # a parent's .train() must not make the distance stochastic
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs().max().item() < 1e-6
    d = lp(x, x.flip(0))
    assert d.shape == (2, 1, 1, 1) and torch.all(d > 0)
    assert torch.equal(d, lp(x, x.flip(0)))  # no dropout: deterministic


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(VGG16_ENV, raising=False)
    monkeypatch.delenv(LPIPS_ENV, raising=False)
    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("an installed lpips package supplies vgg.pth")
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_lpips_missing_weights_error_is_actionable(empty_torch_home):
    with pytest.raises(MissingWeightsError) as err:
        LPIPS(pretrained=True)
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg
    assert str(empty_torch_home / "vgg16-397923af.pth") in msg
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert VGG16_ENV in msg and "lpips_pretrained: false" in msg

    empty_torch_home.mkdir(parents=True)
    feats = VGG16Features()
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in feats.state_dict().items()},
               empty_torch_home / "vgg16-397923af.pth")
    with pytest.raises(MissingWeightsError) as err:
        VQLPIPSWithDiscriminator(disc_start=0)
    msg = str(err.value)
    assert "'vgg.pth'" in msg and str(empty_torch_home / "lpips" / "vgg.pth") in msg
    assert "PerceptualSimilarity" in msg and LPIPS_ENV in msg and "lpips_weights" in msg


def test_lpips_loads_local_weight_files(empty_torch_home, tmp_path, caplog):
    torch.manual_seed(1)
    ref = LPIPS(pretrained=False)
    empty_torch_home.mkdir(parents=True)
    vgg_sd = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
    vgg_sd["classifier.0.weight"] = torch.zeros(2, 2)  # the real file has the classifier too
    torch.save(vgg_sd, empty_torch_home / "vgg16-397923af.pth")
    lin_sd = {k: v for k, v in ref.state_dict().items() if k.startswith("lin")}
    torch.save(lin_sd, tmp_path / "my_vgg.pth")
    torch.manual_seed(2)
    with caplog.at_level(logging.INFO, logger="ldm.modules.losses.lpips"):
        lp = LPIPS(pretrained=True, lpips_weights=tmp_path / "my_vgg.pth")
    assert "vgg16-397923af.pth" in caplog.text
    for k, v in ref.state_dict().items():
        assert torch.equal(lp.state_dict()[k], v), k
    with pytest.raises(ValueError, match="not an LPIPS"):
        LPIPS(pretrained=True, lpips_weights=empty_torch_home / "vgg16-397923af.pth")


@pytest.mark.gpu
def test_vqmodel_trains_on_cuda():
    loss = {"target": "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": dict(disc_start=0, disc_num_layers=2, lpips_pretrained=False)}
    model = VQModel(_dd(), loss, n_embed=16, embed_dim=3, use_ema=True, learning_rate=1e-3)
    trainer = pl.Trainer(max_steps=2, accelerator="gpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, _loader(2))
    assert model.device.type == "cuda" and model.model_ema.num_updates.device.type == "cuda"
    assert torch.isfinite(trainer.callback_metrics["aeloss"])
    assert torch.isfinite(trainer.callback_metrics["discloss"])
