"""ldm.checkpoint loading (EMA/raw, run dirs, legacy keys) and scripts/ckpt_tools.py."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from scripts_loader import load_script
from tiny_ldm import build_tiny_model, save_checkpoint, tiny_model_config

from ldm.checkpoint import load_model, load_model_from_checkpoint, read_checkpoint
from ldm.util import instantiate_from_config, load_checkpoint_into

LEGACY = {"inception.blocks.0.0.conv.weight": torch.ones(4, 3, 1, 1),
          "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A class-conditional tiny LDM with EMA shadows = weights + 0.01, saved as PathLDM would."""
    cfg = tiny_model_config(None, use_ema=True, track_fid=True)
    model = build_tiny_model(cfg)
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "full.ckpt",
                           {"model": cfg, "data": {}, "lightning": {}}, extra=LEGACY)
    return cfg, model, path


def unet_params(model):
    return {k: v.detach().clone() for k, v in model.model.named_parameters()}


def test_ema_raw_and_auto(tiny, tmp_path):
    cfg, model, path = tiny
    raw = unet_params(model)
    loaded = load_model(path)  # auto: the checkpoint has EMA weights
    assert loaded.weights == "ema" and loaded.global_step == 3
    assert sorted(loaded.ignored_keys) == sorted(LEGACY)
    for k, v in loaded.model.model.named_parameters():
        assert torch.allclose(v, raw[k] + 0.01), k
    assert not loaded.model.training
    plain = load_model_from_checkpoint(path, weights="raw")
    for k, v in plain.model.named_parameters():
        assert torch.equal(v, raw[k]), k
    assert plain.use_ema is False  # ema_scope() must not swap the EMA back in
    # EMA weights load even into a config without use_ema
    no_ema_cfg = tiny_model_config(None, use_ema=False, track_fid=True)
    other = load_model(path, config={"model": no_ema_cfg})
    assert other.weights == "ema" and not hasattr(other.model, "model_ema")
    for k, v in other.model.model.named_parameters():
        assert torch.allclose(v, raw[k] + 0.01), k


def test_released_checkpoint_with_explicit_config(tiny, tmp_path):
    """A bare released checkpoint + a config whose sub-models name init checkpoints (as
    PathLDM's): the init checkpoints are not needed, the full checkpoint provides everything."""
    import copy

    cfg, model, _ = tiny
    released = copy.deepcopy(cfg)
    released["params"]["unet_config"]["params"]["ckpt_path"] = "models/ldm/cin256-v2/model.ckpt"
    released["params"]["first_stage_config"]["params"]["ckpt_path"] = "models/vq-f4/model.ckpt"
    config = tmp_path / "pathldm.yaml"
    config.write_text(yaml.safe_dump({"model": released}))
    bare = tmp_path / "released.ckpt"
    torch.save({"state_dict": {**model.state_dict(), **LEGACY}}, bare)
    loaded = load_model(bare, config=str(config))
    assert loaded.weights == "ema" and sorted(loaded.ignored_keys) == sorted(LEGACY)
    raw = unet_params(model)
    for k, v in loaded.model.model.named_parameters():
        assert torch.allclose(v, raw[k] + 0.01), k


def test_checkpoint_without_ema(tiny, tmp_path):
    cfg, model, _ = tiny
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    path = tmp_path / "noema.ckpt"
    torch.save({"state_dict": sd, "config": {"model": cfg}}, path)
    with pytest.raises(KeyError, match="no EMA weights.*--weights raw"):
        load_model(path, weights="ema")
    loaded = load_model(path)  # auto falls back to raw; the model's EMA stays unused
    assert loaded.weights == "raw" and loaded.model.use_ema is False
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model(path, weights="best")


def test_run_directory_and_config_errors(tiny, tmp_path):
    cfg, model, _ = tiny
    run = tmp_path / "logs" / "2024-01-01T00-00-00_tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    save_checkpoint(model, run / "checkpoints" / "last.ckpt", config=None)
    with pytest.raises(ValueError, match="no embedded config.*--config"):
        load_model(run)
    (run / "configs" / "2024-01-01T00-00-00-project.yaml").write_text(
        yaml.safe_dump({"model": cfg}))
    loaded = load_model(run, weights="raw")
    assert loaded.checkpoint_path == run / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_model(tmp_path / "logs")
    bad = {k: v for k, v in model.state_dict().items() if "out.2.weight" not in k}
    torch.save({"state_dict": bad, "config": {"model": cfg}}, tmp_path / "bad.ckpt")
    with pytest.raises(RuntimeError, match="missing keys"):
        load_model(tmp_path / "bad.ckpt")


