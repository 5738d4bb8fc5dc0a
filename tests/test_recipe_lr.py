"""The autoencoders' learning rate as the authors got it: scaled by accumulation, devices, batch."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tcga_store import random_store
from torch.utils.data import DataLoader

import main
from ldm.trainer_setup import (
    ConfigError,
    Hardware,
    hand_accumulation_to_model,
    learning_rate,
    scale_lr_setting,
)

ROOT = Path(__file__).resolve().parents[1]
THREE_GPUS = Hardware("gpu", [0, 1, 2], 1, "bf16-mixed")
DD = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32,
          ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
LOSS = {"target": "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "params": {"disc_start": 0, "disc_num_layers": 2, "disc_ndf": 16, "n_classes": 16,
                   "lpips_pretrained": False}}


@pytest.mark.parametrize("name, accumulate, effective", [
    ("vq_f4_finetune", 1, 1.62e-4),  # 3 GPUs x 12 x 4.5e-6, the authors' taming run
    ("vq_f8_finetune", 2, 3.24e-4),  # tcga_brca_vq_f8.yaml: accumulate_grad_batches 2
])
def test_autoencoder_configs_scale_as_taming(name, accumulate, effective):
    cfg = OmegaConf.load(ROOT / "configs" / "autoencoder" / f"{name}.yaml")
    scale, source = scale_lr_setting(None, cfg.model)
    assert (scale, source) == (True, "model.scale_lr")
    trainer = cfg.lightning.trainer
    assert int(trainer.get("accumulate_grad_batches", 1)) == accumulate
    lr = learning_rate(cfg.model.base_learning_rate, scale, cfg.data.params.batch_size,
                       accumulate, THREE_GPUS, source)
    assert lr == pytest.approx(effective)
    assert f"--base configs/autoencoder/{name}.yaml -t --gpus 0,1,2" in (
        ROOT / "configs" / "autoencoder" / f"{name}.yaml").read_text()
    assert "--base configs/autoencoder/vq_f4_finetune.yaml -t --gpus 0,1,2" in (
        ROOT / "README.md").read_text()


def test_vq_f8_config_is_the_originals():
    """tcga_brca_vq_f8.yaml has no CompVis initialisation and accumulates two batches."""
    cfg = OmegaConf.load(ROOT / "configs" / "autoencoder" / "vq_f8_finetune.yaml")
    assert "ckpt_path" not in cfg.model.params
    assert cfg.lightning.trainer.accumulate_grad_batches == 2


def test_scale_lr_flag_beats_the_config():
    parse = main.get_parser().parse_known_args
    assert [parse(["-t", *f])[0].scale_lr for f in ([], ["--scale_lr"], ["--no-scale_lr"])] == [
        None, True, False]
    model = OmegaConf.create({"scale_lr": True})
    assert scale_lr_setting(False, model) == (False, "--no-scale_lr")
    assert scale_lr_setting(True, OmegaConf.create({})) == (True, "--scale_lr")
    assert scale_lr_setting(None, OmegaConf.create({})) == (False, "default")  # LDM configs
    with pytest.raises(ConfigError, match="model.scale_lr"):
        scale_lr_setting(None, OmegaConf.create({"scale_lr": "yes"}))
    for base in ("pathldm.yaml", "ablations/paper_hparams.yaml"):
        assert "scale_lr" not in OmegaConf.load(ROOT / "configs" / base).get("model", {})


def _vq(accumulate: int = 1, lr: float = 1e-3, disc_start: int = 0, sgd: bool = False):
    from ldm.models.autoencoder import VQModel

    class SGDVQModel(VQModel):
        """Plain SGD: the update is lr * gradient (Adam's first step would be nearly its sign)."""

        def configure_optimizers(self):
            return [torch.optim.SGD(self._ae_parameters(), lr=self.learning_rate),
                    torch.optim.SGD(self._discriminator().parameters(), lr=self.learning_rate)]

    torch.manual_seed(0)
    loss = {**LOSS, "params": {**LOSS["params"], "disc_start": disc_start}}
    model = (SGDVQModel if sgd else VQModel)(DD, loss, n_embed=16, embed_dim=3,
                                             learning_rate=lr)
    model.accumulate_grad_batches = accumulate
    return model


@pytest.mark.slow  # two Lightning fits; the config tests above guard the recipe
def test_accumulating_two_batches_equals_one_double_batch():
    """Two batches of 2 with accumulation 2 step the autoencoder exactly like one batch of 4.

    The GAN term is off (disc_start), so the discriminator's BatchNorm, which sees 2 or 4
    images, does not enter the comparison.
    """
    import pytorch_lightning as pl

    g = torch.Generator().manual_seed(1)
    images = [{"image": torch.rand(16, 16, 3, generator=g) * 2 - 1} for _ in range(4)]
    initial = dict(_vq().named_parameters())
    results = []
    for accumulate, batch in ((2, 2), (1, 4)):
        model = _vq(accumulate, lr=0.5, disc_start=1000, sgd=True)
        trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, DataLoader(images, batch_size=batch))
        assert trainer.global_step == 2 and model.loss_step == 1  # one step per optimizer
        assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4 // batch
        results.append({k: v.detach().clone() for k, v in model.named_parameters()})
    accumulated, single = results
    changed = 0
    for k, v in single.items():
        assert torch.allclose(accumulated[k], v, atol=1e-6, rtol=1e-4), k
        changed += not torch.equal(v, initial[k])
    assert changed > 10


