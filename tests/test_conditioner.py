"""The Conditioner: outputs combined by kind, guidance dropout owned by the embedders (the
original's high-TIL exemption included), vectors into the U-Net's label_emb for every key."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_legacy_flags import original_text

from ldm.data.captions import captions_batch, levels_batch
from ldm.models.diffusion.ddpm import DiffusionWrapper
from ldm.modules.encoders.conditioner import Conditioner

CLASS = "ldm.modules.encoders.modules.ClassEmbedder"


def _class(dim: int, key: str = "class_label", kind: str = "crossattn", **spec) -> dict:
    return {"target": CLASS, "params": {"embed_dim": dim, "n_classes": 5, "key": key},
            "input_key": key, "kind": kind, **spec}


def test_outputs_are_combined_by_kind():
    cond = Conditioner([_class(8), _class(8, "other"), _class(6, kind="vector"),
                        _class(6, "other", kind="vector")])
    batch = {"class_label": torch.tensor([0, 3]), "other": torch.tensor([1, 2])}
    out = cond(batch)
    assert set(out) == {"c_crossattn", "y"}
    (tokens,) = out["c_crossattn"]
    assert tokens.shape == (2, 2, 8)  # one token per embedder, along the sequence
    e = list(cond)
    assert torch.equal(tokens[:, 1], e[1].embedding.weight[[1, 2]])
    assert torch.allclose(out["y"], e[2].embedding.weight[[0, 3]] + e[3].embedding.weight[[1, 2]])
    cat = Conditioner([_class(6, kind="vector"), _class(4, "other", kind="vector")],
                      vector_combine="concat")
    assert cat(batch)["y"].shape == (2, 10)
    with pytest.raises(ValueError, match="vector_combine: concat"):
        Conditioner([_class(6, kind="vector"), _class(4, "other", kind="vector")])(batch)
    with pytest.raises(KeyError, match="'other'"):
        cond({"class_label": torch.tensor([0])})
    with pytest.raises(ValueError, match="kind"):
        Conditioner([_class(4, kind="tokens")])


def test_unconditional_and_partial_unconditional_outputs():
    cond = Conditioner([_class(4, kind="vector"), _class(4, "other")])
    batch = {"class_label": torch.tensor([0, 3]), "other": torch.tensor([1, 2])}
    uc = cond.unconditional(2)
    four = torch.tensor([4, 4])
    assert torch.equal(uc["y"], cond.embedders["0"].embedding.weight[four])
    assert torch.equal(uc["c_crossattn"][0][:, 0], cond.embedders["1"].embedding.weight[four])
    part = cond(batch, uncond_keys=["other"])
    assert torch.equal(part["y"], cond(batch)["y"])
    assert torch.equal(part["c_crossattn"][0], uc["c_crossattn"][0])


def test_guidance_dropout_rate_is_per_embedder_and_only_with_ucg():
    cond = Conditioner([_class(4, kind="vector", ucg_rate=1.0), _class(4, "other")])
    batch = {"class_label": torch.tensor([0, 3]), "other": torch.tensor([1, 2])}
    assert torch.equal(cond(batch)["y"], cond.embedders["0"].embedding.weight[[0, 3]])
    dropped = cond(batch, ucg=True)
    assert torch.equal(dropped["y"], cond.unconditional(2)["y"])
    assert torch.equal(dropped["c_crossattn"][0], cond(batch)["c_crossattn"][0])
    half = Conditioner([_class(4, ucg_rate=0.5)])
    labels = torch.arange(4).repeat(250)
    torch.manual_seed(0)
    out = half({"class_label": labels}, ucg=True)["c_crossattn"][0][:, 0]
    n_uncond = int((out == half.embedders["0"].embedding.weight[4]).all(-1).sum())
    assert 440 < n_uncond < 560


def test_legacy_til_exemption_reproduces_the_original_text_dataset(tiny_clip_dir):
    """A seeded batch: the text embedder drops exactly the captions the original dropped."""
    text = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": str(tiny_clip_dir), "max_length": 154},
            "input_key": "caption", "ucg_rate": 0.5, "legacy_til_exemption": True}
    cond = Conditioner([text])
    probs = [(t, i) for t in (0.2, 0.9) for i in (0.2, 0.9)] * 8
    captions = [original_text(t, i, 1.0, 0.0) for t, i in probs]  # no drop: the full caption
    torch.manual_seed(3)
    mask = cond.drop_mask(cond.embedders["0"], captions)
    torch.manual_seed(3)
    u = torch.rand(len(captions)).numpy()
    expected = [original_text(t, i, x, 0.5) == "" for (t, i), x in zip(probs, u)]
    assert mask.tolist() == expected
    assert 0 < sum(expected) < len(expected) // 2  # some dropped, never the high-TIL half
    torch.manual_seed(3)
    got = cond({"caption": captions}, ucg=True)["c_crossattn"][0]
    embed = cond.embedders["0"].encode
    want = embed([("" if d else c) for c, d in zip(captions, expected)])
    assert torch.equal(got, want)


def test_batches_from_the_captions_module():
    b = levels_batch([("high", "low"), ("low", "high")], "a summary ")
    assert b["caption"] == ["high tumor; low til; a summary", "low tumor; high til; a summary"]
    assert b["class_label"].tolist() == [2, 1] and b["summary"] == ["a summary"] * 2
    c = captions_batch(["High tumor; low til; x y", "free text"])
    assert c["class_label"].tolist() == [2, 4] and c["summary"] == ["x y", "free text"]
    assert (c["tumor"], c["til"]) == (["high", None], ["low", None])


def _unet(num_classes=None, adm=None, concat: int = 0, context: bool = True) -> dict:
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 8, "in_channels": 3 + concat, "out_channels": 3,
                       "model_channels": 32, "attention_resolutions": [2], "num_res_blocks": 1,
                       "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": context,
                       "transformer_depth": 1, "context_dim": 8 if context else None,
                       "legacy": False,
                       "num_classes": num_classes, "adm_in_channels": adm}}


@pytest.mark.parametrize("key", ["crossattn", "concat", "hybrid", "adm"])
def test_the_vector_reaches_label_emb_for_every_conditioning_key(key):
    concat = 2 if key in ("concat", "hybrid") else 0
    w = DiffusionWrapper(_unet("sequential", 6, concat, key in ("crossattn", "hybrid")), key)
    with torch.no_grad():  # the output convolution starts at zero
        for q in w.parameters():
            q.normal_(0, 0.05)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    cond = {"c_crossattn": [torch.randn(2, 1, 8)], "c_concat": [torch.randn(2, 2, 8, 8)]}
    y = torch.randn(2, 6)
    if key == "adm":
        cond = {}
    out, other = w(x, t, **cond, y=y), w(x, t, **cond, y=y + 1)
    assert out.shape == (2, 3, 8, 8) and not torch.allclose(out, other)
    with pytest.raises(ValueError, match=r"y must have shape \(2, 6\)"):
        w(x, t, **cond, y=torch.randn(2, 5))
    # CompVis: class ids through c_crossattn
    classes = DiffusionWrapper(_unet(5, context=False), "adm")
    assert classes(x, t, c_crossattn=[torch.tensor([0, 4])]).shape == (2, 3, 8, 8)


def test_latent_diffusion_with_a_conditioner(tiny_clip_dir):
    from tiny_ldm import build_tiny_model, tiny_model_config

    cfg = tiny_model_config(tiny_clip_dir)
    p = cfg["params"]
    text = dict(p["cond_stage_config"], input_key="summary", kind="crossattn", ucg_rate=0.1)
    p["cond_stage_config"] = {"target": "ldm.modules.encoders.conditioner.Conditioner",
                              "params": {"embedders": [_class(16, kind="vector", ucg_rate=0.1,
                                                              is_trainable=True), text]}}
    p["unet_config"]["params"].update(num_classes="sequential", adm_in_channels=16)
    model = build_tiny_model(cfg).eval()
    assert model.cond_stage_trainable and model.supports_guidance()
    keys = {k.split(".")[2] for k in model.state_dict() if k.startswith("cond_stage_model.")}
    assert keys == {"0", "1"}  # cond_stage_model.embedders.<i>.*
    batch = levels_batch([("high", "low"), ("low", "low")], ["s one", "s two"])
    c = model.get_conditioning(batch)
    assert c["y"].shape == (2, 16) and c["c_crossattn"][0].shape == (2, 154, 32)
    uc = model.get_unconditional_conditioning(2)
    z = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 500])
    assert not torch.allclose(model.apply_model(z, t, c), model.apply_model(z, t, uc))
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    assert any(n.startswith("cond_stage_model.embedders.0.") for n in trained)
    assert not any(n.startswith("cond_stage_model.embedders.1.") for n in trained)
    loss = model.shared_step({**batch, "image": torch.rand(2, 16, 16, 3)})[0]
    assert np.isfinite(float(loss.detach()))


def _f3(**overrides):
    from conftest import load_fixture

    from ldm.util import instantiate_from_config

    fx = load_fixture("F3F4_ldm_schedule_loss_ddim_s0")
    cfg = {**fx["config"], "params": {**fx["config"]["params"], **overrides}}
    return fx, instantiate_from_config(cfg)


def test_a_single_embedder_is_a_one_entry_view_not_a_second_module():
    import copy

    from ldm.modules.encoders.conditioner import SingleEmbedderView

    fx, model = _f3()
    model.load_state_dict(fx["state_dict"], strict=True)
    view = model.conditioner
    assert isinstance(view, SingleEmbedderView) and not isinstance(view, torch.nn.Module)
    assert list(view) == [model.cond_stage_model] and view.input_keys == ["class_label"]
    assert (view.embedders["0"].kind, view.embedders["0"].ucg_rate) == ("crossattn", 0.0)
    assert list(model.state_dict()) == list(fx["state_dict"])  # no key under a second name
    assert sum(m is model.cond_stage_model for m in model.modules()) == 1
    assert model.cond_stage_trainable and view.is_trainable  # the fixture trains its classes
    labels = torch.tensor([0, 3])
    c = model.get_learned_conditioning(labels)  # the field's value, CompVis' call
    assert torch.equal(c, model.cond_stage_model(labels))
    assert torch.equal(c, model.get_learned_conditioning({"class_label": labels}))
    uc = model.get_unconditional_conditioning(2)
    assert torch.equal(model.get_conditioning({"class_label": labels},
                                              uncond_keys=["class_label"]), uc)
    twin = copy.deepcopy(model)  # the copy's view sees the copy's embedder
    assert list(twin.conditioner) == [twin.cond_stage_model]
    assert {k: _f3(conditioning_key=k)[1].conditioner.embedders["0"].kind
            for k in ("adm", "concat")} == {"adm": "vector", "concat": "concat"}


def test_single_embedder_options_reach_the_view():
    _, model = _f3(cond_stage_forward="forward", cond_stage_trainable=False)
    assert not model.conditioner.is_trainable
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    labels = torch.tensor([1, 2])
    assert torch.equal(model.get_learned_conditioning(labels), model.cond_stage_model(labels))
    with pytest.raises(AttributeError, match="no method 'embed_labels'"):
        _f3(cond_stage_forward="embed_labels")
    # the first stage as conditioning reads the image field channels first, as CompVis
    _, first = _f3(cond_stage_config="__is_first_stage__", cond_stage_key="image",
                   cond_stage_trainable=False)
    image = torch.rand(2, 8, 8, 3) * 2 - 1
    assert first.conditioning_fields() == ["image"]
    with torch.no_grad():
        expected = first.first_stage_model.encode(image.permute(0, 3, 1, 2).contiguous())
        assert torch.equal(first.get_conditioning({"image": image}), expected)
