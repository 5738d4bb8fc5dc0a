"""Tiny LatentDiffusion configs and checkpoints for the sampling/evaluation/checkpoint tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm.util import instantiate_from_config

DDCONFIG = {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0}


def tiny_model_config(text_dir: str | Path | None = None, use_ema: bool = True,
                      track_fid: bool = False) -> dict[str, Any]:
    """A text-conditional (``text_dir``: tiny CLIP) or class-conditional tiny LDM, 16x16 images."""
    if text_dir is not None:
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"version": str(text_dir), "max_length": 154}}
        key = "caption"
    else:
        cond = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"embed_dim": 32, "n_classes": 5, "key": "class_label"}}
        key = "class_label"
    return {
        "base_learning_rate": 1.0e-3,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
            "first_stage_key": "image", "cond_stage_key": key, "image_size": 8, "channels": 3,
            "conditioning_key": "crossattn", "use_ema": use_ema, "track_fid": track_fid,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": {"image_size": 8, "in_channels": 3, "out_channels": 3,
                                       "model_channels": 32, "attention_resolutions": [2],
                                       "num_res_blocks": 1, "channel_mult": [1, 2],
                                       "num_heads": 2, "use_spatial_transformer": True,
                                       "transformer_depth": 1, "context_dim": 32,
                                       "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                                   "params": {"embed_dim": 3, "n_embed": 16,
                                              "ddconfig": DDCONFIG,
                                              "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": cond,
        },
    }


def build_tiny_model(model_cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """Instantiate with the U-Net redrawn (its zero-initialised outputs give constant images)."""
    torch.manual_seed(seed)
    model = instantiate_from_config(model_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        if getattr(model, "use_ema", False):  # shadows = weights + 0.01, distinguishable
            for name, p in model.model.named_parameters():
                buf = name.replace(".", "")
                if buf in dict(model.model_ema.named_buffers()):
                    getattr(model.model_ema, buf).copy_(p + 0.01)
    return model


def save_checkpoint(model: torch.nn.Module, path: Path, config: dict[str, Any] | None,
                    extra: dict[str, torch.Tensor] | None = None, step: int = 3) -> Path:
    """A Lightning-style checkpoint (``state_dict``, ``global_step``, optional ``config``)."""
    sd = dict(model.state_dict())
    sd.update(extra or {})
    ckpt: dict[str, Any] = {"state_dict": sd, "global_step": step, "epoch": 0}
    if config is not None:
        ckpt["config"] = config
    torch.save(ckpt, path)
    return path
