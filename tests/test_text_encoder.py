"""154-token CLIP/PLIP text encoder: reference fixture F5, backends, checkpoint keys."""
import json
import logging
import math

import pytest
import torch
from conftest import REFERENCE, load_fixture

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.open_clip_text import hf_text_to_open_clip, open_clip_text_to_hf
from ldm.modules.encoders.tiny import (
    build_tiny_clip_text_encoder,
    clip_bpe_vocab_and_merges,
    write_clip_tokenizer_files,
)
from ldm.util import instantiate_from_config

REL = 1e-5


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def f5():
    return load_fixture("F5_clip154_s0")


@pytest.fixture(scope="module")
def b32_dir(tmp_path_factory):
    """Random tower with the ViT-B/32 text config (PLIP / OpenAI CLIP B/32 shapes)."""
    return build_tiny_clip_text_encoder(tmp_path_factory.mktemp("b32"), hidden_size=512,
                                        num_layers=12, num_heads=8, intermediate_size=2048)


@pytest.fixture(scope="module")
def f5_encoder(f5, tmp_path_factory):
    """The F5 tower (hidden 4) rebuilt from the fixture's config and weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    out = write_clip_tokenizer_files(tmp_path_factory.mktemp("f5_tower"))
    CLIPTextModel(CLIPTextConfig(**f5["config"]["text_config"])).save_pretrained(out)
    enc = FrozenCLIPEmbedder(version=str(out), device="cpu", max_length=154)
    enc.load_state_dict(f5["state_dict"], strict=True)  # includes the old position_ids buffer
    return enc


@pytest.fixture(scope="module")
def f5_results(f5, f5_encoder):
    prompts = f5["inputs"]["prompts"]
    ids, mask = f5_encoder.tokenize(prompts)
    return {"ids": ids, "mask": mask, "emb": f5_encoder.transformer.embed(ids),
            "out": f5_encoder.encode(prompts)}


@pytest.mark.parametrize("i,label", list(enumerate(["short", "about_100_tokens",
                                               "over_154_tokens_truncated", "empty_uncond",
                                               "75_text_tokens_EOT_at_76",
                                               "76_text_tokens_EOT_at_77"])))
def test_f5_reference_per_prompt(f5, f5_results, i, label):
    ref = f5["outputs"]
    assert f5["inputs"]["prompt_labels"][i] == label
    assert torch.equal(f5_results["ids"][i], ref["input_ids"][i])
    assert torch.equal(f5_results["mask"][i], ref["attention_mask"][i])
    emb_ref = ref["embeddings_before_encoder"][i]
    assert rel_err(f5_results["emb"][i], emb_ref) <= REL
    assert rel_err(f5_results["out"][i], ref["output"][i]) <= REL


def test_f5_structure(f5, f5_encoder, f5_results):
    ref = f5["outputs"]
    assert f5_results["out"].shape == (6, 154, 4) and f5_results["out"].dtype == torch.float32
    assert f5_encoder.max_length == ref["max_length"] == 154
    assert f5_encoder.clip_max_length == ref["clip_max_length"] == 77
    ids = f5_results["ids"]
    # one BOS at 0, EOS right after the text; truncated prompt keeps 152 text tokens
    assert (ids[:, 0] == 49406).all() and (ids[:, 77] != 49406).all()
    n_text = [min(n, 152) for n in f5["meta"]["text_token_counts_without_sot_eot"]]
    assert f5_results["mask"].sum(1).tolist() == [n + 2 for n in n_text]
    assert [ids[r, n + 1].item() for r, n in enumerate(n_text)] == [49407] * 6


def test_f5_first_chunk_equals_plain_77_token_forward(f5, f5_encoder, f5_results):
    """For prompts of <= 75 text tokens rows 0..76 equal a standard HF CLIP forward."""
    ref = f5["outputs"]
    ids77 = ref["hf_77_token_input_ids_prompt0"]
    assert torch.equal(ids77, f5_results["ids"][:1, :77])
    with torch.no_grad():
        plain = f5_encoder.transformer.text_model(input_ids=ids77,
                                                  attention_mask=ref["attention_mask"][:1, :77])
    assert torch.equal(f5_results["out"][:1, :77], plain.last_hidden_state)
    assert rel_err(plain.last_hidden_state, ref["hf_77_token_forward_prompt0"]) <= REL
    assert rel_err(f5_results["out"][:1, :77], ref["hf_77_token_forward_prompt0"]) <= REL


def test_tokenizer_ids_equal_open_clip(f5, f5_encoder):
    import open_clip

    oc = open_clip.get_tokenizer("ViT-B-32")
    prompts = f5["inputs"]["prompts"] + ["Ünïcode & <html> tags,  tabs\tand 10% HER2+ (IHC)"]
    assert f5_encoder.text_token_ids(prompts) == [oc.encode(p) for p in prompts]
    vocab, merges = clip_bpe_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_chunk_length_from_position_table_not_tokenizer(tiny_clip_dir, tmp_path):
    """PLIP's tokenizer config has no model_max_length; chunks still come out as 77."""
    import shutil

    plip_like = tmp_path / "plip_like"
    shutil.copytree(tiny_clip_dir, plip_like)
    cfg_path = plip_like / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["model_max_length"]
    cfg_path.write_text(json.dumps(cfg))
    enc = FrozenCLIPEmbedder(version=str(plip_like))
    assert enc.tokenizer.model_max_length > 10**6  # what transformers reports without it
    assert (enc.clip_max_length, enc.max_length) == (77, 154)
    assert enc(["high tumor; low til; carcinoma"]).shape == (1, 154, 32)
    for requested, expected in [(77, 77), (100, 154), (154, 154), (155, 231)]:
        assert FrozenCLIPEmbedder(version=str(plip_like), max_length=requested).max_length \
            == expected == 77 * math.ceil(requested / 77)


