"""Our configs build models whose state_dict keys, shapes and dtypes are the original's.

The manifests (tests/fixtures/reference/manifests) list the state_dict of models built with the
original CompVis / PathLDM code. We build the same models from our YAML configs: pretrained
paths removed, a local random text tower with the ViT-B/32 text shape, weight initialisation
skipped (only names, shapes and dtypes matter). Two documented exceptions: PathLDM's in-training
FID network (``inception.*``) is not part of our model, and the text tower's ``position_ids`` is
a persistent buffer only in transformers < 4.31.
"""
import contextlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.config import merge_configs
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests" / "fixtures" / "reference" / "manifests"
EXCLUDED = ("inception.",)
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@contextlib.contextmanager
def skip_init():
    """Allocate parameters without running their (slow, here irrelevant) initialisers."""
    names = ["kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_",
             "zeros_", "ones_", "constant_"]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *args, **kwargs: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


@pytest.fixture(scope="module")
def vit_b32_text_dir(tmp_path_factory) -> Path:
    """A local CLIP text tower with the ViT-B/32 text config (PLIP and OpenAI CLIP share it)."""
    from ldm.modules.encoders.tiny import build_tiny_clip_text_encoder

    with skip_init():
        return build_tiny_clip_text_encoder(tmp_path_factory.mktemp("vit_b32_text"),
                                            hidden_size=512, num_layers=12, num_heads=8,
                                            intermediate_size=2048)


def manifest(name: str) -> list[tuple[str, tuple, str]]:
    entries = json.loads((MANIFESTS / f"{name}.json").read_text())
    return [(k, tuple(shape), dtype) for k, shape, dtype in entries
            if not k.startswith(EXCLUDED) and k != POSITION_IDS]


def build(config: str, text_dir: Path, **params) -> list[tuple[str, tuple, str]]:
    # the ablation rows are overlays on pathldm.yaml (merging pathldm.yaml on itself is a no-op)
    cfg = merge_configs(*[OmegaConf.load(ROOT / "configs" / c)
                          for c in ("pathldm.yaml", config)]).model
    p = cfg.params
    for stage in (p, p.unet_config.params, p.first_stage_config.params):
        stage.pop("ckpt_path", None)
    if "version" in p.cond_stage_config.get("params", {}):
        p.cond_stage_config.params.version = str(text_dir)
    cfg = OmegaConf.merge(cfg, {"params": params})
    with skip_init():
        model = instantiate_from_config(cfg)
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()]


def assert_same(ours: list, reference: list) -> None:
    missing = sorted({k for k, *_ in reference} - {k for k, *_ in ours})
    extra = sorted({k for k, *_ in ours} - {k for k, *_ in reference})
    assert not missing and not extra, f"missing {missing[:10]}, extra {extra[:10]}"
    assert ours == reference  # same shapes, dtypes and state_dict order


@pytest.mark.parametrize("config, name", [
    ("pathldm.yaml", "c_PathLDM_plip_imagenet_finetune_LatentDiffusion"),
    ("ablations/plip_text.yaml",
     "c3_PathLDM_plip_imagenet_finetune_LatentDiffusion_track_fid_False"),
    ("ablations/clip_text.yaml", "c2_PathLDM_clip_imagenet_finetune_LatentDiffusion"),
])
def test_text_conditioned_models(config, name, vit_b32_text_dir):
    assert_same(build(config, vit_b32_text_dir), manifest(name))


def test_class_conditioned_model(vit_b32_text_dir):
    assert_same(build("ablations/vq_f4_class_finetune.yaml", vit_b32_text_dir),
                manifest("d_PathLDM_class_cond_tumor_til_LatentDiffusion"))


@pytest.mark.parametrize("use_ema, name", [
    (False, "x_cin256-v2_LatentDiffusion"),
    (True, "x_cin256-v2_LatentDiffusion_use_ema_True"),
])
def test_cin256_v2_layout(use_ema, name, vit_b32_text_dir):
    """cin256-v2 is the class-conditional config with ImageNet's 1001 classes."""
    ours = build("ablations/vq_f4_class_finetune.yaml", vit_b32_text_dir, use_ema=use_ema,
                 cond_stage_config={"params": {"n_classes": 1001}})
    assert_same(ours, manifest(name))
