"""Write a loaded LatentDiffusion as a diffusers folder (needs the ``[export]`` extra).

Layout: ``unet/`` (UNet2DConditionModel), ``vae/`` (VQModel or AutoencoderKL), ``scheduler/``
(DDIMScheduler), ``text_encoder/`` + ``tokenizer/`` (text models) or ``class_embedder/``
(class models, a custom component), ``pipeline.py`` (the custom pipeline), ``model_index.json``,
``pathldm.yaml`` (this project's resolved config), ``pathldm_export.json`` (provenance and the
self-check) and ``README.md`` (the model card). Everything is written to a temporary folder
next to the output and renamed into place once complete and verified.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ldm.atomic import remove_stale_tmp, tmp_dir
from ldm.export import configs, keymap
from ldm.export.card import CardInfo, render_card
from ldm.export.folder import CONFIG_FILE, EXPORT_FILE, FORMAT_VERSION

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
SELF_CHECK_TOLERANCE = 1e-4  # relative, fp32: the exported denoiser vs this project's


@dataclass
class ExportOptions:
    """What goes into the folder besides the weights."""

    license: str = "other"
    repo_id: str | None = None
    guidance_scale: float = 1.75
    dataset_card: Path | None = None
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    overwrite: bool = False


def _require_diffusers() -> Any:
    from ldm.optional import require

    return require("diffusers", "export", "exporting a model as a diffusers folder")


def first_stage_kind(model: torch.nn.Module) -> str:
    """``"vq"`` or ``"kl"``; other first stages are not exportable."""
    from ldm.models.autoencoder import AutoencoderKL, VQModel

    stage = model.first_stage_model
    if isinstance(stage, VQModel):
        return "vq"
    if isinstance(stage, AutoencoderKL):
        return "kl"
    raise ValueError(f"first stage {type(stage).__name__} has no diffusers counterpart")


def conditioning(model: torch.nn.Module) -> str:
    """``"text"`` (a transformers CLIP tower) or ``"class"``; others are not exportable."""
    from ldm.modules.encoders.clip_text import FrozenCLIPEmbedder

    stage = getattr(model, "cond_stage_model", None)
    if isinstance(stage, FrozenCLIPEmbedder):
        return "text"
    # a single class embedder: reads only class labels, one embedding table
    if (getattr(model, "cond_stage_key", None) == "class_label"
            and isinstance(getattr(stage, "embedding", None), torch.nn.Embedding)):
        return "class"
    raise ValueError(f"conditioning {type(stage).__name__}: only the transformers CLIP/PLIP "
                     "text encoder and the class embedder are exportable")


def _load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(dict(sd), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise KeyError(f"{what}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def _component(sd: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    return {k: sd[k].detach().float().cpu() for k in keys}


def build_unet(model: torch.nn.Module, params: Mapping[str, Any], sd, keys) -> Any:
    """The U-Net as ``UNet2DConditionModel`` with every key mapped and checked."""
    from diffusers import UNet2DConditionModel

    cfg = configs.unet_config(params["unet_config"]["params"], model.model.diffusion_model)
    unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
    km = keymap.build_map(keys, keymap.unet_table(params["unet_config"]["params"]),
                          keymap.UNET_PREFIX)
    converted = keymap.convert(_component(sd, keys), km, unet.state_dict().keys(), what="U-Net")
    _load_strict(unet, converted, "U-Net")
    return unet.eval()


def build_vae(model: torch.nn.Module, params: Mapping[str, Any], sd, keys) -> Any:
    """The first stage as ``VQModel`` / ``AutoencoderKL`` with the LDM's scale factor."""
    import diffusers

    kind = first_stage_kind(model)
    fs_params = params["first_stage_config"]["params"]
    cfg = configs.vae_config(fs_params, kind, float(model.scale_factor))
    cls = getattr(diffusers, cfg.pop("_class_name"))
    vae = cls.from_config(cfg)
    km = keymap.build_map(keys, keymap.vae_table(fs_params["ddconfig"]), keymap.VAE_PREFIX)
    converted = keymap.convert(_component(sd, keys), km, vae.state_dict().keys(),
                               what="first stage")
    _load_strict(vae, converted, "first stage")
    return vae.eval()


def build_text(model: torch.nn.Module, sd, keys) -> tuple[Any, Any]:
    """``(CLIPTextModel, tokenizer)`` from the frozen text tower."""
    from transformers import CLIPTextModel

    tower = model.cond_stage_model.transformer.text_model
    clip = CLIPTextModel(tower.config)
    target = "text_model." if hasattr(clip, "text_model") else ""
    km = keymap.prefix_map(keys, keymap.TEXT_PREFIX, target)
    expected = [k for k in clip.state_dict() if not k.endswith("position_ids")]
    _load_strict(clip, keymap.convert(_component(sd, keys), km, expected, what="text tower"),
                 "text tower")
    return clip.eval(), model.cond_stage_model.tokenizer


def _template_module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"ldm.export.templates.{name}")


def build_class_embedder(model: torch.nn.Module, sd, keys) -> Any:
    """The class embedder as the folder's custom ``PathLDMClassEmbedder`` component."""
    stage = model.cond_stage_model
    cls = _template_module("class_embedder").PathLDMClassEmbedder
    emb = cls(num_classes=stage.n_classes, embed_dim=stage.embedding.embedding_dim,
              unconditional_class=int(stage.unconditional_class))
    km = keymap.prefix_map(keys, keymap.CLASS_PREFIX, "")
    _load_strict(emb, keymap.convert(_component(sd, keys), km, emb.state_dict().keys(),
                                     what="class embedder"), "class embedder")
    return emb.eval()


