"""Load an exported diffusers folder back into this project's LatentDiffusion (no diffusers).

The folder's ``pathldm.yaml`` rebuilds the model; the U-Net, first-stage and class-embedder
weights come from the components' safetensors through the inverse of
:mod:`ldm.export.keymap` (every key checked both ways); the text tower and tokenizer load from
``text_encoder/`` and ``tokenizer/``.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ldm.export import keymap

logger = logging.getLogger(__name__)

CONFIG_FILE = "pathldm.yaml"
EXPORT_FILE = "pathldm_export.json"
FORMAT_VERSION = 1
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def is_exported_folder(path: str | Path) -> bool:
    """True for a folder written by ``scripts/export.py``."""
    path = Path(path)
    return (path.is_dir() and (path / "model_index.json").is_file()
            and (path / CONFIG_FILE).is_file())


def _read_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / component / WEIGHTS_FILE
    if not path.is_file():
        found = sorted(p.name for p in (folder / component).glob("*")) if (
            folder / component).is_dir() else []
        raise FileNotFoundError(f"{path} not found (the folder's {component}/ holds {found}); "
                                "only single-file safetensors components are read")
    return load_file(str(path))


def _model_from_config(folder: Path, cfg: dict[str, Any]) -> torch.nn.Module:
    from ldm.checkpoint import model_config, strip_init_checkpoints
    from ldm.util import instantiate_from_config

    mcfg = strip_init_checkpoints(model_config(cfg))
    params = mcfg["params"]
    params["use_ema"] = False  # the folder holds the chosen weights only
    cond = params.get("cond_stage_config")
    if (folder / "text_encoder").is_dir():
        cond["params"] = {**cond.get("params", {}), "version": str(folder / "text_encoder"),
                          "tokenizer_version": str(folder / "tokenizer")}
    return instantiate_from_config(mcfg)


def _component_state(folder: Path, model: torch.nn.Module, params: dict[str, Any],
                     own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with U-Net, first-stage and class weights from the folder."""
    groups = keymap.split_components(list(own), has_text=(folder / "text_encoder").is_dir())
    sd = dict(own)  # schedule buffers from the config; text tower loaded from the folder
    tables = {"unet": (keymap.unet_table(params["unet_config"]["params"]), keymap.UNET_PREFIX),
              "vae": (keymap.vae_table(params["first_stage_config"]["params"]["ddconfig"]),
                      keymap.VAE_PREFIX)}
    for name, (table, prefix) in tables.items():
        km = keymap.build_map(groups[name], table, prefix)
        sd.update(keymap.convert(_read_weights(folder, name), km, groups[name], inverse=True,
                                 what=f"{folder / name}"))
    if groups["class_embedder"]:
        km = keymap.prefix_map(groups["class_embedder"], keymap.CLASS_PREFIX, "")
        sd.update(keymap.convert(_read_weights(folder, "class_embedder"), km,
                                 groups["class_embedder"], inverse=True,
                                 what=f"{folder / 'class_embedder'}"))
    return sd


def _check_scale(folder: Path, model: torch.nn.Module) -> None:
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    if abs(float(vae_cfg["scaling_factor"]) - float(model.scale_factor)) > 1e-9:
        raise ValueError(f"{folder}: vae scaling_factor {vae_cfg['scaling_factor']} differs from "
                         f"{CONFIG_FILE}'s scale_factor {float(model.scale_factor)}")


def load_exported(folder: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """The exported folder as a :class:`ldm.checkpoint.LoadedCheckpoint` (eval mode)."""
    import yaml

    from ldm.checkpoint import LoadedCheckpoint, model_config
    from ldm.util import load_checkpoint_into

    folder = Path(folder)
    if not is_exported_folder(folder):
        raise FileNotFoundError(f"{folder} is not an exported model folder (needs "
                                f"model_index.json and {CONFIG_FILE})")
    cfg = yaml.safe_load((folder / CONFIG_FILE).read_text())
    info_path = folder / EXPORT_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{folder}: export format {info['format']} is newer than this "
                         f"version reads ({FORMAT_VERSION}); update the project")
    model = _model_from_config(folder, copy.deepcopy(cfg))
    _check_scale(folder, model)
    params = model_config(cfg)["params"]
    sd = _component_state(folder, model, params, model.state_dict())
    load_checkpoint_into(model, sd, name=f"{type(model).__name__} (from {folder})")
    model.eval().to(map_location)
    logger.info("loaded the exported folder %s (%s weights, step %s)", folder,
                info.get("weights"), info.get("global_step"))
    return LoadedCheckpoint(model=model, checkpoint_path=folder, config=cfg,
                            weights=info.get("weights", "raw"),
                            global_step=info.get("global_step"))
