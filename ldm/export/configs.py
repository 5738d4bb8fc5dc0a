"""diffusers component configs (plain dicts) for a LatentDiffusion model of this project.

Each function states which CompVis settings diffusers can express and raises a one-line error
naming the setting otherwise. No diffusers import: the dicts are what ``config.json`` holds.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _unsupported(component: str, setting: str, value: Any) -> ValueError:
    return ValueError(f"{component} has {setting}={value!r}, which the diffusers layout cannot "
                      "express; this model is not exportable")


def _check_unet(params: Mapping[str, Any]) -> None:
    checks = {"use_spatial_transformer": (True, False), "resblock_updown": (False, False),
              "conv_resample": (True, True), "dims": (2, 2), "n_embed": (None, None),
              "num_heads_upsample": (-1, -1), "use_new_attention_order": (False, False),
              "num_classes": (None, None)}  # labels enter through the class embedder
    for name, (wanted, default) in checks.items():
        value = params.get(name, default)
        if value != wanted and not (name == "num_heads_upsample"
                                    and value == params.get("num_heads", -1)):
            raise _unsupported("the U-Net", name, value)


def _heads_per_level(unet: nn.Module, n_levels: int, attention: list[bool]) -> list[int]:
    """Attention heads of each level's transformers (diffusers' legacy ``attention_head_dim``)."""
    from ldm.modules.attention import SpatialTransformer

    heads = []
    blocks = list(unet.input_blocks)
    k = 1
    for level in range(n_levels):
        found = [m for m in blocks[k].modules() if isinstance(m, SpatialTransformer)]
        heads.append(found[0].transformer_blocks[0].attn1.heads if attention[level] else 1)
        k += unet.num_res_blocks + (level != n_levels - 1)
    mid = [m for m in unet.middle_block.modules() if isinstance(m, SpatialTransformer)]
    if mid[0].transformer_blocks[0].attn1.heads != heads[-1] and attention[-1]:
        raise _unsupported("the U-Net", "middle-block heads", mid[0].transformer_blocks[0].attn1)
    if not attention[-1]:
        heads[-1] = mid[0].transformer_blocks[0].attn1.heads  # diffusers' mid block uses [-1]
    return heads


def unet_config(params: Mapping[str, Any], unet: nn.Module) -> dict[str, Any]:
    """``UNet2DConditionModel`` config equal to the CompVis ``UNetModel(**params)``."""
    _check_unet(params)
    mult = list(params.get("channel_mult", (1, 2, 4, 8)))
    res = set(params["attention_resolutions"])
    attention = [2 ** level in res for level in range(len(mult))]
    mc = int(params["model_channels"])
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": int(params["image_size"]),
        "in_channels": int(params["in_channels"]),
        "out_channels": int(params["out_channels"]),
        "center_input_sample": False,
        "flip_sin_to_cos": True,  # CompVis embeds timesteps as [cos, sin]
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                           for a in reversed(attention)],
        "only_cross_attention": False,
        "block_out_channels": [mc * m for m in mult],
        "layers_per_block": int(params["num_res_blocks"]),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": int(params["context_dim"]),
        "transformer_layers_per_block": int(params.get("transformer_depth", 1)),
        "attention_head_dim": _heads_per_level(unet, len(mult), attention),
        "use_linear_projection": False,
        "resnet_time_scale_shift": ("scale_shift" if params.get("use_scale_shift_norm")
                                    else "default"),
        "upcast_attention": False,
    }


def _check_ddconfig(ddconfig: Mapping[str, Any]) -> None:
    if list(ddconfig["ch_mult"])[0] != 1:
        raise _unsupported("the first stage", "ch_mult[0]", ddconfig["ch_mult"][0])
    for name in ("give_pre_end", "tanh_out"):
        if ddconfig.get(name):
            raise _unsupported("the first stage", name, ddconfig[name])
    if ddconfig.get("attn_type", "vanilla") != "vanilla":
        raise _unsupported("the first stage", "attn_type", ddconfig["attn_type"])


def _autoencoder_common(ddconfig: Mapping[str, Any], scale_factor: float) -> dict[str, Any]:
    n = len(ddconfig["ch_mult"])
    return {
        "in_channels": int(ddconfig["in_channels"]),
        "out_channels": int(ddconfig["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [int(ddconfig["ch"]) * m for m in ddconfig["ch_mult"]],
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": int(ddconfig["z_channels"]),
        "norm_num_groups": 32,
        "sample_size": int(ddconfig["resolution"]),
        "scaling_factor": float(scale_factor),
        "force_upcast": False,
        "mid_block_add_attention": True,
    }


def vae_config(first_stage_params: Mapping[str, Any], kind: str,
               scale_factor: float) -> dict[str, Any]:
    """``VQModel`` (``kind="vq"``) or ``AutoencoderKL`` (``"kl"``) config; carries the LDM's
    ``scale_factor`` as ``scaling_factor``."""
    ddconfig = first_stage_params["ddconfig"]
    _check_ddconfig(ddconfig)
    cfg = _autoencoder_common(ddconfig, scale_factor)
    embed_dim = int(first_stage_params["embed_dim"])
    if kind == "vq":
        if first_stage_params.get("remap") is not None:
            raise _unsupported("the VQ first stage", "remap", first_stage_params["remap"])
        return {"_class_name": "VQModel", **cfg, "num_vq_embeddings":
                int(first_stage_params["n_embed"]), "vq_embed_dim": embed_dim,
                "norm_type": "group", "lookup_from_codebook": False}
    if embed_dim != int(ddconfig["z_channels"]):
        raise _unsupported("the KL first stage", "embed_dim != z_channels", embed_dim)
    return {"_class_name": "AutoencoderKL", **cfg, "use_quant_conv": True,
            "use_post_quant_conv": True}


def scheduler_config(model: nn.Module, params: Mapping[str, Any]) -> dict[str, Any]:
    """``DDIMScheduler`` config reproducing the project's DDIM (the CompVis schedule)."""
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization not in PREDICTION_TYPES:
        raise _unsupported("the diffusion model", "parameterization", parameterization)
    cfg = {"_class_name": "DDIMScheduler", "num_train_timesteps": int(model.num_timesteps),
           "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
           "timestep_spacing": "leading", "prediction_type": PREDICTION_TYPES[parameterization],
           "thresholding": False}
    if params.get("given_betas") is None and params.get("beta_schedule", "linear") == "linear":
        # CompVis "linear" is linear in sqrt(beta): diffusers calls it scaled_linear
        cfg.update(beta_schedule="scaled_linear", beta_start=float(model.linear_start),
                   beta_end=float(model.linear_end), trained_betas=None)
    else:
        cfg.update(beta_schedule="linear", trained_betas=model.betas.double().tolist())
    return cfg