def test_frozen_and_contract(tiny_clip_dir):
    cfg = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
           "params": {"version": str(tiny_clip_dir), "device": "cuda", "max_length": 154}}
    enc = instantiate_from_config(cfg)  # device literal accepted and ignored
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.transformer.training
    with torch.enable_grad():
        z = enc(["low tumor; high til; benign"])
    assert z.shape == (1, 154, 32) and not z.requires_grad and z.device == enc.device
    assert enc.unconditional_input(3) == ["", "", ""]
    uc = enc.encode(enc.unconditional_input(2))
    assert torch.equal(uc[0], enc.encode([""])[0]) and torch.equal(uc[0], uc[1])
    assert torch.equal(enc.encode("single prompt"), enc.encode(["single prompt"]))


def test_state_dict_keys_and_position_ids(tiny_clip_dir, caplog):
    enc = FrozenCLIPEmbedder(version=str(tiny_clip_dir))
    sd = enc.state_dict()
    assert all(k.startswith("transformer.text_model.") for k in sd)
    assert "transformer.text_model.embeddings.position_ids" not in sd
    assert "transformer.text_model.final_layer_norm.weight" in sd
    # a PathLDM checkpoint (transformers 4.30) carries the persistent position_ids buffer
    old = {k: v + 0.5 for k, v in sd.items()}
    old["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    with caplog.at_level(logging.INFO, logger="ldm.modules.encoders.clip_text"):
        result = enc.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "ignored transformer.text_model.embeddings.position_ids" in caplog.text
    assert torch.equal(enc.state_dict()["transformer.text_model.final_layer_norm.bias"],
                       old["transformer.text_model.final_layer_norm.bias"])
    enc.load_state_dict(sd, strict=True)  # and a checkpoint without it


def test_manifest_c_cond_stage_keys(b32_dir):
    """ViT-B/32 text config gives exactly PathLDM's cond_stage_model keys and shapes."""
    manifest = json.loads((REFERENCE / "manifests" /
                           "c_PathLDM_plip_imagenet_finetune_LatentDiffusion.json").read_text())
    prefix = "cond_stage_model."
    expected = [(k[len(prefix):], tuple(s), d) for k, s, d in manifest if k.startswith(prefix)]
    assert len(expected) == 197
    expected = [e for e in expected if not e[0].endswith("embeddings.position_ids")]
    enc = FrozenCLIPEmbedder(version=str(b32_dir), max_length=154)
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
           for k, v in enc.state_dict().items()]
    assert got == expected


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "mlp_ratio": 2.0},  # = the tiny_clip_dir transformers tower
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1,
                   "head_width": 16},
}