def test_extract_first_stage_round_trip(tiny, tmp_path):
    """The extracted autoencoder loads strictly into VQModelInterface, directly and by ckpt_path."""
    cfg, model, path = tiny
    out = tmp_path / "vq.ckpt"
    load_script("ckpt_tools").main(["extract-first-stage", str(path), str(out)])
    ckpt = read_checkpoint(out)
    fs_cfg = ckpt["config"]["model"]
    assert fs_cfg["target"] == "ldm.models.autoencoder.VQModelInterface"
    vq = instantiate_from_config(fs_cfg)
    vq.load_state_dict(ckpt["state_dict"], strict=True)
    for k, v in model.first_stage_model.state_dict().items():
        assert torch.equal(vq.state_dict()[k], v), k
    by_path = instantiate_from_config({**fs_cfg, "params": {**fs_cfg["params"],
                                                            "ckpt_path": str(out)}})
    assert by_path.load_report.missing == [] and by_path.load_report.unexpected == []
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(by_path.decode(by_path.encode(x)),
                           model.first_stage_model.decode(model.first_stage_model.encode(x)))
    # without any config the weights are still extracted (nothing to verify against)
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": model.state_dict()}, bare)
    load_script("ckpt_tools").main(["extract-first-stage", str(bare), str(tmp_path / "b.ckpt")])
    assert "config" not in read_checkpoint(tmp_path / "b.ckpt")


def test_export_ema_safetensors(tiny, tmp_path):
    cfg, model, path = tiny
    raw = unet_params(model)
    out = tmp_path / "ema.safetensors"
    res = load_script("ckpt_tools").main(["export-ema", str(path), str(out)])
    assert res["weights"] == "ema" and sorted(res["dropped"]) == sorted(LEGACY)
    from safetensors.torch import load_file

    sd = load_file(str(out))
    expected = {k for k in model.state_dict() if not k.startswith("model_ema.")}
    assert set(sd) == expected
    for k, v in raw.items():
        assert torch.allclose(sd[f"model.{k}"], v + 0.01), k
    loaded = load_model(out)  # config travels in the safetensors metadata
    assert loaded.weights == "raw" and loaded.global_step == 3
    for k, v in loaded.model.model.named_parameters():
        assert torch.allclose(v, raw[k] + 0.01), k
    unet = tmp_path / "unet.safetensors"
    load_script("ckpt_tools").main(["export-ema", str(path), str(unet), "--unet-only"])
    target = instantiate_from_config(cfg["params"]["unet_config"])
    report = load_checkpoint_into(target, unet, prefix="model.diffusion_model.")
    assert not report.missing and not report.unexpected
    noema = tmp_path / "noema.ckpt"
    torch.save({"state_dict": {k: v for k, v in model.state_dict().items()
                               if not k.startswith("model_ema.")}}, noema)
    with pytest.raises(KeyError, match="no EMA weights"):
        load_script("ckpt_tools").main(["export-ema", str(noema), str(tmp_path / "x.safetensors")])


def test_inspect(tiny, tmp_path, capsys):
    _, model, path = tiny
    summary = load_script("ckpt_tools").main(["inspect", str(path), "--json",
                                              str(tmp_path / "i.json")])
    text = capsys.readouterr().out
    for word in ("model.diffusion_model", "first_stage_model.encoder", "model_ema",
                 "ignored on load", "inception.*", "LatentDiffusion"):
        assert word in text, word
    assert summary["keys"] == len(model.state_dict()) + len(LEGACY)
    assert summary["ema_keys"] == sum(k.startswith("model_ema.") for k in model.state_dict())
    assert json.loads((tmp_path / "i.json").read_text())["ignored_on_load"] == [
        "cond_stage_model.transformer.text_model.embeddings.position_ids", "inception.*"]
