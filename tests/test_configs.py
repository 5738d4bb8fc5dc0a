"""Every shipped config: its targets import, its model builds (tiny) and trains a step, its data
and callbacks instantiate."""
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.config import merge_configs
from ldm.data.tcga import TCGAPatchDataset
from ldm.util import get_obj_from_str, instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TEXT_ENCODERS = ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder")


def load_merged(path: Path) -> DictConfig:
    """A config, or an overlay (no ``model.target``) merged over ``configs/pathldm.yaml``."""
    cfg = OmegaConf.load(path)
    if "target" not in cfg.get("model", {}):
        cfg = merge_configs(OmegaConf.load(ROOT / "configs" / "pathldm.yaml"), cfg)
    return cfg


def _targets(node):
    if isinstance(node, DictConfig):
        for k, v in node.items():
            if k == "target":
                yield v
            else:
                yield from _targets(v)
    elif isinstance(node, ListConfig):
        for v in node:
            yield from _targets(v)


def _tiny_ddconfig(dd: DictConfig) -> None:
    dd.ch, dd.num_res_blocks, dd.resolution = 32, 1, 32
    dd.ch_mult = [1] * len(dd.ch_mult)


def tiny_model(model: DictConfig, text_dir: Path) -> tuple[DictConfig, int]:
    """Same structure, tiny widths, no pretrained paths; returns the config and the latent size."""
    model = model.copy()
    p = model.params
    p.pop("ckpt_path", None)
    if "unet_config" not in p:  # an autoencoder
        p.pop("ckpt_path", None)
        _tiny_ddconfig(p.ddconfig)
        if "n_embed" in p:
            p.n_embed = 64
        loss = p.lossconfig.get("params")
        if loss is not None:
            loss.lpips_pretrained = False
            if "n_classes" in loss:
                loss.n_classes = 64
        return model, 0
    first = p.first_stage_config.params
    first.pop("ckpt_path", None)
    _tiny_ddconfig(first.ddconfig)
    if "n_embed" in first:
        first.n_embed = 64
    latent = 32 // 2 ** (len(first.ddconfig.ch_mult) - 1)
    unet = p.unet_config.params
    unet.pop("ckpt_path", None)
    unet.update(model_channels=32, num_res_blocks=1, channel_mult=[1, 2], image_size=latent)
    if unet.get("num_head_channels", -1) > 0:
        unet.num_head_channels = 16
    p.image_size = latent
    cond = p.cond_stage_config
    if isinstance(cond, DictConfig):
        embedders = cond.get("params", {}).get("embedders")  # a Conditioner's
        if embedders is None:
            embedders = [cond]
        elif isinstance(embedders, DictConfig):
            embedders = list(embedders.values())
        for emb in embedders:
            _tiny_embedder(emb, text_dir)
        if unet.get("context_dim") is not None:
            unet.context_dim = 32
        if unet.get("adm_in_channels") is not None:
            unet.adm_in_channels = 32
    return model, latent


def _tiny_embedder(cond: DictConfig, text_dir: Path) -> None:
    name = cond.target.rsplit(".", 1)[-1]
    if name in TEXT_ENCODERS:
        cond.params.version = str(text_dir)
    elif "embed_dim" in cond.get("params", {}):
        cond.params.embed_dim = 32


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_target_imports(path):
    targets = list(_targets(load_merged(path)))
    assert targets, f"{path} has no target"
    for target in targets:
        get_obj_from_str(target)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_builds_its_model_data_and_callbacks(path, tiny_clip_dir):
    cfg = load_merged(path)
    model_cfg, latent = tiny_model(cfg.model, tiny_clip_dir)
    model = instantiate_from_config(model_cfg)
    if latent:  # a latent diffusion model: one training loss on a tiny batch
        batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1,
                 "caption": ["high tumor; low til; a summary", ""],
                 "class_label": torch.tensor([2, 4]), "summary": ["a summary", ""]}
        loss, _ = model.shared_step(batch)
        assert torch.isfinite(loss)
        z = model.get_input(batch, model.first_stage_key)[0]
        assert z.shape[-1] == latent == model.image_size
    data = instantiate_from_config(cfg.data)
    assert data.batch_size >= 1
    for split in ("train", "validation", "test"):
        params = cfg.data.params.get(split)
        if params is not None and "target" not in params:
            inspect.signature(TCGAPatchDataset).bind(**params)  # every key is an argument
    for cb in cfg.get("lightning", {}).get("callbacks", {}).values():
        instantiate_from_config(cb)


def test_plip_row_is_the_main_config():
    ours = OmegaConf.load(ROOT / "configs" / "pathldm.yaml")
    assert ours == load_merged(ROOT / "configs" / "ablations" / "plip_text.yaml")


def test_main_config_matches_the_paper():
    cfg = OmegaConf.load(ROOT / "configs" / "pathldm.yaml")
    p = cfg.model.params
    assert (p.linear_start, p.linear_end, p.timesteps, p.parameterization, p.loss_type) == (
        0.0015, 0.0195, 1000, "eps", "l2")
    assert (p.scale_factor, p.image_size, p.channels, p.conditioning_key) == (
        1.0, 64, 3, "crossattn")
    assert cfg.model.base_learning_rate == 2.5e-5 and cfg.data.params.batch_size == 64
    assert p.scheduler_config.params.warm_up_steps == [1000]
    assert p.scheduler_config.params.f_start == [1.0e-6]
    assert p.cond_stage_config.params == {"version": "vinid/plip", "max_length": 154}
    assert p.unet_config.params.ckpt_path == "models/ldm/cin256-v2/model.ckpt"
    paper = OmegaConf.merge(cfg, OmegaConf.load(ROOT / "configs" / "ablations" /
                                                "paper_hparams.yaml"))
    assert paper.model.base_learning_rate == 2.0e-5 and paper.data.params.batch_size == 48
    assert paper.model.params.scheduler_config.params.warm_up_steps == [10000]


def test_ablation_rows_differ_from_the_main_config_only_where_they_should():
    main = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "pathldm.yaml"))

    def diff(a, b, prefix=""):
        keys = set(a) | set(b) if isinstance(a, dict) and isinstance(b, dict) else None
        if keys is None:
            return [] if a == b else [prefix]
        return [d for k in keys for d in diff(a.get(k), b.get(k), f"{prefix}.{k}".lstrip("."))]

    expected = {
        "clip_text.yaml": {"model.params.cond_stage_config.params.version"},
        "random_summary.yaml": {"data.params.train.summary_mode"},
        "five_summaries.yaml": {"data.params.train.summary_mode", "data.params.train.path",
                                "data.params.validation.path"},
    }
    for name, keys in expected.items():
        other = OmegaConf.to_container(load_merged(ROOT / "configs" / "ablations" / name))
        assert set(diff(main, other)) == keys, name
    modes = {n: load_merged(ROOT / "configs" / "ablations" / n).data.params.train.summary_mode
             for n in ("random_summary.yaml", "five_summaries.yaml")}
    assert modes == {"random_summary.yaml": "wrong_slide", "five_summaries.yaml": "random"}