def _tiny_open_clip(**kw) -> FrozenOpenCLIPEmbedder:
    return FrozenOpenCLIPEmbedder(arch="ViT-B-32", version=None, open_clip_kwargs=TINY_OPEN_CLIP,
                                  **kw)


def test_open_clip_backend_matches_transformers(f5, tiny_clip_dir):
    torch.manual_seed(3)
    oc = _tiny_open_clip()
    sd = oc.state_dict()  # exposed under transformers / PathLDM names
    assert all(k.startswith("transformer.text_model.") for k in sd)
    hf = FrozenCLIPEmbedder(version=str(tiny_clip_dir))
    assert sorted(sd) == sorted(hf.state_dict())
    hf.load_state_dict(sd, strict=True)
    prompts = f5["inputs"]["prompts"]
    assert torch.equal(oc.tokenize(prompts)[0], hf.tokenize(prompts)[0])
    z_oc, z_hf = oc.encode(prompts), hf.encode(prompts)
    assert z_oc.shape == (6, 154, 32)
    assert rel_err(z_oc, z_hf) <= REL
    # and back: transformers-named weights (with position_ids) load into the open_clip tower
    oc2 = _tiny_open_clip()
    hf_sd = {k: v.clone() for k, v in hf.state_dict().items()}
    hf_sd["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    oc2.load_state_dict(hf_sd, strict=True)
    assert torch.equal(oc2.encode(prompts), z_oc)


def test_open_clip_loads_a_local_checkpoint_file(tmp_path):
    import open_clip

    torch.manual_seed(6)
    full = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True,
                                  **TINY_OPEN_CLIP)
    torch.save(full.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    enc = FrozenOpenCLIPEmbedder(version=str(tmp_path / "open_clip_pytorch_model.bin"),
                                 open_clip_kwargs=TINY_OPEN_CLIP)
    assert torch.equal(enc.state_dict()["transformer.text_model.embeddings.token_embedding.weight"],
                       full.token_embedding.weight)


def test_open_clip_weight_mapping_roundtrip():
    torch.manual_seed(4)
    tower = _tiny_open_clip().transformer
    native = {k: v for k, v in tower.named_parameters()}
    mapped = open_clip_text_to_hf(native)
    assert mapped["embeddings.position_embedding.weight"] is native["positional_embedding"]
    q = mapped["encoder.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q, native["transformer.resblocks.1.attn.in_proj_weight"][:32])
    back = hf_text_to_open_clip(mapped)
    assert sorted(back) == sorted(native)
    assert all(torch.equal(back[k], native[k]) for k in native)
    with pytest.raises(KeyError, match="no transformers CLIP equivalent"):
        open_clip_text_to_hf({"transformer.resblocks.0.ls_1.gamma": torch.ones(2)})


def test_open_clip_vit_b32_architecture_matches_transformers(b32_dir):
    """Random ViT-B-32 open_clip text tower (quick_gelu, 8 heads) == transformers backend."""
    torch.manual_seed(5)
    oc = FrozenOpenCLIPEmbedder(arch="ViT-B-32", version=None, cache_size=0, open_clip_kwargs={
        "vision_cfg": TINY_OPEN_CLIP["vision_cfg"]})  # the text tower keeps ViT-B-32's config
    hf = FrozenCLIPEmbedder(version=str(b32_dir), cache_size=0)
    hf.load_state_dict(oc.state_dict(), strict=True)
    prompts = ["high tumor; low til; invasive ductal carcinoma, grade 2."]
    z_oc, z_hf = oc.encode(prompts), hf.encode(prompts)
    assert z_oc.shape == (1, 154, 512)
    assert rel_err(z_oc, z_hf) <= REL