def test_main_hands_accumulation_to_the_autoencoder_and_logs_the_formula(tmp_path, caplog):
    store = random_store(tmp_path / "train.h5", n=8, tile=16)
    cfg = {"model": {"base_learning_rate": 1e-4, "scale_lr": True,
                     "target": "ldm.models.autoencoder.VQModel",
                     "params": {"embed_dim": 3, "n_embed": 16, "ddconfig": DD,
                                "lossconfig": LOSS}},
           "data": {"target": "ldm.data.tcga.TCGAPatchData",
                    "params": {"batch_size": 2, "num_workers": 0,
                               "train": {"path": str(store), "size": 16}}},
           "lightning": {"trainer": {"max_steps": 4, "accumulate_grad_batches": 2,
                                     "enable_progress_bar": False, "limit_val_batches": 0,
                                     "num_sanity_val_steps": 0, "enable_model_summary": False},
                         "callbacks": {"image_logger": None}}}
    path = tmp_path / "vq.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    logs = tmp_path / "logs"
    with caplog.at_level(logging.INFO):
        assert main.main(["--base", str(path), "-t", "--accelerator", "cpu", "-l",
                          str(logs)]) == 0
    assert ("learning rate 4.00e-04 = 2 (accumulate_grad_batches) * 1 (nodes) * 1 (devices) "
            "* 2 (batch size) * 1.00e-04 (base_learning_rate), scaled by model.scale_lr"
            in caplog.text)
    last = torch.load(next(logs.glob("*/checkpoints/last.ckpt")), weights_only=False)
    assert last["global_step"] == 4  # 4 batches = 2 steps of each optimizer
    assert last["config"]["lightning"]["run"]["learning_rate"] == pytest.approx(4e-4)
    assert last["config"]["lightning"]["trainer"]["accumulate_grad_batches"] == 2
    lrs = [g["lr"] for opt in last["optimizer_states"] for g in opt["param_groups"]]
    assert lrs == pytest.approx([4e-4, 4e-4])


def test_accumulation_needs_a_model_that_can_accumulate():
    trainer = OmegaConf.create({"accumulate_grad_batches": 3})
    model = _vq()
    assert hand_accumulation_to_model(model, trainer) == 3
    assert model.accumulate_grad_batches == 3 and trainer.accumulate_grad_batches == 1

    class Manual(torch.nn.Module):
        automatic_optimization = False

    with pytest.raises(ConfigError, match="cannot accumulate"):
        hand_accumulation_to_model(Manual(), OmegaConf.create({"accumulate_grad_batches": 2}))
