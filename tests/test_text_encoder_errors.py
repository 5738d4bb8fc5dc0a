"""Text encoder loading pitfalls and bad input: clear errors, no network, truncation warnings."""
import logging
import shutil
import socket

import pytest
import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

LOGGER = "ldm.modules.encoders.long_prompt"
LONG = ("High tumor; low TIL; " + "invasive ductal carcinoma with necrosis and calcifications, "
        * 30)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_local_directory(tmp_path, no_network):
    missing = tmp_path / "models" / "plip"
    with pytest.raises(FileNotFoundError) as info:
        FrozenCLIPEmbedder(version=str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "vocab.json" in msg and "config.json" in msg
    assert "huggingface-cli download vinid/plip --local-dir" in msg


def test_version_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="must be a directory or a hub id"):
        FrozenCLIPEmbedder(version=str(f))


def test_empty_tokenizer_is_detected(tiny_clip_dir, tmp_path, no_network):
    """Without vocab.json/merges.txt transformers 5 silently builds a 2-token tokenizer."""
    broken = tmp_path / "no_vocab"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "vocab.json").unlink()
    (broken / "merges.txt").unlink()
    with pytest.raises(OSError) as info:
        FrozenCLIPEmbedder(version=str(broken))
    msg = str(info.value)
    assert "missing: vocab.json, merges.txt" in msg
    assert "huggingface-cli download vinid/plip --local-dir DIR" in msg
    assert "pass it as `version`" in msg


def test_missing_weights_file(tiny_clip_dir, tmp_path, no_network):
    broken = tmp_path / "no_weights"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(OSError, match="could not load the CLIP text model"):
        FrozenCLIPEmbedder(version=str(broken))


def test_partial_checkpoint_is_refused(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "partial"
    shutil.copytree(tiny_clip_dir, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = [k for k in weights if "layers.1.mlp.fc2" in k]
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped},
              str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OSError, match="refusing to run a partly random text encoder"):
        FrozenCLIPEmbedder(version=str(broken))


def test_full_clip_checkpoint_loads_its_text_tower(tiny_clip_dir, tmp_path):
    """PLIP ships a full CLIPModel (vision + text); only the text tower is kept."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel

    text = CLIPTextModel.from_pretrained(tiny_clip_dir)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 16}
    full = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision,
                                projection_dim=16))
    full.save_pretrained(tmp_path / "full")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_clip_dir / name, tmp_path / "full" / name)
    enc = FrozenCLIPEmbedder(version=str(tmp_path / "full"))
    weight = enc.state_dict()["transformer.text_model.final_layer_norm.weight"]
    assert torch.equal(weight, full.text_model.final_layer_norm.weight)
    assert not any("vision" in k or "projection" in k for k in enc.state_dict())


def test_hub_id_offline_makes_no_network_call(tmp_path, no_network):
    with pytest.raises(OSError) as info:
        FrozenCLIPEmbedder(version="vinid/plip", cache_dir=str(tmp_path / "hf_cache"))
    msg = str(info.value)
    assert "vinid/plip" in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download vinid/plip --local-dir DIR" in msg


def test_local_directory_never_calls_the_hub(tiny_clip_dir, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    enc = FrozenCLIPEmbedder(version=str(tiny_clip_dir))
    assert enc(["ok"]).shape == (1, 154, 32)


def test_over_long_prompt_warns_once_per_prompt(tiny_clip_dir, caplog):
    enc = FrozenCLIPEmbedder(version=str(tiny_clip_dir), cache_size=0)
    n_text = len(enc.text_token_ids([LONG])[0])
    assert n_text > 152
    other = LONG + " extra words"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        z = enc([LONG, "short prompt", LONG])
        enc([LONG])  # not cached (cache_size=0) and still no second warning
        enc([other])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert f"prompt of {n_text} text tokens truncated to 154 tokens" in warnings[0]
    assert f"{n_text - 152} tokens dropped" in warnings[0]
    assert f"{len(enc.text_token_ids([other])[0]) - 152} tokens dropped" in warnings[1]
    ids, mask = enc.tokenize([LONG])
    assert ids[0, -1] == enc.eos_id and mask.all()  # EOS still closes the truncated prompt
    assert torch.equal(z[0], z[2])


def test_short_prompts_do_not_warn(tiny_clip_dir, caplog):
    enc = FrozenCLIPEmbedder(version=str(tiny_clip_dir))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        enc(["high tumor; low til; " + "word " * 146, ""])
    assert len(enc.text_token_ids(["high tumor; low til; " + "word " * 146])[0]) == 152
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("bad", [[1, 2], ["ok", None], [b"bytes"]])
def test_non_string_prompts_are_rejected(tiny_clip_dir, bad):
    enc = FrozenCLIPEmbedder(version=str(tiny_clip_dir))
    with pytest.raises(TypeError, match="expects a list of str"):
        enc(bad)


def test_open_clip_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match="open_clip checkpoint not found"):
        FrozenOpenCLIPEmbedder(version=str(missing))


def test_open_clip_unknown_tag_offline(no_network, tmp_path):
    with pytest.raises(OSError, match="weights 'openai'.*Offline, pass a local checkpoint file"):
        FrozenOpenCLIPEmbedder(version="openai", cache_dir=str(tmp_path / "oc_cache"),
                               open_clip_kwargs={"text_cfg": {"width": 32, "heads": 2,
                                                              "layers": 1}})
