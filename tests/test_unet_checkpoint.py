"""Loading CompVis-format checkpoints into the U-Net via ``ckpt_path`` / ``ignore_keys``."""
import logging

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import instantiate_from_config

TINY = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32,
            attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2], num_heads=1,
            use_spatial_transformer=True, transformer_depth=1, context_dim=16)
PREFIX = "model.diffusion_model."


@pytest.fixture
def source() -> dict:
    """A random tiny U-Net state_dict (no zero layers, so a skipped load would show)."""
    torch.manual_seed(1)
    model = UNetModel(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _full_ldm_checkpoint(sd: dict) -> dict:
    """A CompVis LatentDiffusion checkpoint: prefixed U-Net keys among other modules' keys."""
    state = {PREFIX + k: v for k, v in sd.items()}
    state.update({
        "betas": torch.linspace(1e-4, 2e-2, 10),
        "first_stage_model.encoder.conv_in.weight": torch.randn(4, 3, 3, 3),
        "cond_stage_model.embedding.weight": torch.randn(5, 16),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modeltime_embed0weight": torch.randn(128, 32),
    })
    return {"state_dict": state, "global_step": 7, "epoch": 1}


def _assert_same(model: UNetModel, sd: dict) -> None:
    own = model.state_dict()
    assert own.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_loads_full_ldm_checkpoint(tmp_path, source, caplog) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(_full_ldm_checkpoint(source), path)
    with caplog.at_level(logging.INFO, logger="ldm.util"):
        model = instantiate_from_config({
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {**TINY, "ckpt_path": str(path)}})
    _assert_same(model, source)
    assert f"loaded {len(source)} keys" in caplog.text


@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict_key", "plain_dict"])
def test_loads_bare_unet_checkpoint(tmp_path, source, wrapped: bool) -> None:
    path = tmp_path / "unet.ckpt"
    torch.save({"state_dict": source} if wrapped else source, path)
    _assert_same(UNetModel(**TINY, ckpt_path=path), source)


def test_wrong_keys_fail_naming_them(tmp_path, source) -> None:
    sd = dict(source)
    del sd["out.2.bias"]
    sd["input_blocks.9.0.bogus.weight"] = torch.zeros(1)
    path = tmp_path / "bad.ckpt"
    torch.save(_full_ldm_checkpoint(sd), path)
    with pytest.raises(RuntimeError) as err:
        UNetModel(**TINY, ckpt_path=path)
    msg = str(err.value)
    assert "out.2.bias" in msg and "input_blocks.9.0.bogus.weight" in msg
    assert "missing" in msg and "unexpected" in msg and str(path) in msg


def test_shape_mismatch_fails(tmp_path, source) -> None:
    sd = dict(source, **{"out.2.weight": torch.zeros(4, 32, 3, 3)})
    path = tmp_path / "shape.ckpt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"out\.2\.weight: checkpoint \(4, 32, 3, 3\)"):
        UNetModel(**TINY, ckpt_path=path)


def test_strict_load_false_loads_the_rest(tmp_path, source) -> None:
    sd = dict(source)
    del sd["out.2.weight"]
    sd["label_emb.weight"] = torch.zeros(5, 128)
    path = tmp_path / "partial.ckpt"
    torch.save(_full_ldm_checkpoint(sd), path)
    model = UNetModel(**TINY, ckpt_path=path, strict_load=False)
    own = model.state_dict()
    assert not own["out.2.weight"].any()  # stays zero-initialised
    for k, v in sd.items():
        if k in own:
            assert torch.equal(own[k], v), k


@pytest.mark.parametrize("ignore", [["label_emb"], [PREFIX + "label_emb"]],
                         ids=["stripped_key", "checkpoint_key"])
def test_ignore_keys(tmp_path, source, ignore) -> None:
    """A class-conditional checkpoint loads into an unconditional U-Net by ignoring label_emb."""
    sd = dict(source, **{"label_emb.weight": torch.randn(5, 128)})
    path = tmp_path / "classcond.ckpt"
    torch.save(_full_ldm_checkpoint(sd), path)
    with pytest.raises(RuntimeError, match="label_emb.weight"):
        UNetModel(**TINY, ckpt_path=path)
    _assert_same(UNetModel(**TINY, ckpt_path=path, ignore_keys=ignore), source)


def test_missing_checkpoint_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        UNetModel(**TINY, ckpt_path=tmp_path / "nope.ckpt")