def build_scheduler(model: torch.nn.Module, params: Mapping[str, Any]) -> Any:
    """``DDIMScheduler`` whose training schedule equals the model's (checked)."""
    from diffusers import DDIMScheduler

    cfg = configs.scheduler_config(model, params)
    cfg.pop("_class_name")
    sched = DDIMScheduler.from_config(cfg)
    ours = model.alphas_cumprod.detach().double().cpu()
    err = ((sched.alphas_cumprod.double() - ours).abs() / ours).max().item()
    if err > 1e-5:
        raise ValueError(f"the DDIM scheduler's alphas_cumprod differ from the model's by "
                         f"{err:.2e} (relative): the checkpoint's schedule buffers do not match "
                         "its config")
    return sched


@torch.no_grad()
def self_check(model: torch.nn.Module, pipe: Any, kind: str, seed: int = 0) -> float:
    """Max relative difference of the guided denoiser output, exported vs this project."""
    from ldm.data.captions import caption_from_levels, conditioning_batch
    from ldm.models.diffusion.ddim import guided_eps, model_denoiser

    g = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    x = torch.randn(2, unet.in_channels, unet.image_size, unet.image_size, generator=g)
    t = torch.tensor([999, 500])
    conds = ([caption_from_levels("high", "low", "invasive ductal carcinoma"), ""]
             if kind == "text" else [1, 3])
    c = model.get_conditioning(conditioning_batch(conds))
    uc = model.get_unconditional_conditioning(2)
    ref = guided_eps(model_denoiser(model), x, t, c, uc, 1.75)
    ctx = pipe.encode_prompt(conds) if kind == "text" else pipe.encode_class_labels(conds)
    out = pipe.denoise(x, t, ctx, pipe.unconditional_context(2), 1.75)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _model_index(diffusers_version: str, vae: Any, kind: str, tokenizer: Any,
                 guidance_scale: float, max_length: int | None) -> dict[str, Any]:
    index: dict[str, Any] = {
        "_class_name": ["pipeline", "PathLDMPipeline"], "_diffusers_version": diffusers_version,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", type(vae).__name__],
        "scheduler": ["diffusers", "DDIMScheduler"], "guidance_scale": guidance_scale,
        "text_encoder": [None, None], "tokenizer": [None, None], "class_embedder": [None, None]}
    if kind == "text":
        index.update(text_encoder=["transformers", "CLIPTextModel"],
                     tokenizer=["transformers", type(tokenizer).__name__],
                     max_length=max_length)
    else:
        index.update(class_embedder=["class_embedder", "PathLDMClassEmbedder"])
    return index


def _write_components(tmp: Path, parts: dict[str, Any], kind: str) -> None:
    for name in ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "class_embedder"):
        if parts.get(name) is not None:
            kwargs = {} if name in ("scheduler", "tokenizer") else {"safe_serialization": True}
            parts[name].save_pretrained(tmp / name, **kwargs)
    shutil.copyfile(TEMPLATES / "pipeline.py", tmp / "pipeline.py")
    if kind == "class":
        shutil.copyfile(TEMPLATES / "class_embedder.py",
                        tmp / "class_embedder" / "class_embedder.py")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old export is removed only afterwards."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.rglob("*")]:  # some writers create owner-only modes
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")


def export_model(loaded: Any, out: str | Path, opts: ExportOptions | None = None
                 ) -> dict[str, Any]:
    """Export ``loaded`` (a :class:`ldm.checkpoint.LoadedCheckpoint`) to the folder ``out``."""
    diffusers = _require_diffusers()
    from ldm.checkpoint import model_config

    opts = opts or ExportOptions()
    out = Path(out)
    _check_target(out, opts.overwrite)
    model = loaded.model.float().cpu().eval()
    params = model_config(loaded.config)["params"]
    kind = conditioning(model)
    sd = model.state_dict()
    groups = keymap.split_components(list(sd), has_text=kind == "text")
    parts: dict[str, Any] = {
        "unet": build_unet(model, params, sd, groups["unet"]),
        "vae": build_vae(model, params, sd, groups["vae"]),
        "scheduler": build_scheduler(model, params)}
    if kind == "text":
        parts["text_encoder"], parts["tokenizer"] = build_text(model, sd, groups["text_encoder"])
    else:
        parts["class_embedder"] = build_class_embedder(model, sd, groups["class_embedder"])
    max_length = int(model.cond_stage_model.max_length) if kind == "text" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp([out])  # a killed export's folder
    tmp = tmp_dir(out)
    try:
        _write_components(tmp, parts, kind)
        index = _model_index(diffusers.__version__, parts["vae"], kind, parts.get("tokenizer"),
                             opts.guidance_scale, max_length)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(loaded.config, sort_keys=False))
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp), trust_remote_code=True)
        err = self_check(model, pipe, kind)
        if not err <= SELF_CHECK_TOLERANCE:
            raise RuntimeError(f"the exported pipeline's denoiser differs from this project's "
                               f"by {err:.2e} (relative), over {SELF_CHECK_TOLERANCE:g}")
        info = {"format": FORMAT_VERSION, "conditioning": kind,
                "first_stage": first_stage_kind(model), "weights": loaded.weights,
                "global_step": loaded.global_step, "source": loaded.checkpoint_path.name,
                "diffusers_version": diffusers.__version__,
                "self_check_max_rel_err": err, "keys": {k: len(v) for k, v in groups.items()}}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        card = CardInfo(config=loaded.config, conditioning=kind, info=info,
                        license=opts.license, repo_id=opts.repo_id,
                        dataset_card=opts.dataset_card, eval_results=opts.eval_results,
                        guidance_scale=opts.guidance_scale)
        (tmp / "README.md").write_text(render_card(card))
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s (%s weights) to %s; self-check %.2e", loaded.checkpoint_path,
                loaded.weights, out, err)
    return {"folder": str(out), **info}
