"""ClassEmbedder: (B, 1, D) context, class 4 unconditional, reference F4 contexts, keys."""
import json

import torch
from conftest import REFERENCE, load_fixture

from ldm.modules.encoders.modules import ClassEmbedder
from ldm.util import instantiate_from_config


def test_shape_and_unconditional_class():
    emb = ClassEmbedder(n_classes=5, embed_dim=512, key="class_label")
    labels = torch.tensor([0, 1, 2, 3, 4])
    c = emb({"class_label": labels})
    assert c.shape == (5, 1, 512)
    assert torch.equal(c[:, 0], emb.embedding.weight[labels])
    uc = emb.unconditional_input(3)
    assert list(uc) == ["class_label"] and uc["class_label"].tolist() == [4, 4, 4]
    assert uc["class_label"].dtype == torch.long
    assert torch.equal(emb(uc), emb.embedding.weight[4].expand(3, 1, 512))
    assert torch.equal(emb(labels), c)  # a bare label tensor also works
    assert emb(c.new_zeros(0, dtype=torch.long)).shape == (0, 1, 512)


def test_reference_f4_contexts():
    fx = load_fixture("F3F4_ldm_schedule_loss_ddim_s0")
    cfg = fx["config"]["params"]["cond_stage_config"]
    emb = instantiate_from_config(cfg)
    prefix = "cond_stage_model."
    emb.load_state_dict({k[len(prefix):]: v for k, v in fx["state_dict"].items()
                         if k.startswith(prefix)}, strict=True)
    f4 = fx["inputs"]["F4"]
    assert torch.equal(emb({"class_label": f4["class_label"]}), fx["outputs"]["F4"]["c"])
    assert f4["uc_class_label"].tolist() == emb.unconditional_input(2)["class_label"].tolist()
    assert torch.equal(emb(emb.unconditional_input(2)), fx["outputs"]["F4"]["uc"])


def test_state_dict_matches_manifest_d():
    manifest = json.loads((REFERENCE / "manifests" /
                           "d_PathLDM_class_cond_tumor_til_LatentDiffusion.json").read_text())
    expected = [(k.removeprefix("cond_stage_model."), tuple(s)) for k, s, _ in manifest
                if k.startswith("cond_stage_model.")]
    emb = ClassEmbedder(n_classes=5, embed_dim=512, key="class_label")
    assert [(k, tuple(v.shape)) for k, v in emb.state_dict().items()] == expected


def test_trainable_and_device_following():
    emb = ClassEmbedder(embed_dim=8, n_classes=5, key="class_label").double()
    out = emb({"class_label": [1, 2]})  # plain lists are accepted
    assert out.dtype == torch.float64 and out.requires_grad
    out.sum().backward()
    assert emb.embedding.weight.grad[[1, 2]].abs().sum() > 0
    assert emb.embedding.weight.grad[[0, 3, 4]].abs().sum() == 0
